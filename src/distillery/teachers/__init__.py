"""Teachers: the Teacher protocol and its backends (local HF, OpenAI-compatible HTTP, vLLM)."""

from distillery.config import TeacherConfig
from distillery.teachers.base import (
    Generation,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    SamplingParams,
    Teacher,
)
from distillery.teachers.hf import HFTeacher

__all__ = [
    "Generation",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "HFTeacher",
    "SamplingParams",
    "Teacher",
    "build_teacher",
]


def build_teacher(cfg: TeacherConfig) -> Teacher:
    """The backend ``cfg.backend`` names; remote and vLLM backends are imported only when used."""
    if cfg.backend == "hf":
        teacher = HFTeacher.from_pretrained(cfg.model, batch_size=cfg.batch_size, device=cfg.device,
                                            trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)
        return teacher
    if cfg.backend == "openai":
        from distillery.teachers.openai import OpenAITeacher

        return OpenAITeacher.from_config(cfg)
    from distillery.teachers.vllm import VLLMTeacher

    return VLLMTeacher.from_config(cfg)
