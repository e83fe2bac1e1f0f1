"""Student rollouts for on-policy training: which engine writes the samples, and when it syncs.

An engine (:class:`RolloutEngine`) turns prompts into continuations and, when it holds a copy of
the student of its own, takes new weights through ``load_weights``:

* ``hf`` (the default): the student's own KV-cached batched ``generate``
  (:func:`~distillery.train.sampling.sample_continuations`). It reads the live parameters, so
  it is always on-policy and never syncs; its samples are exactly those of the code before
  engines existed.
* ``vllm``: an in-process ``vllm.LLM`` holding its own copy of the student (CUDA only; import
  guarded). It gets the student's weights every ``sync_every`` optimizer steps; rollouts
  between two syncs use the weights of the last one (up to ``sync_every − 1`` steps stale).

:class:`Rollouts` owns the schedule: the objective calls :meth:`Rollouts.tick` once per
``loss`` call (``grad_accum_steps`` calls make one optimizer step) and :meth:`Rollouts.sample`
when the student writes. The weights sent are :func:`engine_weights`: the plain model's
parameters under its Hugging Face checkpoint names; for a LoRA (peft) student the base weights
with the adapters merged in (computed beside the parameters, which are left untouched).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, model_validator
from torch import nn

from distillery.config import StrictModel
from distillery.errors import DistilleryError, MissingExtraError
from distillery.models.lora import is_peft_model
from distillery.train.sampling import sample_continuations, unwrap


class RolloutConfig(StrictModel):
    """``train.objective.rollout``: the engine that writes the student's samples.

    ``engine: hf`` (default) samples with the student's own ``generate``; ``engine: vllm``
    with an in-process vLLM copy of the student (needs ``pip install vllm`` and a CUDA GPU),
    whose weights are replaced by the student's every ``sync_every`` optimizer steps.
    ``vllm_kwargs`` go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``dtype``,
    ``enforce_eager``) over the defaults of :class:`VLLMEngine`.
    """

    engine: Literal["hf", "vllm"] = "hf"
    sync_every: int = Field(1, ge=1)
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kwargs_need_vllm(self) -> RolloutConfig:
        if self.vllm_kwargs and self.engine != "vllm":
            raise ValueError(f"rollout.vllm_kwargs is set but rollout.engine is '{self.engine}': "
                             "set engine: vllm, or remove vllm_kwargs")
        return self


@dataclass(frozen=True)
class RolloutParams:
    """How to sample: the keyword arguments of :func:`~distillery.train.sampling.sample_continuations`."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int = 0
    num_return_sequences: int = 1


@runtime_checkable
class RolloutEngine(Protocol):
    """Writes continuations of token-id prompts; ``own_weights`` engines take new weights.

    ``generate`` returns ``len(prompts) × num_return_sequences`` token-id lists grouped by
    prompt, each cut after its first EOS (kept). ``load_weights`` gets ``(name, tensor)`` pairs
    under the student's Hugging Face checkpoint names (see :func:`engine_weights`) and must
    copy them before returning (the tensors may be the student's live parameters).
    """

    own_weights: bool

    def generate(self, prompts: list[list[int]], params: RolloutParams) -> list[list[int]]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


class HFEngine:
    """The student's own batched, KV-cached ``generate``: reads the live weights, never syncs."""

    own_weights = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def generate(self, prompts: list[list[int]], params: RolloutParams) -> list[list[int]]:
        return sample_continuations(self.model, prompts, **asdict(params))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: the engine is the student."""


def engine_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's weights as a plain checkpoint: ``(name, tensor)`` pairs, tied weights once.

    Names are those of the plain Hugging Face model (``model.layers.0.self_attn.q_proj.weight``),
    which is what vLLM's ``load_weights`` maps onto its own (fused) layout. For a peft (LoRA)
    student each adapted layer's weight is ``base + Σ ΔW`` over its active adapters (peft's
    ``get_delta_weight``: ``scaling · B @ A``), computed as a new tensor: the student keeps
    its unmerged parameters bit for bit (merging and unmerging in place would round them).
    Adapter parameters are not sent.
    """
    model = unwrap(model)
    if not is_peft_model(model):
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if ".lora_" in name or "original_module" in name:
            continue
        tensor = param.detach()
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and leaf == "weight":
            tensor = _merged(modules[owner.removesuffix(".base_layer")], tensor, name)
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        yield plain.replace("modules_to_save.default.", ""), tensor


def _merged(layer: nn.Module, base: torch.Tensor, name: str) -> torch.Tensor:
    """``base`` plus the deltas of ``layer``'s active adapters (none when peft merged them already)."""
    if getattr(layer, "merged", False):
        return base
    if not base.is_floating_point():
        raise DistilleryError(f"{name}: a quantized (QLoRA) base weight cannot be sent to a rollout "
                              "engine; use rollout.engine: hf with lora.quantize 4bit")
    adapters = [a for a in layer.active_adapters if a in getattr(layer, "lora_A", {})]
    for adapter in adapters:
        base = base + layer.get_delta_weight(adapter).to(base.dtype)
    return base


class Rollouts:
    """The student's samples through an engine, its weights synced every ``sync_every`` steps.

    :meth:`tick` is called once per ``loss`` call; ``calls_per_step`` calls (the micro-batches
    of one process, ``train.grad_accum_steps``) make one optimizer step. At a rollout in step
    ``s`` an ``own_weights`` engine is synced when it has never been, or when its weights are
    from step ``s − sync_every`` or older; so with rollouts at every step, syncs happen at steps
    0, N, 2N, ... (counted from the first call) and every rollout in between uses the weights
    sent at the last sync. After a resume the engine syncs at the first rollout.
    """

    def __init__(self, cfg: RolloutConfig, calls_per_step: int = 1, engine: RolloutEngine | None = None) -> None:
        self.cfg = cfg
        self.calls_per_step = calls_per_step
        self.engine = engine
        self.calls = 0
        self.step = 0
        self.synced_step: int | None = None
        self.metrics: dict[str, float] = {}  # of this call's rollout, for the train log

    def tick(self) -> None:
        """One ``loss`` call begins: the step it belongs to is ``calls // calls_per_step``."""
        self.step = self.calls // self.calls_per_step
        self.calls += 1
        self.metrics = {}

    def start(self, student: nn.Module, max_len: int) -> RolloutEngine:
        """The engine, built for ``student`` on first use (errors surface at build time)."""
        if self.engine is None:
            self.engine = make_engine(self.cfg, student, max_len)
        return self.engine

    def sample(self, student: nn.Module, prompts: list[list[int]], params: RolloutParams,
               max_len: int) -> list[list[int]]:
        """Continuations of ``prompts`` by the student. A syncing engine sets :attr:`metrics`:
        ``rollout/synced`` (1.0 when this call sent weights) and ``rollout/staleness``
        (optimizer steps since the weights it sampled with)."""
        engine = self.start(student, max_len)
        if not engine.own_weights:
            return engine.generate(prompts, params)
        synced = self.synced_step is None or self.step - self.synced_step >= self.cfg.sync_every
        if synced:
            engine.load_weights(engine_weights(student))
            self.synced_step = self.step
        self.metrics = {"rollout/synced": float(synced), "rollout/staleness": float(self.step - self.synced_step)}
        return engine.generate(prompts, params)


def make_engine(cfg: RolloutConfig, student: nn.Module, max_len: int) -> RolloutEngine:
    """The engine ``cfg.engine`` names, for ``student`` (sequences up to ``max_len`` tokens)."""
    if cfg.engine == "hf":
        return HFEngine(student)
    return VLLMEngine(student, max_len, cfg.vllm_kwargs)


def check_vllm() -> None:
    """Raise, saying what is missing, unless vllm is installed and a CUDA GPU is visible."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package (pip install vllm)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False here)")
    if missing:
        raise MissingExtraError(f"train.objective.rollout.engine 'vllm' needs {' and '.join(missing)}; "
                                "without them use rollout.engine: hf (the student's own generate)")


class VLLMEngine:
    """An in-process ``vllm.LLM`` holding its own copy of the student (one GPU, TP = 1).

    Follows TRL's colocate mode (trl 1.16, ``trl/generation/vllm_generation.py``,
    ``VLLMGeneration.__init__`` / ``sync_weights``): the engine runs inside the training process
    (``distributed_executor_backend="external_launcher"``), weights go in through the driver
    worker's model, ``llm.llm_engine.model_executor.driver_worker.model_runner.model
    .load_weights([(name, tensor)])``, with Hugging Face checkpoint names (vLLM maps q/k/v and
    gate/up onto its fused layers), and the prefix cache is reset after each sync. The model
    is built from the student's ``config.json`` with ``load_format="dummy"`` (no weights on
    disk): the first rollout syncs before it samples.
    """

    own_weights = True

    def __init__(self, student: nn.Module, max_len: int, vllm_kwargs: dict[str, Any]) -> None:
        check_vllm()
        from vllm import LLM

        # external_launcher reads the torch.distributed rendezvous variables, as under torchrun
        # (set there already; one process otherwise, on a free port as TRL's ensure_master_addr_port)
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        self._dir = tempfile.TemporaryDirectory(prefix="distillery-vllm-")
        plain = unwrap(student)
        config = plain.get_base_model().config if is_peft_model(plain) else plain.config
        config.save_pretrained(self._dir.name)
        kwargs = {"model": self._dir.name, "load_format": "dummy", "skip_tokenizer_init": True,
                  "tensor_parallel_size": 1, "distributed_executor_backend": "external_launcher",
                  "gpu_memory_utilization": 0.3, "max_model_len": max_len, "dtype": "auto",
                  **vllm_kwargs}
        self.llm = LLM(**kwargs)

    def generate(self, prompts: list[list[int]], params: RolloutParams) -> list[list[int]]:
        from vllm import SamplingParams

        eos = params.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        sampling = SamplingParams(n=params.num_return_sequences, temperature=params.temperature,
                                  top_p=params.top_p, max_tokens=params.max_new_tokens, stop_token_ids=eos_ids)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=sampling,
                                    use_tqdm=False)
        out = []
        for request in outputs:  # vLLM keeps the order of the prompts
            for completion in request.outputs:
                ids = list(completion.token_ids)
                cut = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))
                out.append(ids[:cut])
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in weights:  # one tensor at a time, as TRL does: no second full copy
            model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()
