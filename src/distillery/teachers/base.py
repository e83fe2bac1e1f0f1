"""The Teacher interface: the same calls for a local model and a remote endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    min_new_tokens: int = 0  # > 0 keeps decoding past the end token (fixed-length speed probes)

    def __post_init__(self) -> None:
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 samples need temperature > 0: greedy decoding gives n identical copies")


@dataclass
class Generation:
    """One sampled continuation: its text, its token count, and why it stopped."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end token) or "length" (max_new_tokens reached)


@dataclass
class GenerationStats:
    """What a generate call cost: tokens produced and wall seconds."""

    tokens: int = 0
    seconds: float = 0.0
    batches: list[tuple[int, int, float]] = field(default_factory=list)  # (batch, tokens, s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Teacher(Protocol):
    """Anything that continues conversations: ``generate(conversations, params)``.

    ``conversations`` is a list of "messages" lists; the result has, per conversation, a list
    of ``params.n`` generations.
    """

    name: str

    def generate(
        self, conversations: list[list[dict]], params: SamplingParams
    ) -> list[list[Generation]]: ...
