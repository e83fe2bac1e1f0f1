"""In-process vLLM as a teacher (optional extra: ``pip install 'distillery[vllm]'``, CUDA GPU).

``vllm.LLM.chat`` renders each conversation with the model's chat template and schedules the whole
batch itself (continuous batching, paged KV cache), so :meth:`VLLMTeacher.stream` hands it
``batch_size`` requests at a time and yields their results when the batch is done. For a vLLM
*server* (``vllm serve``), use ``backend: openai`` instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from distillery.errors import MissingExtraError
from distillery.teachers.base import (
    Generation,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    SamplingParams,
    generate_via_stream,
)

if TYPE_CHECKING:
    from distillery.config import TeacherConfig

VLLM_MISSING = (
    "the vllm backend needs the vllm package: pip install 'distillery[vllm]'; vLLM needs a CUDA GPU; "
    "or use backend: openai against a `vllm serve` endpoint"
)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise MissingExtraError(VLLM_MISSING) from exc
    return vllm


class VLLMTeacher:
    """Generate with ``vllm.LLM`` in this process; ``vllm_kwargs`` go to ``vllm.LLM(...)``."""

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = 64,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        vllm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        vllm = _import_vllm()
        self._vllm = vllm
        self.model = model
        self.batch_size = batch_size
        self.name = f"vllm:{model}"
        self.stats = GenerationStats()
        self.llm = vllm.LLM(model=model, dtype=dtype, trust_remote_code=trust_remote_code, **(vllm_kwargs or {}))

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> VLLMTeacher:
        return cls(cfg.model, batch_size=cfg.batch_size, dtype=cfg.dtype,
                   trust_remote_code=cfg.trust_remote_code, vllm_kwargs=dict(cfg.vllm_kwargs))

    def __repr__(self) -> str:
        return f"VLLMTeacher(model={self.model!r}, batch_size={self.batch_size})"

    def _sampling(self, p: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p if p.temperature > 0 else 1.0,
            max_tokens=p.max_new_tokens,
            min_tokens=p.min_new_tokens,
            ignore_eos=p.min_new_tokens > 0,  # a fixed-length probe, as in HFTeacher
            seed=p.seed,
            stop=list(p.stop) or None,
        )

    def generate(self, conversations: list[list[dict]], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` continuations per conversation, in order; a failed batch raises."""
        return generate_via_stream(self, conversations, params)

    def stream(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        """Results ``batch_size`` requests at a time (each with its own sampling parameters)."""
        it = iter(requests)
        while chunk := list(islice(it, self.batch_size)):
            t0 = time.perf_counter()
            try:
                outs = self.llm.chat(
                    [list(r.messages) for r in chunk],
                    sampling_params=[self._sampling(r.params) for r in chunk],
                    use_tqdm=False,
                )
            except Exception as exc:  # a bad batch fails its requests, not the run
                self.stats.requests += len(chunk)
                self.stats.failures += len(chunk)
                for r in chunk:
                    yield GenerationResult(r, error=f"{type(exc).__name__}: {exc}")
                continue
            seconds = time.perf_counter() - t0
            results = []
            n_tokens = 0
            for r, out in zip(chunk, outs):
                n_prompt = len(out.prompt_token_ids or [])
                gens = [Generation(c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop",
                                   n_prompt) for c in out.outputs]
                n_tokens += sum(g.num_tokens for g in gens)
                self.stats.prompt_tokens += n_prompt
                results.append(GenerationResult(r, gens))
            self.stats.tokens += n_tokens
            self.stats.requests += len(chunk)
            self.stats.seconds += seconds
            self.stats.batches.append((len(chunk), n_tokens, seconds))
            yield from results
