"""Dense and sparse (top-k teacher) forms: per-token divergences with autograd.

Shapes: student logits ``[batch, seq, vocab]``; dense teacher logits ``[batch, seq, vocab]``;
sparse teacher ids ``[batch, seq, k]`` (int64), log-probs ``[batch, seq, k]`` and optional log
tail mass ``[batch, seq]``. Positions are already aligned with the targets (no shift here).

Temperature T divides the student logits and the teacher logits (dense) or the teacher
log-probabilities (sparse: ``log p / T``, then renormalized over the support; exact when the
teacher was captured at T = 1 and the support is the whole vocabulary).

Tail policies for a sparse teacher (``K`` = the k ids of the position, ``V`` = vocabulary):

* ``renormalize``: support = K. Teacher: ``softmax(log p_K / T)`` (the tail is dropped and the
  top-k renormalized); student: ``softmax(z_K / T)``, i.e. its distribution restricted to K and
  renormalized. Measures how well the student ranks the teacher's candidates, blind to the mass
  the student puts elsewhere.
* ``tail_bucket``: support = K + one bucket. Teacher bucket = the given tail mass (or
  ``1 − Σ_K p``); student bucket = ``1 − Σ_K q = Σ_{v∉K} q_v`` (computed as a log-sum-exp over the
  non-top-k logits, so it is accurate when tiny). At T ≠ 1 the teacher's k + 1 masses are raised
  to ``1/T`` and renormalized (the bucket acts as one outcome).
* ``uniform_tail``: support = V. The teacher's tail mass is spread evenly over the ``V − k``
  ids outside K; the result is compared with the student's full softmax, as in the dense form.

With k = V (every id present) all three equal the dense form. A teacher tail mass of 0 is floored
at ``exp(LOG_TAIL_FLOOR)`` so that reverse-type divergences stay finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distillery.logits.topk import teacher_log_tail
from distillery.losses.divergences import upcast
from distillery.losses.terms import Term

TAIL_POLICIES = ("renormalize", "tail_bucket", "uniform_tail")


def _check_policy(policy: str) -> None:
    if policy not in TAIL_POLICIES:
        raise ValueError(f"tail_policy must be one of {TAIL_POLICIES}, got {policy!r}")


def sparse_teacher_log_probs(
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor | None,
    policy: str,
    temperature: float,
    vocab: int,
) -> torch.Tensor:
    """The teacher's log-probabilities over the policy's support (see module doc).

    Returns ``[..., k]`` (renormalize, or tail_bucket with k = V), ``[..., k + 1]`` (tail_bucket),
    or ``[..., V]`` (uniform_tail).
    """
    _check_policy(policy)
    lp = upcast(teacher_logprobs)
    k = lp.shape[-1]
    if policy == "renormalize" or (policy == "tail_bucket" and k == vocab):
        return F.log_softmax(lp / temperature, dim=-1)
    tail = teacher_log_tail(lp, None if teacher_tail is None else upcast(teacher_tail))
    if policy == "tail_bucket":
        return F.log_softmax(torch.cat([lp, tail.unsqueeze(-1)], dim=-1) / temperature, dim=-1)
    # uniform_tail
    fill = tail - math.log(max(vocab - k, 1))
    full = fill.unsqueeze(-1).expand(*lp.shape[:-1], vocab).clone()
    full.scatter_(-1, teacher_ids, lp)
    return F.log_softmax(full / temperature, dim=-1)


def sparse_student_log_probs(
    scaled_logits: torch.Tensor, teacher_ids: torch.Tensor, policy: str
) -> torch.Tensor:
    """The student's log-probabilities over the same support, from logits already divided by T."""
    _check_policy(policy)
    vocab, k = scaled_logits.shape[-1], teacher_ids.shape[-1]
    if policy == "uniform_tail":
        return F.log_softmax(scaled_logits, dim=-1)
    picked = scaled_logits.gather(-1, teacher_ids)
    if policy == "renormalize" or k == vocab:
        return F.log_softmax(picked, dim=-1)
    lse = torch.logsumexp(scaled_logits, dim=-1, keepdim=True)
    outside = scaled_logits.scatter(-1, teacher_ids, float("-inf"))
    log_bucket = torch.logsumexp(outside, dim=-1, keepdim=True)
    return torch.cat([picked, log_bucket], dim=-1) - lse


def mix_per_token(
    log_p: torch.Tensor, log_q: torch.Tensor, terms: list[Term]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_i w_i·D_i`` per position ``[...]`` and each unweighted ``D_i`` by name."""
    total = torch.zeros(log_p.shape[:-1], dtype=log_q.dtype, device=log_q.device)
    parts: dict[str, torch.Tensor] = {}
    for term in terms:
        value = term.divergence.value(log_p, log_q, **term.params)
        parts[term.name] = value
        total = total + term.weight * value
    return total, parts


def dense_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    terms: list[Term],
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense form: ``[batch, seq, vocab]`` logits on both sides -> per-token mix ``[batch, seq]``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ"
        )
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1)
    return mix_per_token(log_p, log_q, terms)


def sparse_per_token(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor | None,
    terms: list[Term],
    temperature: float = 1.0,
    tail_policy: str = "tail_bucket",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sparse form: student logits ``[batch, seq, vocab]``, teacher top-k -> per-token mix."""
    vocab = student_logits.shape[-1]
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids.shape)} / logprobs {tuple(teacher_logprobs.shape)} "
            f"do not match student logits {tuple(student_logits.shape)}"
        )
    ids = teacher_ids.long()
    log_p = sparse_teacher_log_probs(
        ids, teacher_logprobs.detach(), None if teacher_tail is None else teacher_tail.detach(),
        tail_policy, temperature, vocab,
    )
    log_q = sparse_student_log_probs(upcast(student_logits) / temperature, ids, tail_policy)
    return mix_per_token(log_p, log_q, terms)


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy at T = 1 on the labels, ``[batch, seq]``; 0 where ``labels == -100``."""
    flat = F.cross_entropy(
        upcast(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
        ignore_index=-100, reduction="none",
    )
    return flat.reshape(labels.shape)
