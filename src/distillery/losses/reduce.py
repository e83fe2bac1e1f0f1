"""Masks and reductions: which aligned positions count, and how per-token values are averaged.

Convention (shift-free): position t of the student and the teacher predicts ``labels[:, t]``;
the caller shifts (``logits[:, :-1]`` vs ``input_ids[:, 1:]``) before calling any loss here.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
REDUCTIONS = ("token", "sequence")


def resolve_mask(
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    shape: torch.Size | tuple[int, ...],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The bool mask ``[batch, seq]`` of counted positions (True = counted).

    ``mask`` (bool ``[batch, seq]``) and ``labels`` (int ``[batch, seq]``, ``-100`` = ignore) are
    combined with AND; with neither, every position counts. ``shape`` is ``[batch, seq]``.
    """
    out: torch.Tensor | None = None
    if mask is not None:
        out = mask.bool().to(device) if device is not None else mask.bool()
    if labels is not None:
        keep = labels != IGNORE_INDEX
        keep = keep.to(device) if device is not None else keep
        out = keep if out is None else out & keep
    if out is None:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"mask/labels shape {tuple(out.shape)} != positions shape {tuple(shape)}")
    return out


def token_weights(mask: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """Per-position weights ``[batch, seq]`` so that ``loss = Σ weights · per_token``.

    * ``"token"``: 1/N on each of the N counted tokens of the whole batch (mean over tokens).
    * ``"sequence"``: 1/(n_b · B') on the n_b counted tokens of sequence b, where B' is the number
      of sequences with at least one counted token (mean within a sequence, then over sequences).
      A 1-D mask is treated as one sequence.

    Uncounted positions get weight 0. With no counted token at all, every weight is 0 (loss 0).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    m = mask.to(dtype)
    if reduction == "token" or m.dim() == 1:
        return m / m.sum().clamp_min(1.0)
    per_seq = m.sum(-1, keepdim=True)
    n_seq = (per_seq > 0).sum().clamp_min(1).to(dtype)
    return m / per_seq.clamp_min(1.0) / n_seq


def reduce_per_token(
    per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str = "token"
) -> torch.Tensor:
    """Reduce per-position values ``[batch, seq]`` to a scalar over counted positions.

    Uncounted positions are replaced by 0 before weighting, so a nan/inf there cannot leak in.
    """
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device)
    mask = mask.to(per_token.device).bool()
    w = token_weights(mask, reduction, per_token.dtype)
    vals = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    return (vals * w).sum()
