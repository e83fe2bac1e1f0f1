"""Evaluation: answers against ground truth, bootstrap CIs, speed, and the report."""

from distillery.evaluate.run import evaluate_model
from distillery.evaluate.stats import bootstrap_ci, bootstrap_ratio, paired_bootstrap_diff

__all__ = ["bootstrap_ci", "bootstrap_ratio", "evaluate_model", "paired_bootstrap_diff"]
