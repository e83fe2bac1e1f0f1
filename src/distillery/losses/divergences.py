"""Divergences between a teacher distribution p and a student distribution q, per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Average per-token values [batch, seq] over unmasked positions."""
    if mask is None:
        mask = torch.ones_like(per_token, dtype=torch.bool)
    mask = mask.to(per_token.dtype)
    if reduction == "token":
        return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
    if reduction == "sequence":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.mean()
    raise ValueError(f"reduction must be 'token' or 'sequence', got {reduction!r}")


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "token",
) -> torch.Tensor:
    """KL(p_teacher ‖ q_student) = Σ_v p_v (log p_v − log q_v), averaged over masked positions.

    student_logits, teacher_logits: [batch, seq, vocab]; mask: [batch, seq] bool (True = counted).
    Both sides are divided by ``temperature`` before the softmax.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _reduce(per_token, mask, reduction)
