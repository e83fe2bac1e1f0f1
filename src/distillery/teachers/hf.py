"""A local transformers model as a teacher: batched generation, left padding, KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from itertools import groupby
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distillery.chat import prompt_text
from distillery.config import ModelConfig
from distillery.logits.topk import TeacherTopK, teacher_log_tail
from distillery.models import load_model, load_tokenizer
from distillery.teachers.base import (
    Generation,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    SamplingParams,
)


class HFTeacher:
    """Generate with a local HF causal LM, ``batch_size`` conversations at a time.

    Prompts are rendered with the tokenizer's chat template and left-padded, so every row's
    continuation starts at the same column and the KV cache serves the whole batch.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
        name: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name or getattr(model.config, "_name_or_path", "") or "hf-model"
        self.stats = GenerationStats()

    @property
    def vocab_size(self) -> int:
        """Rows of the model's input embedding: a token id at or above it cannot be scored."""
        return self.model.get_input_embeddings().num_embeddings

    @classmethod
    def from_pretrained(
        cls, path: str | Path, batch_size: int = 64, device: str = "auto",
        trust_remote_code: bool = False, dtype: str = "float32",
    ) -> HFTeacher:
        model = load_model(ModelConfig(path=str(path), device=device, dtype=dtype,
                                       trust_remote_code=trust_remote_code))
        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, batch_size=batch_size, name=str(path))

    @torch.no_grad()
    def generate(
        self,
        conversations: list[list[dict]],
        params: SamplingParams,
        progress: Progress | None = None,
        batch_size: int | None = None,
    ) -> list[list[Generation]]:
        """``params.n`` continuations of each conversation (a list of "messages")."""
        batch_size = batch_size or self.batch_size
        tok = self.tokenizer
        tok.padding_side = "left"
        gen_cfg = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else None,
            top_p=params.top_p if params.temperature > 0 else None,
            top_k=None,
            num_return_sequences=params.n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        task = progress.add_task("generate", total=len(conversations)) if progress else None
        results: list[list[Generation]] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [prompt_text(c, tok) for c in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(params.seed + start)  # sampling is reproducible per batch
            t0 = time.perf_counter()
            out = self.model.generate(**enc, generation_config=gen_cfg)
            seconds = time.perf_counter() - t0
            new = out[:, enc["input_ids"].shape[1] :]
            prompt_lens = enc["attention_mask"].sum(dim=1).repeat_interleave(params.n).tolist()
            gens = [self._decode(row, params, n_prompt) for row, n_prompt in zip(new, prompt_lens)]
            n_tokens = sum(g.num_tokens for g in gens)
            self.stats.tokens += n_tokens
            self.stats.prompt_tokens += sum(prompt_lens[:: params.n])
            self.stats.requests += len(chunk)
            self.stats.seconds += seconds
            self.stats.batches.append((len(chunk), n_tokens, seconds))
            results.extend(gens[i : i + params.n] for i in range(0, len(gens), params.n))
            if progress is not None:
                progress.advance(task, len(chunk))
        return results

    def stream(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        """Results batch by batch; consecutive requests with the same sampling share a batch.

        Each prompt is measured before batching: one that fills the model's context (no room for
        a single new token) fails alone with ``error_kind="too_long"``. A batch that raises all
        the same is run again one request at a time, so one bad prompt fails only itself.
        """
        context = self.context_length()
        for params, group in groupby(requests, key=lambda r: r.params):
            fits = []
            for r in group:
                n = self.prompt_length(r.messages) if context is not None else 0
                if context is not None and n >= context:
                    self.stats.requests += 1
                    self.stats.failures += 1
                    yield GenerationResult(
                        r, error=f"the prompt is {n} tokens, the model's context {context}: shorten "
                                 "the prompt or use a model with a longer context", error_kind="too_long")
                else:
                    fits.append(r)
            for start in range(0, len(fits), self.batch_size):
                yield from self._run_batch(fits[start : start + self.batch_size], params)

    def _run_batch(self, chunk: list[GenerationRequest], params: SamplingParams) -> Iterator[GenerationResult]:
        try:
            outs = self.generate([list(r.messages) for r in chunk], params)
        except Exception as exc:  # a bad batch fails its requests, not the run
            if len(chunk) > 1:  # find the request that broke it: the others still get answers
                for r in chunk:
                    yield from self._run_batch([r], params)
                return
            self.stats.requests += 1
            self.stats.failures += 1
            yield GenerationResult(chunk[0], error=f"{type(exc).__name__}: {exc}")
            return
        for r, gens in zip(chunk, outs):
            yield GenerationResult(r, gens)

    def context_length(self) -> int | None:
        """The most tokens the model takes (its position table, or the tokenizer's
        ``model_max_length`` when smaller and set); None when neither says."""
        cfg = self.model.config
        limits = [getattr(cfg, key, None) for key in ("max_position_embeddings", "n_positions")]
        limits.append(getattr(self.tokenizer, "model_max_length", None))
        # tokenizers without a limit report int(1e30)
        known = [v for v in limits if isinstance(v, int) and 0 < v < 10**9]
        return min(known, default=None)

    def prompt_length(self, messages: Iterable[dict]) -> int:
        """Tokens of a conversation's prompt, rendered as :meth:`generate` renders it."""
        text = prompt_text(list(messages), self.tokenizer)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logprobs(self, token_ids: list[list[int]], k: int, temperature: float = 1.0,
                 batch_size: int | None = None) -> list[TeacherTopK]:
        """The teacher's top-k next-token log-probabilities at every position of each sequence.

        For a sequence of ``T`` ids the result has ``ids``/``logprobs`` ``[T, k]`` and ``log_tail``
        ``[T]``: row ``t`` is the distribution of the token after ``token_ids[:t + 1]`` (so row
        ``t`` scores ``token_ids[t + 1]``), at ``temperature``, in float32 on the CPU.
        ``log_tail`` is the log of the probability mass outside the top k. This is the feature
        interface the logit cache captures through.
        """
        return topk_logprobs(self.model, token_ids, k, temperature=temperature,
                             pad_id=self.tokenizer.pad_token_id or 0,
                             batch_size=batch_size or self.batch_size)

    def _decode(self, row: torch.Tensor, params: SamplingParams, prompt_tokens: int = 0) -> Generation:
        """Text up to the first end token (or stop string); tokens counted include the end."""
        ids = row.tolist()
        eos = self.tokenizer.eos_token_id
        if params.min_new_tokens:
            # a fixed-length probe: every generated position counts, text is not the point
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            return Generation(text, len(ids), "length", prompt_tokens)
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
            reason = "stop"
        else:
            reason = "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Generation(text=text, num_tokens=len(ids), finish_reason=reason, prompt_tokens=prompt_tokens)


@torch.no_grad()
def topk_logprobs(model: PreTrainedModel, token_ids: list[list[int]], k: int, temperature: float = 1.0,
                  pad_id: int = 0, batch_size: int = 16) -> list[TeacherTopK]:
    """Top-k log-probs and log tail mass per position (see :meth:`HFTeacher.logprobs`).

    Two passes over the vocabulary per position, on the raw logits: ``logsumexp`` (the
    normalizer) and ``topk``; no ``[tokens, vocab]`` log-softmax is materialized. The tail mass
    is ``1 − Σ top-k`` in float64, floored at ``LOG_TAIL_FLOOR`` where it underflows.
    """
    device = next(model.parameters()).device
    out: list[TeacherTopK] = []
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(chunk):  # right padding: positions stay 0..T-1
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        if k > logits.shape[-1]:
            raise ValueError(f"k={k} exceeds the model's vocabulary ({logits.shape[-1]})")
        if temperature != 1.0:
            logits = logits / temperature
        log_z = logits.logsumexp(-1, keepdim=True)
        top, top_ids = logits.topk(k, dim=-1)
        top_lp = top - log_z
        log_tail = teacher_log_tail(top_lp.double()).float()
        for i, seq in enumerate(chunk):
            n = len(seq)
            out.append(TeacherTopK(top_ids[i, :n].cpu(), top_lp[i, :n].cpu(), log_tail[i, :n].cpu()))
    return out
