"""``sft``: next-token cross entropy on assistant tokens (the "messages" records' answers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from distillery.config import ObjectiveConfig
from distillery.train.data import Collator, SFTDataset
from distillery.train.objectives.base import (
    BuildContext,
    LossOutput,
    ObjectiveNeeds,
    register_objective,
)
from distillery.train.packing import PackedCollator, model_inputs
from distillery.train.targets import cross_entropy, shifted_targets


class SFTConfig(ObjectiveConfig):
    """``train.objective: sft``: no keys of its own."""

    name: Literal["sft"] = "sft"


class SFTObjective:
    """Mean cross entropy over the batch's assistant tokens."""

    def __init__(self) -> None:
        self.trainable: list[nn.Module] = []

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module,
             teacher: nn.Module | None = None) -> LossOutput:
        logits = student(**model_inputs(batch)).logits
        targets, mask = shifted_targets(batch)
        ce = cross_entropy(logits[:, :-1], targets)
        return LossOutput(ce, float(mask.sum()), {"ce": ce.item()})


def sft_data(ctx: BuildContext) -> tuple[Dataset, Callable]:
    """Tokenized "messages" records and their collator (packed rows with ``train.packing``)."""
    train, pad = ctx.train, ctx.tokenizer.pad_token_id
    dataset = SFTDataset(ctx.records, ctx.tokenizer, train.max_seq_len)
    return dataset, PackedCollator(pad, train.max_seq_len) if train.packing else Collator(pad)


def build(ctx: BuildContext) -> tuple[Dataset, Callable, SFTObjective]:
    return (*sft_data(ctx), SFTObjective())


register_objective("sft", SFTConfig, ObjectiveNeeds(packing=True), build)
