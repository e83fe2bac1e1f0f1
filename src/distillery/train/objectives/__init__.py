"""Training objectives: one module each, one registry (see :mod:`.base` and docs/training.md).

Importing this package registers the built-in objectives: ``sft``, ``logit_kd``,
``feature_kd``, ``on_policy``, ``preference`` and ``reward``. Another objective is one more
module that calls :func:`register_objective`.
"""

from distillery.train.objectives import (  # noqa: F401  (each registers itself)
    feature_kd,
    logit_kd,
    on_policy,
    preference,
    reward,
    sft,
)
from distillery.train.objectives.base import (
    BuildContext,
    LossOutput,
    Objective,
    ObjectiveNeeds,
    UnknownObjectiveError,
    build_training_parts,
    describe,
    get_objective,
    objective_names,
    objective_needs,
    register_objective,
)

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
