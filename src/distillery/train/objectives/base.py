"""What an objective is, what it returns, and how it is registered.

An objective turns a collated batch into a :class:`LossOutput`; the loop
(:func:`distillery.train.loop.train_loop`) knows nothing else about it:

* ``loss(batch, student, teacher) -> LossOutput``: ``loss`` is a mean over ``count`` units
  (tokens, sequences, pairs). The loop backpropagates ``loss × count`` and divides the summed
  gradients by the global count, so a step's gradient is the same however its global batch is
  split over processes and micro-batches;
* ``trainable``: modules besides the student that the optimizer updates (e.g. feature
  projections), saved in checkpoints;
* optionally ``state_dict() -> dict`` (JSON values) and ``load_state_dict(state)``: state of
  its own to resume (e.g. a random generator).

``student`` may arrive wrapped (DDP): call it for forward passes, use
:func:`~distillery.train.sampling.unwrap` for ``generate``/``config``. ``teacher`` is the live
teacher (None when the objective needs none, or reads a logit cache).

Each objective is one module of this package: its config (a subclass of
:class:`~distillery.config.ObjectiveConfig`), its :class:`ObjectiveNeeds`, and a ``build(ctx)``
that returns ``(dataset, collator, objective)``, registered with :func:`register_objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from distillery.config import ObjectiveConfig, TrainConfig, TrainJobConfig
from distillery.logits.cache import LogitCache
from distillery.objective_registry import (
    ObjectiveEntry,
    ObjectiveNeeds,
    UnknownObjectiveError,
    get_objective,
    objective_names,
    objective_needs,
)
from distillery.objective_registry import register_objective as _register


@dataclass
class LossOutput:
    """One micro-batch's loss: a scalar mean over ``count`` units, and what to log.

    ``metrics`` are floats averaged by the loop over the step's micro-batches, weighted by
    ``count``; the loop logs ``loss`` itself, so it need not be repeated there.
    """

    loss: torch.Tensor
    count: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    trainable: list[nn.Module]

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module,
             teacher: nn.Module | None) -> LossOutput: ...


@dataclass
class BuildContext:
    """What ``build(ctx)`` gets: the job, its records and models, set up before training starts.

    ``job.train.objective`` is this objective's validated config (:attr:`config`); ``teacher``
    is the live teacher (None when the objective needs none or ``cache`` stands in for it);
    ``student`` is the model as it starts training (LoRA applied, no checkpoint loaded yet).
    """

    job: TrainJobConfig
    records: list[dict]
    tokenizer: PreTrainedTokenizerBase
    student: nn.Module
    teacher: nn.Module | None = None
    cache: LogitCache | None = None
    show_progress: bool = True

    @property
    def train(self) -> TrainConfig:
        return self.job.train

    @property
    def config(self) -> Any:
        """The objective's own config (``train.objective``), typed by its module."""
        return self.job.train.objective


Build = Callable[[BuildContext], tuple[Dataset, Callable, Objective]]


def register_objective(name: str, config_model: type[ObjectiveConfig], needs: ObjectiveNeeds,
                       build: Build) -> ObjectiveEntry:
    """Register an objective: ``train.objective: {name: <name>, ...}`` validates with
    ``config_model``, the job's checks read ``needs``, and ``distillery train`` calls
    ``build(ctx)`` for its ``(dataset, collator, objective)``."""
    return _register(name, config_model, needs, build)


def build_training_parts(ctx: BuildContext) -> tuple[Dataset, Callable, Objective]:
    """``(dataset, collator, objective)`` of the job's objective, from its registry entry."""
    return get_objective(ctx.config.name).build(ctx)


def describe(config: BaseModel) -> str:
    """``name (key=value, ...)`` of an objective config: its name and the keys set off default."""
    keys = config.model_dump(mode="json", exclude_defaults=True, exclude={"name"})
    return config.name + (f" ({', '.join(f'{k}={v}' for k, v in keys.items())})" if keys else "")  # type: ignore[attr-defined]


__all__ = [
    "BuildContext",
    "LossOutput",
    "Objective",
    "ObjectiveNeeds",
    "UnknownObjectiveError",
    "build_training_parts",
    "describe",
    "get_objective",
    "objective_names",
    "objective_needs",
    "register_objective",
]
