"""A deterministic, rule-based judge backend for tests: a real ``Teacher``, no model behind it.

It reads the judge prompts that distillery's templates render (the MT-Bench markers
``[The Start of Assistant A's Answer]`` ...) and answers by a rule, so a test knows exactly
what a perfect judge, a position-biased judge or a length-biased judge would say:

- :func:`always` — the same position every time (``[[A]]``): pure position bias;
- :func:`prefers_correct` — the answer that matches the reference (``[[C]]`` when both or
  neither do);
- :func:`prefers_longer` — the longer answer with probability ``σ(k·tanh(|Δlen|/scale))``,
  drawn from a hash of the two answers (the same in both orders, so no position bias);
- :func:`grade_by_reference` — pointwise: ``Score: 9`` right, ``Score: 3`` wrong, ``Score: 5``
  without a reference, and a refusal (no score) when the answer has no final answer at all.

:func:`serve_rules` puts rules behind a real OpenAI-compatible HTTP endpoint (``/v1/models``,
``/v1/chat/completions``), so a config's ``eval.judge`` (``backend: openai``) reaches them
exactly as it would reach ``distillery serve`` or a hosted judge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from distillery.answers import extract_final_answer
from distillery.tasks import is_correct
from distillery.teachers.base import (
    Generation,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    SamplingParams,
    generate_via_stream,
)


def _section(text: str, title: str) -> str | None:
    m = re.search(rf"\[The Start of {re.escape(title)}\]\n(.*?)\n\[The End of {re.escape(title)}\]", text, re.S)
    return m.group(1) if m else None


@dataclass
class View:
    """What the judge prompt shows: one answer (pointwise) or two (pairwise), and a reference."""

    answers: list[str]
    reference: str | None

    @classmethod
    def parse(cls, prompt: str) -> View:
        reference = _section(prompt, "Reference Answer")
        pair = [_section(prompt, "Assistant A's Answer"), _section(prompt, "Assistant B's Answer")]
        if None not in pair:
            return cls(pair, reference)  # type: ignore[arg-type]
        single = _section(prompt, "Assistant's Answer")
        if single is None:
            raise ValueError(f"not a judge prompt: {prompt[:80]!r}")
        return cls([single], reference)


Rule = Callable[[View], str]


class Crash(RuntimeError):
    """What a judge that "dies" mid-run raises (a killed process, for resume tests)."""


class RuleJudge:
    """A ``Teacher`` (``generate``/``stream``) whose replies come from ``rule``.

    ``crash_after``: raise :class:`Crash` after that many answered requests, as a killed run
    would stop. ``stats.requests`` counts the requests it answered.
    """

    def __init__(self, rule: Rule, name: str = "rule-judge", crash_after: int | None = None) -> None:
        self.rule, self.name, self.crash_after = rule, name, crash_after
        self.stats = GenerationStats()

    def generate(self, conversations: list[list[dict]], params: SamplingParams) -> list[list[Generation]]:
        return generate_via_stream(self, conversations, params)

    def stream(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        for req in requests:
            if self.crash_after is not None and self.stats.requests >= self.crash_after:
                raise Crash(f"{self.name} stopped after {self.stats.requests} requests")
            text = self.rule(View.parse(req.messages[-1]["content"]))
            self.stats.requests += 1
            self.stats.tokens += len(text.split())
            yield GenerationResult(req, [Generation(text, len(text.split()), "stop")])


# --------------------------------------------------------------------------- rules


def always(position: str) -> Rule:
    return lambda view: f"Both are fine; I pick the {position} one. [[{position}]]"


def prefers_correct(view: View) -> str:
    a, b = (is_correct(x, view.reference or "") for x in view.answers)
    return "[[C]]" if a == b else ("[[A]]" if a else "[[B]]")


def unit_hash(*parts: str) -> float:
    """A uniform number in [0, 1) from text: deterministic 'randomness'."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prefers_longer(strength: float, scale: float) -> Rule:
    def rule(view: View) -> str:
        a, b = view.answers
        if a == b:
            return "[[C]]"
        longer, shorter = sorted((a, b), key=lambda s: (-len(s), s))
        p_longer = 1 / (1 + math.exp(-strength * math.tanh((len(longer) - len(shorter)) / scale)))
        winner = longer if unit_hash(longer, shorter) < p_longer else shorter
        return "[[A]]" if winner == a else "[[B]]"

    return rule


def grade_by_reference(view: View) -> str:
    answer = view.answers[0]
    if extract_final_answer(answer).answer is None:
        return "I cannot grade this: the response never states a final answer."
    if view.reference is None:
        return "Rationale: an answer, but nothing to check it against.\nScore: 5"
    if is_correct(answer, view.reference):
        return "Rationale: matches the reference.\nScore: 9"
    return "Rationale: differs from the reference.\nScore: 3"


# --------------------------------------------------------------------------- over HTTP


def judge_rule(pairwise: Rule, pointwise: Rule = grade_by_reference) -> Rule:
    """One rule for both kinds of judge prompt: ``pairwise`` for two answers, else ``pointwise``."""
    return lambda view: pairwise(view) if len(view.answers) == 2 else pointwise(view)


@contextlib.contextmanager
def serve_rules(rule: Rule, model: str = "rule-judge") -> Iterator[tuple[str, list[str]]]:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 answering every judge prompt by ``rule``.

    Yields ``(base_url, prompts)``: ``prompts`` collects every user message it was sent, so a
    test can count the judge calls. A prompt that is not a judge prompt gets HTTP 400.
    """
    prompts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"]
            prompts.append(text)
            try:
                reply = rule(View.parse(text))
            except ValueError as exc:
                self._send(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
                return
            self._send(200, {"id": f"rule-{len(prompts)}", "object": "chat.completion", "model": model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": len(text.split()), "completion_tokens": len(reply.split())}})

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", prompts
    finally:
        server.shutdown()
        server.server_close()
