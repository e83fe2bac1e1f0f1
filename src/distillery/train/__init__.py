"""Training: the loop, objectives, data preparation and the ``distillery train`` job."""

from distillery.train.data import Collator, SFTDataset, tokenize_messages
from distillery.train.loop import TrainResult, train_loop
from distillery.train.objectives import LogitKDObjective, SFTObjective, build_objective

__all__ = [
    "Collator",
    "LogitKDObjective",
    "SFTDataset",
    "SFTObjective",
    "TrainResult",
    "build_objective",
    "tokenize_messages",
    "train_loop",
]
