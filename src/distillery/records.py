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
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distillery.errors import DistilleryError


class RecordError(DistilleryError, ValueError):
    """A record file that does not follow the contract, naming the file and line."""


def sft_record(
    id: str,
    prompt: str | list[dict[str, str]],
    answer: str,
    reference: str | None,
    method: str,
    teacher: str | None = None,
    seed_id: str | None = None,
    sampling: dict | None = None,
    **meta: Any,
) -> dict:
    """A "messages" record: the prompt's turns and one assistant turn, with provenance.

    ``prompt``: the user turn's text, or the turns themselves (e.g. a system turn and the user
    turn, as :func:`distillery.chat.task_messages` builds them).
    """
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return {
        "id": id,
        "messages": [*turns, {"role": "assistant", "content": answer}],
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
    """SFT records of task problems with their own answers (``target``: "chain" or "answer").

    The prompt turns are each problem's ``messages`` (its task's system prompt and prompt
    template, see :func:`distillery.chat.task_messages`), exactly what evaluation sends.
    """
    return [
        sft_record(p.id, p.messages, p.target(target), p.reference, method="ground_truth",
                   seed_id=p.id, target=target)
        for p in problems
    ]


# The text of a record, as filters, deduplication and the contamination check read it: SFT
# records (prompt = user turns, response = final assistant turn) and preference records
# (prompt = the prompt's user turns, response = the chosen reply) alike.


def _message_text(messages: Any, role: str | None) -> list[str]:
    if isinstance(messages, str):
        return [messages]
    return [
        m.get("content") or ""
        for m in messages or []
        if isinstance(m, dict) and (role is None or m.get("role") == role)
    ]


def prompt_of(record: dict[str, Any]) -> str:
    """The prompt text: the user turns of ``messages`` (SFT) or of ``prompt`` (preference)."""
    if "prompt" in record:
        return "\n".join(_message_text(record["prompt"], "user"))
    return "\n".join(_message_text(record.get("messages"), "user"))


def response_of(record: dict[str, Any]) -> str:
    """The response text: the final assistant turn of ``messages`` (SFT) or of ``chosen``."""
    turns = record["chosen"] if "chosen" in record else record.get("messages")
    texts = _message_text(turns, "assistant") if not isinstance(turns, str) else [turns]
    return texts[-1] if texts else ""


def record_text(record: dict[str, Any]) -> str:
    """Prompt and response together: the default key of the deduplication filters."""
    return prompt_of(record) + "\n" + response_of(record)


_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Lowercase word tokens for n-gram overlap: words, and each punctuation or operator sign
    on its own (``22+55*2`` is 5 tokens), so arithmetic problems compare sign by sign."""
    return _WORD.findall(text.casefold())


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
