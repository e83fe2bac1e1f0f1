"""Training: the loop, objectives, data preparation and the ``distillery train`` job."""

from distillery.train.data import Collator, SFTDataset
from distillery.train.loop import TrainResult, train_loop
from distillery.train.objectives import LossOutput, register_objective
from distillery.train.objectives.logit_kd import LogitKDObjective
from distillery.train.objectives.sft import SFTObjective

__all__ = [
    "Collator",
    "LogitKDObjective",
    "LossOutput",
    "SFTDataset",
    "SFTObjective",
    "TrainResult",
    "register_objective",
    "train_loop",
]
