"""A teacher's next-token distribution as top-k: the one in-memory form that teachers produce
(``logprobs``), logit caches store and load (:mod:`.format`), and the sparse and fused losses
consume. It lives in the core so that teachers and caches need not import the losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG_TAIL_FLOOR = -80.0  # log of the smallest tail mass kept: reverse-type divergences stay finite


@dataclass
class TeacherTopK:
    """Teacher as top-k: ``ids``/``logprobs`` ``[batch, seq, k]`` (or ``[tokens, k]``), and the
    log tail mass ``[batch, seq]`` (or ``[tokens]``), optional."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor | None = None


def teacher_log_tail(
    teacher_logprobs: torch.Tensor, teacher_log_tail: torch.Tensor | None = None
) -> torch.Tensor:
    """Log of the teacher mass outside its top k, ``[...]``: the given one, else ``log(1 − Σ p_K)``;
    floored at ``LOG_TAIL_FLOOR``."""
    if teacher_log_tail is None:
        top = torch.logsumexp(teacher_logprobs, dim=-1).clamp_max(0.0)
        # log(1 − e^top) = log(−expm1(top)); −expm1 is accurate when top is close to 0
        teacher_log_tail = torch.log(-torch.expm1(top))
    return teacher_log_tail.clamp_min(LOG_TAIL_FLOOR)
