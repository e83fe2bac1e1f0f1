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

import torch
from torch import nn

from distillery.config import TrainConfig
from distillery.losses import LossSpec
from distillery.train.objectives import live_kd_loss, loss_count
from distillery.train.sampling import (
    batch_prompts,
    continuation_batch,
    sample_continuations,
    unwrap,
)


class OnPolicyObjective:
    """GKD / MiniLLM-style / seq_kd distillation with a live teacher (see the module doc).

    ``eos_token_id`` (one id or several) ends a sampled continuation (the EOS is kept, so the
    student learns to stop); ``pad_token_id`` pads generation and the rebuilt batches. The
    on/off-policy coin comes from a ``random.Random`` seeded with ``cfg.seed``: runs with the
    same seed flip the same coins, and :meth:`state_dict` lets a resumed run continue them.
    """

    needs_teacher = True

    def __init__(self, cfg: TrainConfig, eos_token_id: int | list[int] | None, pad_token_id: int) -> None:
        spec = cfg.resolved_loss()
        if spec.form == "sparse":
            raise ValueError(
                "train.loss.form 'sparse' reads teacher top-k from a logit cache, but on_policy "
                "needs a live teacher to score text sampled during training: use form 'dense' or 'fused'"
            )
        if pad_token_id is None:
            raise ValueError("on_policy needs a pad token id to batch sampled continuations "
                             "(the tokenizer's pad_token_id)")
        op = cfg.on_policy
        self.spec = spec
        self.on_policy_spec = _without_ce(spec)
        self.lmbda = op.resolved_lmbda
        self.seq_kd = op.seq_kd
        self.max_seq_len = cfg.max_seq_len
        self.max_new_tokens = op.max_new_tokens
        self.sampling = {"temperature": op.temperature, "top_p": op.top_p,
                         "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        self.rng = random.Random(cfg.seed)
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

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Divergence (and CE off-policy) on the continuations chosen by this call's coin.

        ``batch``: a collated "messages" batch (``input_ids``/``attention_mask``/``labels``
        ``[batch, seq]``, prompt tokens unlabeled). Metrics: ``loss``, ``kd/<divergence>``,
        ``ce`` (off-policy, when the spec has CE), ``count`` (counted units), ``on_policy``
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
        metrics.update(count=loss_count(batch, spec), on_policy=float(on_policy), gen_tokens=gen_tokens)
        return loss, metrics

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


__all__ = ["OnPolicyObjective"]
