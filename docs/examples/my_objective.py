"""A label-smoothed cross entropy objective: one file and one register call."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from distillery.config import ObjectiveConfig
from distillery.train.objectives import BuildContext, LossOutput, ObjectiveNeeds, register_objective
from distillery.train.objectives.sft import sft_data
from distillery.train.packing import model_inputs
from distillery.train.targets import shifted_targets


class SmoothedCEConfig(ObjectiveConfig):
    """``train.objective: {name: smoothed_ce, smoothing: 0.1}``"""

    name: Literal["smoothed_ce"] = "smoothed_ce"
    smoothing: float = Field(0.1, ge=0, lt=1)  # probability mass spread over the vocabulary


class SmoothedCE:
    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing
        self.trainable: list[torch.nn.Module] = []  # no modules of its own to train

    def loss(self, batch: dict[str, torch.Tensor], student: torch.nn.Module,
             teacher: torch.nn.Module | None = None) -> LossOutput:
        logits = student(**model_inputs(batch)).logits[:, :-1]  # packed rows too
        targets, mask = shifted_targets(batch)  # logits[:, t] predicts token t + 1
        loss = F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=self.smoothing)
        # a mean over the assistant tokens: the loop weights micro-batches by that count
        return LossOutput(loss, count=float(mask.sum()), metrics={"smoothed_ce": loss.item()})


def build(ctx: BuildContext) -> tuple:
    dataset, collator = sft_data(ctx)  # "messages" records, labels on assistant tokens
    return dataset, collator, SmoothedCE(ctx.config.smoothing)


register_objective("smoothed_ce", SmoothedCEConfig, ObjectiveNeeds(packing=True), build)
