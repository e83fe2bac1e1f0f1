"""Training objectives: each turns a batch into a scalar loss; the loop knows nothing else.

An objective is any object with ``needs_teacher: bool`` and
``loss(batch, student, teacher) -> (loss, metrics)``. Logits are shifted here, once:
``logits[:, t]`` predicts ``input_ids[:, t + 1]``, and positions whose label is ``IGNORE``
(prompt, padding) do not count.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distillery.losses import forward_kl
from distillery.train.data import IGNORE


class Objective(Protocol):
    needs_teacher: bool

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


def shifted_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[batch, seq-1]`` aligned with ``logits[:, :-1]``, and their mask (True = counted)."""
    targets = batch["labels"][:, 1:]
    return targets, targets != IGNORE


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy; logits ``[batch, seq, vocab]`` aligned with targets ``[batch, seq]``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


class SFTObjective:
    """Next-token cross entropy on assistant tokens only (the "messages" records' answers)."""

    needs_teacher = False

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets, _ = shifted_targets(batch)
        ce = cross_entropy(logits[:, :-1], targets)
        return ce, {"ce": ce.item()}


class LogitKDObjective:
    """(1 − kd_ratio)·CE + kd_ratio·KL(teacher ‖ student), teacher run live in the same process.

    The teacher runs in eval mode under ``no_grad`` on the same batch; both distributions are
    softened by ``temperature``. Teacher and student must share a tokenizer.
    """

    needs_teacher = True

    def __init__(self, kd_ratio: float = 0.5, temperature: float = 1.0) -> None:
        self.kd_ratio = kd_ratio
        self.temperature = temperature

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if teacher is None:
            raise ValueError("logit_kd needs a teacher model")
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_logits = student(**inputs).logits[:, :-1]
        with torch.no_grad():
            t_logits = teacher(**inputs).logits[:, :-1]
        if t_logits.shape[-1] != s_logits.shape[-1]:
            raise ValueError(
                f"teacher vocabulary ({t_logits.shape[-1]}) differs from the student's "
                f"({s_logits.shape[-1]}): logit_kd needs a shared tokenizer; use SFT on "
                "teacher-written data, or a cross-tokenizer objective"
            )
        targets, mask = shifted_targets(batch)
        ce = cross_entropy(s_logits, targets)
        kl = forward_kl(s_logits, t_logits, mask=mask, temperature=self.temperature)
        loss = (1 - self.kd_ratio) * ce + self.kd_ratio * kl
        return loss, {"ce": ce.item(), "kl": kl.item()}


def build_objective(name: str, kd_ratio: float = 0.5, temperature: float = 1.0) -> Objective:
    """The objective a config names."""
    if name == "sft":
        return SFTObjective()
    if name == "logit_kd":
        return LogitKDObjective(kd_ratio=kd_ratio, temperature=temperature)
    raise ValueError(f"unknown objective {name!r}; valid: sft, logit_kd")
