"""The Teacher interface: the same calls for a local model and a remote endpoint.

Two ways to call a teacher:

- ``generate(conversations, params)``: a list of "messages" conversations in, per conversation
  a list of ``params.n`` :class:`Generation` out, in order. Simple and blocking.
- ``stream(requests)``: :class:`GenerationRequest` objects in, :class:`GenerationResult` objects
  out *as they complete* (not in order). The elicitation engine uses this, so every finished
  request is written to disk at once, whatever happens to the ones still in flight. A failed
  request comes back as a result with ``error`` set; it never raises.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

from distillery.errors import DistilleryError


class TeacherError(DistilleryError, RuntimeError):
    """A teacher's requests failed after its retries (server down, model error); names the
    teacher and the request, so the endpoint or model can be fixed and the job re-run."""


class TeacherUnavailableError(TeacherError):
    """A teacher's requests failed on errors another try may pass (server down, timeouts, 5xx,
    429) after all their retries: a caller that can wait (training) tries again later."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    min_new_tokens: int = 0  # > 0 keeps decoding past the end token (fixed-length speed probes)
    stop: tuple[str, ...] = ()  # cut the text at the first of these strings

    def __post_init__(self) -> None:
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 samples need temperature > 0: greedy decoding gives n identical copies")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class Generation:
    """One sampled continuation: its text, its token count, and why it stopped."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end token / stop string) or "length" (max_new_tokens reached)
    prompt_tokens: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """One unit of work for a teacher: a conversation to continue, with its sampling.

    ``id`` names the request in output files (the engine resumes by it); ``meta`` rides along
    untouched so a method can find its bookkeeping (seed problem, phase, ...) in the result.
    """

    id: str
    messages: tuple[dict, ...] | list[dict]
    params: SamplingParams = SamplingParams()
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    def cache_key(self, teacher: str) -> str:
        """A hash of what decides the answer (teacher, messages, sampling), not of the id."""
        blob = json.dumps(
            {"teacher": teacher, "messages": list(self.messages), "params": self.params.to_dict()},
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class GenerationResult:
    """What came back for one request: ``params.n`` generations, or an error message.

    A failed request says whether another try may succeed (``retryable``: the server was down,
    timed out, answered 5xx or 429 through every retry) or not (a 400, a prompt that does not
    fit): a re-run of the phase sends the retryable ones again. ``error_kind`` becomes the
    reject's reason (``teacher_error``, or ``too_long`` for a prompt longer than the context).
    """

    request: GenerationRequest
    generations: list[Generation] = field(default_factory=list)
    error: str | None = None
    cached: bool = False
    retryable: bool = False
    error_kind: str = "teacher_error"

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class GenerationStats:
    """What a teacher has cost so far, and what it is doing now (for progress bars)."""

    tokens: int = 0  # generated tokens
    prompt_tokens: int = 0
    seconds: float = 0.0
    requests: int = 0  # finished requests (ok or failed)
    failures: int = 0  # requests that gave up after their retries
    retries: int = 0
    in_flight: int = 0
    batches: list[tuple[int, int, float]] = field(default_factory=list)  # (batch, tokens, s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Teacher(Protocol):
    """Anything that continues conversations; see the module docstring for the two calls."""

    name: str
    stats: GenerationStats

    def generate(
        self, conversations: list[list[dict]], params: SamplingParams
    ) -> list[list[Generation]]: ...

    def stream(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]: ...


def generate_via_stream(
    teacher: Teacher, conversations: list[list[dict]], params: SamplingParams
) -> list[list[Generation]]:
    """``generate`` written with ``stream``: ordered results; a failed request raises."""
    reqs = [GenerationRequest(str(i), conv, params) for i, conv in enumerate(conversations)]
    out: list[list[Generation] | None] = [None] * len(reqs)
    for res in teacher.stream(reqs):
        if res.error is not None:
            raise TeacherError(f"teacher {teacher.name}: request {res.request.id} failed: {res.error}")
        out[int(res.request.id)] = res.generations
    return out  # type: ignore[return-value]
