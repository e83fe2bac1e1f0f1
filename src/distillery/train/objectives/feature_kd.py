"""``feature_kd``: hidden states matched through learned projections, plus CE on labels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from distillery.chat import IGNORE
from distillery.config import ObjectiveConfig
from distillery.losses import FeatureDistiller
from distillery.train.objectives.base import (
    BuildContext,
    LossOutput,
    ObjectiveNeeds,
    register_objective,
)
from distillery.train.objectives.sft import sft_data
from distillery.train.packing import model_inputs
from distillery.train.sampling import unwrap
from distillery.train.targets import cross_entropy, shifted_targets


class FeatureKDConfig(ObjectiveConfig):
    """``train.objective: {name: feature_kd, ...}``: which hidden states are matched, and how."""

    name: Literal["feature_kd"] = "feature_kd"
    # student hidden-state index → teacher index (HF ``hidden_states``: 0 = embeddings, -1 = last)
    layer_map: dict[int, int] = Field(default_factory=lambda: {-1: -1})
    loss: Literal["mse", "cosine"] = "mse"
    feature_weight: float = Field(1.0, ge=0)
    relation_weight: float = Field(0.0, ge=0)  # token-to-token similarity structure
    relation_loss: Literal["mse", "kl"] = "mse"
    relation_temperature: float = Field(0.1, gt=0)
    ce_weight: float = Field(1.0, ge=0)

    def resolve_needs(self, declared: ObjectiveNeeds) -> ObjectiveNeeds:
        # the relation term compares every token of a row with every other: rows are not packed
        return ObjectiveNeeds(**{**declared.__dict__, "packing": self.relation_weight == 0})


class FeatureKDObjective:
    """``ce_weight·CE + FeatureDistiller(student hidden states, teacher hidden states)``.

    Hidden states of the mapped layers are matched through learned projections (trained with
    the student, discarded after) and, with ``relation_weight > 0``, so is the token-to-token
    similarity structure. Positions counted are the assistant tokens.
    """

    def __init__(self, cfg: FeatureKDConfig, student_hidden: int, teacher_hidden: int) -> None:
        self.ce_weight = cfg.ce_weight
        self.distiller = FeatureDistiller(
            student_hidden, teacher_hidden, cfg.layer_map, loss=cfg.loss,
            feature_weight=cfg.feature_weight, relation_weight=cfg.relation_weight,
            relation_loss=cfg.relation_loss, relation_temperature=cfg.relation_temperature,
        )
        self.trainable: list[nn.Module] = [self.distiller]

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
             ) -> LossOutput:
        if teacher is None:
            raise ValueError("feature_kd needs a teacher model")
        out = student(**model_inputs(batch), output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(**model_inputs(batch), output_hidden_states=True)
        targets, _ = shifted_targets(batch)
        ce = cross_entropy(out.logits[:, :-1], targets)
        # features are compared where the model reads assistant tokens (labels != IGNORE)
        mask = batch["labels"] != IGNORE
        feat, metrics = self.distiller(out.hidden_states, t_out.hidden_states, mask)
        loss = self.ce_weight * ce + feat
        # a token mean (the relation term is a mean over sequences: weighted by tokens too)
        return LossOutput(loss, float(mask.sum()), {"ce": ce.item(), **{k: float(v) for k, v in metrics.items()}})


def check_layer_map(layer_map: dict[int, int], student_layers: int, teacher_layers: int) -> None:
    """HF returns num_layers + 1 hidden states (embeddings first); every index must exist."""
    for s, t in layer_map.items():
        for who, index, n in (("student", s, student_layers), ("teacher", t, teacher_layers)):
            if not -(n + 1) <= index <= n:
                raise ValueError(
                    f"train.objective.layer_map: {who} layer {index} does not exist: the {who} has "
                    f"{n} layers, so hidden-state indices run from 0 (embeddings) to {n} (or -1)"
                )


def build_feature_objective(cfg: FeatureKDConfig, student: nn.Module, teacher: nn.Module) -> FeatureKDObjective:
    """The objective with projections sized from both models (after checking ``layer_map``)."""
    s_cfg, t_cfg = unwrap(student).config, unwrap(teacher).config
    check_layer_map(cfg.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    return FeatureKDObjective(cfg, s_cfg.hidden_size, t_cfg.hidden_size)


def build(ctx: BuildContext) -> tuple[Dataset, Callable, FeatureKDObjective]:
    if ctx.teacher is None:
        raise ValueError("feature_kd needs the teacher model to size its projections")
    return (*sft_data(ctx), build_feature_objective(ctx.config, ctx.student, ctx.teacher))


register_objective("feature_kd", FeatureKDConfig, ObjectiveNeeds(live_teacher="required", packing=True), build)
