"""Teacher phases: requests in, records out, never losing or repeating work.

This is the engine under every elicitation method, the LLM judge and the judge reward; it sits
with the teachers (below the stages) because all three stages run teachers through it.
Every elicitation method is a few *phases*; each phase is a stream of
:class:`~distillery.teachers.base.GenerationRequest` objects sent to a teacher and a *handler*
that turns each result into records (kept) and rejects (kept too, with the reason).
:func:`run_phase` does the rest:

- results are handled and appended to ``<phase>.jsonl.partial`` / ``<phase>.rejects.jsonl.partial``
  as each request completes (flushed at once, fsynced every ``sync_every`` requests), so a kill
  loses at most what was in flight;
- every line carries ``meta.request_id`` and ``meta.outputs`` (how many lines that request wrote
  over both files); on restart the requests whose lines are all present are done and skipped,
  and the lines of a request cut off mid-write are dropped, so each record ends up exactly once;
- a :class:`ResponseCache` (SQLite, keyed by the hash of teacher + messages + sampling) answers
  requests that were already paid for, so re-runs and re-filtering cost nothing;
- a handler that raises on malformed teacher output turns into a reject with the reason: one bad
  answer never stops the run;
- at the end both files are renamed to their final names atomically; a finished phase is not run
  again;
- a request the teacher could not answer for a reason that may pass (server down, timeouts, 5xx,
  429 through every retry: ``GenerationResult.retryable``) is a reject with ``"retryable": true``
  and is *not* done: a re-run sends it again (its reject line is dropped then). Such a phase is
  finished with a ``<phase>.retry`` marker, and so is every phase that runs after it on the same
  ``out_dir`` in that process (their inputs came from an incomplete phase); a marked phase is
  re-opened by the next run, which sends only what is not done yet. A final failure (a 400, a
  ``too_long`` prompt) stays done.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distillery.files import disk_space
from distillery.records import read_jsonl, write_jsonl_atomic
from distillery.teachers.base import Generation, GenerationRequest, GenerationResult, Teacher


@dataclass
class Outcome:
    """What a handler made of one result: records to keep and (reason, raw text) rejects."""

    records: list[dict] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[GenerationResult], Outcome]
RecordCheck = Callable[[dict], "str | None"]  # a per-record filter: reason to reject, or None


class MalformedOutput(ValueError):
    """Raised by a handler when the teacher's text cannot be parsed; becomes a reject."""


@dataclass
class PhaseSummary:
    """Counts for one phase (the CLI prints them; summary.json keeps them)."""

    name: str
    requests: int = 0
    cached: int = 0
    resumed: int = 0  # requests found finished in the output of an earlier run
    records: int = 0
    rejects: int = 0
    failed: int = 0  # requests of the phase the teacher could not answer (after retries)
    retryable: int = 0  # of those, the ones a re-run sends again
    total: int = 0  # requests of the phase done so far (this run and earlier ones)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- response cache


class ResponseCache:
    """Teacher answers by request hash, in SQLite (one file, safe across kills and threads)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT)")

    def get(self, key: str) -> list[Generation] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return [Generation(**g) for g in json.loads(row[0])] if row else None

    def put(self, key: str, generations: list[Generation]) -> None:
        value = json.dumps([asdict(g) for g in generations], ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, value))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- phase output files


class PhaseFiles:
    """``<phase>.jsonl`` and ``<phase>.rejects.jsonl`` with their ``.partial`` forms."""

    def __init__(self, out_dir: str | Path, name: str) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.records = out_dir / f"{name}.jsonl"
        self.rejects = out_dir / f"{name}.rejects.jsonl"

    @staticmethod
    def partial(path: Path) -> Path:
        return path.with_name(path.name + ".partial")

    @property
    def finished(self) -> bool:
        return self.records.exists() and self.rejects.exists()

    @property
    def retry_marker(self) -> Path:
        """Present while the phase holds retryable failures or was built on a phase that did."""
        return self.records.with_name(self.records.name.removesuffix(".jsonl") + ".retry")

    def recover(self) -> set[str]:
        """Finished request ids; drops torn lines, the lines of unfinished requests and those of
        requests that failed retryably (so they are sent again).

        A final file is moved back to its ``.partial`` form first: that re-opens a finished phase,
        and mends a phase killed between the two renames of :meth:`finish`."""
        for path in (self.records, self.rejects):
            if path.exists() and not self.partial(path).exists():
                os.replace(path, self.partial(path))
        files = [self.partial(self.records), self.partial(self.rejects)]
        lines = {p: _complete_lines(p) for p in files}
        seen: Counter[str] = Counter()
        expected: dict[str, int] = {}
        retry: set[str] = set()
        for rows in lines.values():
            for row in rows:
                rid = row["meta"]["request_id"]
                seen[rid] += 1
                expected[rid] = row["meta"]["outputs"]
                if row.get("retryable"):
                    retry.add(rid)
        done = {rid for rid, n in seen.items() if n == expected[rid] and rid not in retry}
        for path, rows in lines.items():
            keep = [r for r in rows if r["meta"]["request_id"] in done]
            if len(keep) != len(rows) or _has_torn_tail(path):
                write_jsonl_atomic(path, keep)
        return done

    def open(self) -> tuple:
        return (self.partial(self.records).open("a", encoding="utf-8"),
                self.partial(self.rejects).open("a", encoding="utf-8"))

    def finish(self) -> None:
        for path in (self.records, self.rejects):
            part = self.partial(path)
            if not part.exists():
                part.touch()
            os.replace(part, path)


def _complete_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a torn last line from a killed writer
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _has_torn_tail(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"




# --------------------------------------------------------------------------- progress


class PhaseProgress:
    """A rich bar with records/s, tokens/s, ETA, requests in flight, retries and rejects.

    Off a terminal (CI logs, ``nohup``) it prints a plain line every ``plain_every_s`` seconds
    instead of redrawing a bar.
    """

    def __init__(self, name: str, total: int | None, teacher: Teacher, show: bool = True,
                 plain_every_s: float = 30.0) -> None:
        self.teacher, self.name = teacher, name
        self.t0 = time.perf_counter()
        self.tokens0 = teacher.stats.tokens
        self.retries0 = teacher.stats.retries
        self.console = Console(stderr=True)
        self.plain = show and not self.console.is_terminal
        self.plain_every_s, self._last_plain = plain_every_s, self.t0
        columns = (
            TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
        )
        self.progress = Progress(*columns, console=self.console, disable=not show or self.plain)
        self.task = self.progress.add_task(name, total=total, rate="", extra="")
        self.done = self.records = self.rejects = 0

    def __enter__(self) -> PhaseProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, advance: int, records: int, rejects: int) -> None:
        self.done += advance
        self.records += records
        self.rejects += rejects
        line = self.describe()
        self.progress.update(self.task, advance=advance, rate=line[0], extra=line[1])
        now = time.perf_counter()
        if self.plain and now - self._last_plain >= self.plain_every_s:
            self._last_plain = now
            self.console.print(f"{self.name}: {self.done} requests, {line[0]}, {line[1]}")

    def describe(self) -> tuple[str, str]:
        s = self.teacher.stats
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = f"{self.records / dt:.1f} rec/s {(s.tokens - self.tokens0) / dt:.0f} tok/s"
        extra = (f"in flight {s.in_flight} · retries {s.retries - self.retries0} · "
                 f"rejects {self.rejects}")
        return rate, extra


# --------------------------------------------------------------------------- the phase runner


def run_phase(
    name: str,
    requests: Iterable[GenerationRequest],
    teacher: Teacher,
    handle: Handler,
    out_dir: str | Path,
    *,
    cache: ResponseCache | None = None,
    checks: list[tuple[str, RecordCheck]] = (),
    total: int | None = None,
    sync_every: int = 64,
    show_progress: bool = True,
) -> tuple[Path, PhaseSummary]:
    """Send ``requests`` to ``teacher``; write what ``handle`` makes of each to ``<name>.jsonl``.

    ``checks`` are per-record filters (name, check) applied to every record a handler returns;
    a failing record goes to the rejects file with the filter's name and reason. Returns the
    final records path and the phase's counts. A phase whose files are already final is not run
    again (its summary is rebuilt from the files).
    """
    files = PhaseFiles(out_dir, name)
    summary = PhaseSummary(name)
    earlier = _earlier_phases(out_dir, name)
    if files.finished and not files.retry_marker.exists():
        earlier.append((name, False))
        return files.records, _summary_from_files(name, files)
    done = files.recover()
    summary.resumed = len(done)
    stats0 = (teacher.stats.tokens, teacher.stats.prompt_tokens)
    t0 = time.perf_counter()
    hits: deque[GenerationResult] = deque()  # cache hits (todo() may run in the teacher's thread)

    def todo() -> Iterator[GenerationRequest]:
        for req in requests:
            if req.id in done:
                continue
            cached = cache.get(req.cache_key(teacher.name)) if cache is not None else None
            if cached is not None:
                hits.append(GenerationResult(req, cached, cached=True))
            else:
                yield req

    f_rec, f_rej = files.open()
    pending_sync = 0
    with PhaseProgress(name, total, teacher, show=show_progress) as progress:
        progress.update(len(done), 0, 0)

        def consume(result: GenerationResult) -> None:
            nonlocal pending_sync
            if cache is not None and result.ok and not result.cached:
                cache.put(result.request.cache_key(teacher.name), result.generations)
            recs, rejs = _outcome(result, handle, checks, teacher.name)
            _write_request(f_rec, f_rej, result.request, recs, rejs)
            summary.requests += 1
            summary.cached += result.cached
            summary.failed += not result.ok
            summary.records += len(recs)
            summary.rejects += len(rejs)
            for r in rejs:
                key = r["reason"].split(":")[0]
                summary.reject_reasons[key] = summary.reject_reasons.get(key, 0) + 1
            progress.update(1, len(recs), len(rejs))
            pending_sync += 1
            if pending_sync >= sync_every:
                _sync(f_rec, f_rej)
                pending_sync = 0

        # a full disk (the response cache, the .partial files, or their flush on close): one
        # error; what was written before it is complete and resumes
        where = f"{files.records.parent}" + (f" or {cache.path}" if cache is not None else "")
        with disk_space(where, f"the {name} phase's teacher results",
                        "every request finished before it is kept (response cache and .partial "
                        "files)"):
            try:
                for result in teacher.stream(todo()):
                    while hits:
                        consume(hits.popleft())
                    consume(result)
                while hits:
                    consume(hits.popleft())
            finally:
                _sync(f_rec, f_rej)
                f_rec.close()
                f_rej.close()
    final = _summary_from_files(name, files, partial=True)
    incomplete = bool(final.retryable) or any(flag for _, flag in earlier)
    if incomplete:
        files.retry_marker.touch()  # before the rename: a kill in between leaves it unfinished
        files.finish()
    else:
        files.finish()
        files.retry_marker.unlink(missing_ok=True)
    earlier.append((name, incomplete))
    summary.tokens = teacher.stats.tokens - stats0[0]
    summary.prompt_tokens = teacher.stats.prompt_tokens - stats0[1]
    summary.seconds = time.perf_counter() - t0
    summary.records, summary.rejects, summary.reject_reasons = (
        final.records, final.rejects, final.reject_reasons)
    summary.failed, summary.retryable, summary.total = final.failed, final.retryable, final.total
    return files.records, summary


# the phases this process ran on each out_dir, in order, each with whether it finished
# incomplete (retryable failures, or run after a phase that had them): a phase that runs after
# an incomplete one was fed from partial output, so the next run re-opens it too
_HISTORY: dict[str, list[tuple[str, bool]]] = {}


def _earlier_phases(out_dir: str | Path, name: str) -> list[tuple[str, bool]]:
    """The history of ``out_dir`` before ``name``: when ``name`` ran before, a new run of the
    same pipeline has begun, and what ran from ``name`` on belongs to the old one."""
    history = _HISTORY.setdefault(str(Path(out_dir).resolve()), [])
    names = [n for n, _ in history]
    if name in names:
        del history[names.index(name):]
    return history
# reject reasons of a request that got no answer from the teacher
FAILURE_REASONS = ("teacher_error", "too_long")


def _outcome(result: GenerationResult, handle: Handler, checks: list[tuple[str, RecordCheck]],
             teacher_name: str) -> tuple[list[dict], list[dict]]:
    """Records and reject lines for one result; nothing a handler does escapes as an exception."""
    req = result.request
    raw = "\n---\n".join(g.text for g in result.generations)
    if not result.ok:
        line = _reject_line(req, f"{result.error_kind}: {result.error}", raw, teacher_name)
        if result.retryable:
            line["retryable"] = True
        return [], [line]
    try:
        outcome = handle(result)
    except Exception as exc:  # malformed output or a handler bug: keep the evidence, go on
        kind = "malformed" if isinstance(exc, MalformedOutput) else f"handler_error {type(exc).__name__}"
        return [], [_reject_line(req, f"{kind}: {exc}", raw, teacher_name)]
    records, rejects = [], [_reject_line(req, reason, text, teacher_name)
                            for reason, text in outcome.rejects]
    for rec in outcome.records:
        reason = next(((n, r) for n, c in checks if (r := c(rec)) is not None), None)
        if reason is None:
            records.append(rec)
        else:
            rejects.append(_reject_line(req, f"filter_{reason[0]}: {reason[1]}",
                                        json.dumps(rec, ensure_ascii=False), teacher_name))
    return records, rejects


def _reject_line(req: GenerationRequest, reason: str, raw: str, teacher_name: str) -> dict:
    return {"id": f"{req.id}-reject", "reason": reason, "raw": raw,
            "messages": list(req.messages), "meta": {**req.meta, "teacher": teacher_name}}


def _write_request(f_rec, f_rej, req: GenerationRequest, records: list[dict], rejects: list[dict]) -> None:  # noqa: ANN001
    """Append one request's lines to both files, each line tagged with its request and count."""
    n = len(records) + len(rejects)
    if n == 0:  # a request that yields nothing still has to be remembered as done
        rejects = [_reject_line(req, "empty: the handler produced no record", "", "")]
        n = 1
    for rows, f in ((rejects, f_rej), (records, f_rec)):
        if not rows:
            continue
        lines = []
        for row in rows:
            row.setdefault("meta", {})
            row["meta"]["request_id"], row["meta"]["outputs"] = req.id, n
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        f.write("".join(lines))
        f.flush()


def _sync(*files) -> None:  # noqa: ANN002
    for f in files:
        if not f.closed:
            f.flush()
            os.fsync(f.fileno())


def _summary_from_files(name: str, files: PhaseFiles, partial: bool = False) -> PhaseSummary:
    """Counts of the phase's final files (``partial``: of their ``.partial`` forms)."""
    paths = [files.partial(p) if partial else p for p in (files.records, files.rejects)]
    recs, rejs = (read_jsonl(p) if p.exists() else [] for p in paths)
    reasons = Counter(r["reason"].split(":")[0] for r in rejs)
    failed = [r for r in rejs if r["reason"].split(":")[0] in FAILURE_REASONS]
    total = len({r["meta"]["request_id"] for r in recs + rejs})
    return PhaseSummary(name, records=len(recs), rejects=len(rejs), reject_reasons=dict(reasons),
                        requests=total, total=total, failed=len(failed),
                        retryable=sum(bool(r.get("retryable")) for r in failed))


def read_phase(path: Path, key: Callable[[dict], object] | None = None) -> list[dict]:
    """The rows of a finished phase file (none when it is not there), sorted by ``key`` if given."""
    rows = read_jsonl(path) if path.exists() else []
    return sorted(rows, key=key) if key else rows
