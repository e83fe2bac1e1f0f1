"""The records that flow between stages (see DESIGN.md "Data contracts"), and their JSONL files.

An SFT record::

    {"id": str, "messages": [{"role", "content"}...], "reference": str | None,
     "meta": {"method", "teacher", "seed_id", "sampling", "created", ...}}

JSONL files are written through :class:`JsonlWriter`, which appends to ``<file>.partial`` and
renames to the final name only when the job is complete, so a killed job resumes from the
partial file and never leaves a half-written final file behind.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A record file that does not follow the contract, naming the file and line."""


def sft_record(
    id: str,
    prompt: str,
    answer: str,
    reference: str | None,
    method: str,
    teacher: str | None = None,
    seed_id: str | None = None,
    sampling: dict | None = None,
    **meta: Any,
) -> dict:
    """A "messages" record: one user turn and one assistant turn, with provenance."""
    return {
        "id": id,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "reference": reference,
        "meta": {
            "method": method,
            "teacher": teacher,
            "seed_id": seed_id,
            "sampling": sampling or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **meta,
        },
    }


def ground_truth_records(problems: Iterable, target: str) -> list[dict]:
    """SFT records of task problems with their own answers (``target``: "chain" or "answer")."""
    return [
        sft_record(p.id, p.prompt, p.target(target), p.reference, method="ground_truth",
                   seed_id=p.id, target=target)
        for p in problems
    ]


def iter_jsonl(path: str | Path, error: type[ValueError] = RecordError) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line; a bad line raises ``error`` naming
    the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every JSON object of a JSONL file; a bad line is an error naming the file and line."""
    return [value for _, value in iter_jsonl(path)]


ROLES = ("system", "user", "assistant")


def check_messages(msgs: object, where: str, key: str = "messages") -> None:
    """``msgs`` (the record's ``key``) is a non-empty list of ``{"role", "content"}`` with
    known roles and string contents; an error starts with ``where`` (file and record)."""
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(f'{where}: needs a non-empty "{key}" list of messages '
                          '([{"role": ..., "content": ...}])')
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RecordError(f'{where}: each "{key}" message needs role system/user/assistant')
        if not isinstance(m.get("content"), str):
            raise RecordError(f'{where}: "{key}" message "content" must be a string')


def validate_sft_records(records: list[dict], source: str) -> None:
    """Check the "messages" contract: roles, string contents, a final assistant turn."""
    for i, rec in enumerate(records, 1):
        msgs = rec.get("messages")
        check_messages(msgs, f"{source}: record {i}")
        if msgs[-1]["role"] != "assistant":
            raise RecordError(f"{source}: record {i}: the last message must be the assistant's")


class JsonlWriter:
    """Append records to ``path.partial``; ``finish()`` renames it to ``path`` atomically.

    ``done_ids()`` tells a resumed job which records it already wrote. Each write is flushed
    and fsynced, so a killed process loses at most the record being written; a torn last line
    is dropped on resume.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._f = self.partial.open("a", encoding="utf-8")

    def _repair(self) -> None:
        if not self.partial.exists():
            return
        data = self.partial.read_bytes()
        if data and not data.endswith(b"\n"):
            # a torn write from a killed process: keep every complete line
            self.partial.write_bytes(data[: data.rfind(b"\n") + 1])

    def done_ids(self) -> set[str]:
        if not self.partial.exists():
            return set()
        with self.partial.open(encoding="utf-8") as f:
            return {json.loads(line)["id"] for line in f if line.strip()}

    def write(self, records: Iterable[dict]) -> None:
        for rec in records:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def finish(self) -> Path:
        self._f.close()
        os.replace(self.partial, self.path)
        return self.path


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """JSONL rows through a temp file, fsync and rename: the file is old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temp file and rename it over ``path`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
    os.replace(tmp, path)
