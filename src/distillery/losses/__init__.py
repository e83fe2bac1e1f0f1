"""Distillation losses: pure functions of student and teacher distributions."""

from distillery.losses.divergences import forward_kl

__all__ = ["forward_kl"]
