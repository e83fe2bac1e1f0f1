"""Teachers: the Teacher protocol and its backends."""

from distillery.teachers.base import Generation, GenerationStats, SamplingParams, Teacher
from distillery.teachers.hf import HFTeacher

__all__ = ["Generation", "GenerationStats", "HFTeacher", "SamplingParams", "Teacher"]
