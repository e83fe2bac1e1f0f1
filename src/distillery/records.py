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
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from distillery.errors import DistilleryError
from distillery.files import decode_utf8, disk_space


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


def iter_jsonl(path: str | Path, error: type[DistilleryError] = RecordError
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; a line that is not UTF-8, not JSON,
    or a JSON value other than an object raises ``error`` naming the file and line."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            # decoded line by line: the error names the line, and a large file is never whole in memory
            line = decode_utf8(raw, path, error, first_line=lineno)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise error(f"{path}:{lineno}: each line must be a JSON object {{...}}, got "
                            f"{_json_kind(value)}")
            yield lineno, value


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


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


def drop_empty_answers(records: list[dict], source: str) -> list[dict]:
    """The valid "messages" records without those that have an empty (or blank) assistant turn.

    Training on an empty answer teaches the model to stop at once, and a teacher that returns
    nothing produces such records, so they are left out with one warning that names ``source``
    and counts them; when every record is empty that is an error.
    """
    empty = [i for i, rec in enumerate(records, 1)
             if any(m["role"] == "assistant" and not m["content"].strip() for m in rec["messages"])]
    if not empty:
        return records
    shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
    what = (f"{source}: {len(empty)} of {len(records)} records have an empty assistant turn "
            f"(records {shown})")
    if len(empty) == len(records):
        raise RecordError(f"{what}: nothing to train on; fill in the answers")
    Console(stderr=True).print("[yellow]warning:[/yellow] " + escape(
        f"{what}: they are left out, since training on them teaches the model to answer "
        "nothing; remove them or fill in their answers"), soft_wrap=True)
    drop = set(empty)
    return [rec for i, rec in enumerate(records, 1) if i not in drop]


_warned_nonfinite: set[str] = set()


def _finite(value: Any, key: str, bad: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(key or "(value)")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{key}.{k}" if key else str(k), bad) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, f"{key}[{i}]", bad) for i, v in enumerate(value)]
    return value


def json_text(obj: Any, where: str | Path, **kwargs: Any) -> str:
    """``json.dumps(obj)`` that never writes NaN or Infinity, which are not JSON (``jq``, JS and
    most readers reject the file): each non-finite float becomes ``null``, with one warning per
    file ``where`` naming the keys. Every JSON file distillery writes goes through this."""
    bad: list[str] = []
    clean = _finite(obj, "", bad)
    if bad and str(where) not in _warned_nonfinite:
        _warned_nonfinite.add(str(where))
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        Console(stderr=True).print(
            "[yellow]warning:[/yellow] " + escape(f"{where}: {len(bad)} value(s) not a finite number "
                                                  f"({shown}) written as null (JSON has no NaN or "
                                                  "Infinity)"), soft_wrap=True)
    return json.dumps(clean, allow_nan=False, **kwargs)


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
        with disk_space(self.partial, "records", f"the complete records before it are kept in "
                        f"{self.partial} (a torn last line is dropped on resume)"):
            for rec in records:
                self._f.write(json_text(rec, self.path, ensure_ascii=False) + "\n")
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
    with _atomic(path, tmp), tmp.open("w", encoding="utf-8") as f:
        f.writelines(json_text(r, path, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temp file and rename it over ``path`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _atomic(path, tmp):
        tmp.write_text(json_text(obj, path, indent=2, sort_keys=False))
    os.replace(tmp, path)


@contextmanager
def _atomic(path: Path, tmp: Path) -> Iterator[None]:
    """A full disk while writing ``tmp`` (renamed over ``path`` after): the temp file is removed
    and the error says the old ``path`` is intact."""
    try:
        with disk_space(path, path.name, f"the previous {path.name} (if any) is unchanged"):
            yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
