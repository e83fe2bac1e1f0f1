"""Next-token targets of a collated batch, shared by every objective and its helpers.

Logits are shifted once, here: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, and
positions whose label is ``IGNORE`` (prompt, padding) do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillery.chat import IGNORE
from distillery.train.packing import model_inputs


def shifted_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[batch, seq-1]`` aligned with ``logits[:, :-1]``, and their mask (True = counted)."""
    targets = batch["labels"][:, 1:]
    return targets, targets != IGNORE


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy; logits ``[batch, seq, vocab]`` aligned with targets ``[batch, seq]``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def teacher_inputs(batch: dict[str, torch.Tensor], teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The batch's model inputs on the teacher's device (it may live on another device or the CPU)."""
    device = next(teacher.parameters()).device
    return {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
