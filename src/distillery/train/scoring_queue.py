"""Scoring the next batches while the student updates: a worker thread and a bounded queue.

With a teacher off the training machine, scoring a batch is mostly waiting for HTTP (which
releases the GIL), so it can run while the student's forward, backward and optimizer step
run. The objective submits a batch's sequences (:meth:`ScoringQueue.submit`) as soon as they
are sampled, and takes the scores when its loss needs them (:meth:`ScoringQueue.result`);
one worker thread scores the jobs in order. The queue holds at most ``maxsize`` jobs not yet
started, so sampling never runs more than ``staleness`` batches ahead.

What is hidden is measured per job: ``scoring_s`` (the worker's time on it) and ``waited_s``
(how long the training thread blocked in :meth:`result`); ``1 − waited / scoring`` is the
share of the scoring time the overlap hid.

A teacher that is down (:class:`~distillery.teachers.base.TeacherUnavailableError`: its
client's retries ran out on connection errors, timeouts, 5xx) is tried again, every few
seconds, for ``retry_for_s``; training waits meanwhile and continues when it answers.

:class:`BatchSchedule` says which micro-batch the loop draws at a given call (the data order
is a function of seed and step, :mod:`distillery.train.batches`), so the samples of the next
batch can be taken before the loop asks for its loss.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from distillery.config import TrainConfig
from distillery.teachers.base import TeacherUnavailableError
from distillery.train.batches import global_batch, micro_batches

console = Console(stderr=True)
RETRY_EVERY_S = (0.5, 5.0)  # first and longest pause between tries of a teacher that is down


@dataclass
class Ticket:
    """One submitted job: its result (or error) once the worker is done, and its timings."""

    job: Any
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    scoring_s: float = 0.0
    waited_s: float = 0.0
    retries: int = 0


class ScoringQueue:
    """Runs ``score(job)`` for each submitted job on one worker thread, in submission order."""

    def __init__(self, score: Callable[[Any], Any], maxsize: int = 1, retry_for_s: float = 600.0) -> None:
        self.score, self.retry_for_s = score, retry_for_s
        self.jobs: queue.Queue[Ticket | None] = queue.Queue(maxsize=max(1, maxsize))
        self.thread = threading.Thread(target=self._work, name="teacher-scoring-queue", daemon=True)
        self.thread.start()
        self.total_scoring_s = 0.0
        self.total_waited_s = 0.0

    def submit(self, job: Any) -> Ticket:
        """Queue ``job`` (blocks while ``maxsize`` jobs wait to start); returns its ticket."""
        ticket = Ticket(job)
        self.jobs.put(ticket)
        return ticket

    def result(self, ticket: Ticket) -> Any:
        """The job's result, waiting for it; the worker's error is raised here."""
        t0 = time.perf_counter()
        while not ticket.done.wait(timeout=1.0):
            if not self.thread.is_alive():
                raise RuntimeError("the teacher scoring thread stopped unexpectedly")
        ticket.waited_s = time.perf_counter() - t0
        self.total_scoring_s += ticket.scoring_s
        self.total_waited_s += ticket.waited_s
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def metrics(self, ticket: Ticket) -> dict[str, float]:
        """``scoring/seconds``, ``scoring/waited_s``, ``scoring/hidden`` (this job) and
        ``scoring/hidden_total`` (the run so far), for the train log."""
        return {"scoring/seconds": ticket.scoring_s, "scoring/waited_s": ticket.waited_s,
                "scoring/hidden": hidden_share(ticket.scoring_s, ticket.waited_s),
                "scoring/hidden_total": hidden_share(self.total_scoring_s, self.total_waited_s),
                "scoring/retries": float(ticket.retries)}

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _work(self) -> None:
        while (ticket := self.jobs.get()) is not None:
            t0 = time.perf_counter()
            try:
                ticket.result = self._score_waiting(ticket)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                ticket.error = exc
            ticket.scoring_s = time.perf_counter() - t0
            ticket.done.set()

    def _score_waiting(self, ticket: Ticket) -> Any:
        """``score(job)``, tried again while the teacher is down, for up to ``retry_for_s``."""
        first_failure: float | None = None
        pause = RETRY_EVERY_S[0]
        while True:
            try:
                return self.score(ticket.job)
            except TeacherUnavailableError as exc:
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                if now - first_failure >= self.retry_for_s:
                    raise TeacherUnavailableError(
                        f"{exc} — still failing after waiting {now - first_failure:.0f} s "
                        "(train.objective.scoring.retry_for_s): start the teacher server, then "
                        "resume with --resume") from exc
                ticket.retries += 1
                console.print(f"[yellow]teacher unavailable, training waits and tries again in {pause:.1f} s:"
                              f"[/yellow] {exc}", soft_wrap=True)
                time.sleep(pause)
                pause = min(RETRY_EVERY_S[1], pause * 2)


def hidden_share(scoring_s: float, waited_s: float) -> float:
    """The share of ``scoring_s`` the training thread did not wait for, in [0, 1] (1 when nothing to hide)."""
    if scoring_s <= 0:
        return 1.0
    return min(1.0, max(0.0, 1.0 - waited_s / scoring_s))


@dataclass
class BatchSchedule:
    """The micro-batch the training loop draws at each objective call (0-based over the run).

    Mirrors :func:`distillery.train.loop._step`: call ``c`` is micro-batch ``c % grad_accum_steps``
    of optimizer step ``c // grad_accum_steps + 1``. A prediction is only a prefetch: the
    objective checks it against the batch the loop passes.
    """

    dataset: torch.utils.data.Dataset
    collate: Callable
    cfg: TrainConfig

    def batch(self, call: int) -> dict[str, torch.Tensor] | None:
        from accelerate import PartialState

        m = self.cfg.grad_accum_steps
        step, j = call // m + 1, call % m
        if step > self.cfg.steps:
            return None
        state = PartialState()
        indices = global_batch(len(self.dataset), self.cfg.batch_size, self.cfg.seed, step - 1)
        share = micro_batches(indices, state.process_index, state.num_processes, m)[j]
        return self.collate([self.dataset[i] for i in share])
