"""``on_policy``: distillation on text the student writes itself (GKD, MiniLLM-style, seq_kd).

Off-policy distillation (``logit_kd``) only shows the student text someone else wrote, so at
inference it meets prefixes of its own making that it never learned from (exposure bias).
GKD (arXiv 2306.13649) fixes that by mixing in the student's own samples: on each call, with
probability λ the student samples continuations of the batch's prompts and the teacher scores
them token by token; otherwise the continuation is the record's own (teacher-written) text, or
with ``seq_kd`` one the teacher generates now. MiniLLM (arXiv 2306.08543) trains reverse
KL(student‖teacher) on student samples; here that is the token-level form: λ = 1 and the
``reverse_kl`` divergence (MiniLLM's sequence-level policy gradient is not implemented).

The divergence is any :class:`~distillery.losses.LossSpec` (``dense`` or ``fused``; ``sparse``
needs a logit cache, and a cache cannot score text sampled during training). On on-policy
batches the CE term of the spec is dropped: CE on the student's own samples would only raise
the probability of whatever it happened to write, mistakes included. Gradients do not flow
through sampling (as in GKD): the samples are data, the divergence on them is the loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from distillery.config import ObjectiveConfig
from distillery.losses import LossSpec
from distillery.train.objectives.base import (
    BuildContext,
    LossOutput,
    ObjectiveNeeds,
    register_objective,
)
from distillery.train.objectives.logit_kd import check_loss_shorthand, live_kd_loss, loss_count
from distillery.train.objectives.sft import sft_data
from distillery.train.sampling import (
    batch_prompts,
    continuation_batch,
    sample_continuations,
    unwrap,
)


class OnPolicyConfig(ObjectiveConfig):
    """``train.objective: {name: on_policy, ...}``: GKD (arXiv 2306.13649) and MiniLLM-style
    reverse KL on student samples.

    Each step, with probability ``lmbda`` the student samples the continuations of the batch's
    prompts and the teacher scores them token by token; otherwise the continuation is the
    record's own (teacher-written) text, or with ``seq_kd`` one the teacher generates now.
    ``temperature``/``top_p`` are the sampling's. The divergence is ``loss`` (default:
    generalized JSD, β = 0.5, as GKD; ``variant: minillm``: reverse KL(student‖teacher) and
    λ = 1), at ``loss.temperature``; ``kd_ratio`` adds ``(1 − kd_ratio)·CE`` off-policy.
    """

    name: Literal["on_policy"] = "on_policy"
    variant: Literal["gkd", "minillm"] = "gkd"
    lmbda: float | None = Field(None, ge=0, le=1)  # null: 0.5 for gkd, 1.0 for minillm
    seq_kd: bool = False
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)  # sampling; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    kd_ratio: float | None = Field(None, ge=0, le=1)
    loss: LossSpec | None = None

    @model_validator(mode="after")
    def _one_way_to_say_the_loss(self) -> OnPolicyConfig:
        check_loss_shorthand(self.loss, self.kd_ratio, None)
        return self

    @property
    def resolved_lmbda(self) -> float:
        if self.lmbda is not None:
            return self.lmbda
        return 1.0 if self.variant == "minillm" else 0.5

    def resolved_loss(self) -> LossSpec:
        """``loss`` as given, else GKD's JSD (β = 0.5) or MiniLLM's reverse KL, no CE unless kd_ratio."""
        if self.loss is not None:
            return self.loss
        div = {"divergence": "reverse_kl"} if self.variant == "minillm" else {"divergence": "jsd", "beta": 0.5}
        return LossSpec(**div, kd_ratio=self.kd_ratio, temperature=1.0)


class OnPolicyObjective:
    """GKD / MiniLLM-style / seq_kd distillation with a live teacher (see the module doc).

    ``eos_token_id`` (one id or several) ends a sampled continuation (the EOS is kept, so the
    student learns to stop); ``pad_token_id`` pads generation and the rebuilt batches. The
    on/off-policy coin comes from a ``random.Random`` seeded with ``cfg.seed``: runs with the
    same seed flip the same coins, and :meth:`state_dict` lets a resumed run continue them.
    """

    def __init__(self, cfg: OnPolicyConfig, eos_token_id: int | list[int] | None, pad_token_id: int, *,
                 max_seq_len: int, seed: int = 0) -> None:
        spec = cfg.resolved_loss()
        if spec.form == "sparse":
            raise ValueError(
                "train.objective.loss.form 'sparse' reads teacher top-k from a logit cache, but on_policy "
                "needs a live teacher to score text sampled during training: use form 'dense' or 'fused'"
            )
        if pad_token_id is None:
            raise ValueError("on_policy needs a pad token id to batch sampled continuations "
                             "(the tokenizer's pad_token_id)")
        self.spec = spec
        self.on_policy_spec = _without_ce(spec)
        self.lmbda = cfg.resolved_lmbda
        self.seq_kd = cfg.seq_kd
        self.max_seq_len = max_seq_len
        self.max_new_tokens = cfg.max_new_tokens
        self.sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                         "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        self.rng = random.Random(seed)
        self.trainable: list[nn.Module] = []

    # ------------------------------------------------------------------ the coin and its state

    def draw_on_policy(self) -> bool:
        """Flip the next coin: True (probability λ) = the student writes this batch's continuations."""
        return self.rng.random() < self.lmbda

    def state_dict(self) -> dict:
        """The coin generator's state as JSON values (``random.Random.getstate`` with lists)."""
        version, internal, gauss_next = self.rng.getstate()
        return {"rng": [version, list(internal), gauss_next]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss_next = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss_next))

    # ------------------------------------------------------------------ the loss

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
             ) -> LossOutput:
        """Divergence (and CE off-policy) on the continuations chosen by this call's coin.

        ``batch``: a collated "messages" batch (``input_ids``/``attention_mask``/``labels``
        ``[batch, seq]``, prompt tokens unlabeled). Metrics: ``loss``, ``kd/<divergence>``,
        ``ce`` (off-policy, when the spec has CE), ``on_policy``
        (1.0 / 0.0) and ``gen_tokens`` (mean generated length; 0 when nothing was generated).
        """
        if teacher is None:
            raise ValueError("on_policy needs a teacher model: it scores every continuation")
        _check_vocab(unwrap(student), unwrap(teacher))
        on_policy = self.draw_on_policy()
        gen_tokens = 0.0
        if on_policy or self.seq_kd:
            prompts = _prompts(batch)
            writer = student if on_policy else teacher
            continuations = self._sample(writer, prompts)
            gen_tokens = sum(map(len, continuations)) / len(continuations)
            device = next(student.parameters()).device
            rebuilt = continuation_batch(prompts, continuations, self.sampling["pad_token_id"], self.max_seq_len)
            batch = {k: v.to(device) for k, v in rebuilt.items()}
        spec = self.on_policy_spec if on_policy else self.spec
        loss, metrics = live_kd_loss(spec, batch, student, teacher)
        metrics.update(on_policy=float(on_policy), gen_tokens=gen_tokens)
        return LossOutput(loss, loss_count(batch, spec), metrics)

    def _sample(self, model: nn.Module, prompts: list[list[int]]) -> list[list[int]]:
        # tokens past max_seq_len are cut from every row anyway: do not generate them
        room = self.max_seq_len - min(map(len, prompts))
        return sample_continuations(model, prompts, max_new_tokens=max(1, min(self.max_new_tokens, room)),
                                    **self.sampling)


def _without_ce(spec: LossSpec) -> LossSpec:
    """``spec`` with its CE weight set to 0 and its divergence weights unchanged."""
    if spec.kd_ratio is not None:
        return spec.model_copy(update={"kd_ratio": None, "kd_weight": spec.kd_ratio, "ce_weight": 0.0})
    return spec.model_copy(update={"ce_weight": 0.0})


def _prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    prompts = batch_prompts(batch)
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(
                f"on_policy: batch row {row} has no prompt tokens (its first token is already a "
                "trained assistant token): the student continues a prompt, so every record needs "
                "a user (or system) turn before the assistant's"
            )
    return prompts


def _check_vocab(student: nn.Module, teacher: nn.Module) -> None:
    # checked before any sampling: a mismatch would otherwise surface only after generation
    s_vocab, t_vocab = student.config.vocab_size, teacher.config.vocab_size
    if s_vocab != t_vocab:
        raise ValueError(
            f"on_policy: teacher vocabulary ({t_vocab}) differs from the student's ({s_vocab}): the "
            "teacher scores the student's tokens, so both need the same tokenizer (give the "
            "student tokenizer.path: <teacher dir>)"
        )


def build(ctx: BuildContext) -> tuple[Dataset, Callable, OnPolicyObjective]:
    """The records' batches (their prompts are continued); eos/pad from the tokenizer or model."""
    model_cfg = unwrap(ctx.student).config
    tok = ctx.tokenizer
    eos = getattr(tok, "eos_token_id", None) or getattr(model_cfg, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else getattr(model_cfg, "pad_token_id", None)
    if eos is None or pad is None:
        raise ValueError("on_policy samples continuations and needs the tokenizer's eos and pad tokens")
    objective = OnPolicyObjective(ctx.config, eos_token_id=eos, pad_token_id=pad,
                                  max_seq_len=ctx.train.max_seq_len, seed=ctx.train.seed)
    return (*sft_data(ctx), objective)


register_objective("on_policy", OnPolicyConfig, ObjectiveNeeds(live_teacher="required", samples=True), build)
