"""Reading a user's text files and writing distillery's own, with errors that name the file.

Two kinds of failure are checked here, once, for every file distillery reads or writes:

- **bytes that are not UTF-8** (a config or data file saved in Latin-1, a binary file named by
  mistake): :func:`decode_utf8` and :func:`read_text` raise an error naming the file, line and
  byte, instead of Python's ``UnicodeDecodeError`` traceback; :func:`read_json` adds JSON syntax
  errors with their line and column;
- **a full disk** (``OSError`` with ``errno.ENOSPC``): :func:`disk_space` wraps a write site
  and turns it into :class:`~distillery.errors.DiskFullError`, saying what was being written
  and what survives, since every such write is atomic or resumable.

This module is in the core layer: it imports only :mod:`distillery.errors`.
"""

from __future__ import annotations

import errno
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distillery.errors import CorruptFileError, DiskFullError, DistilleryError


def decode_utf8(data: bytes, path: str | Path, error: type[DistilleryError] = CorruptFileError,
                first_line: int = 1) -> str:
    """``data`` (the bytes of ``path`` from line ``first_line`` on) as text; bytes that are
    not UTF-8 raise ``error`` naming the file, line and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
                    f"{column}): save the file as UTF-8") from None


def read_text(path: str | Path, error: type[DistilleryError] = CorruptFileError) -> str:
    """The UTF-8 text of ``path``; bytes that are not UTF-8 raise ``error`` naming the line."""
    return decode_utf8(Path(path).read_bytes(), path, error)


def read_json(path: str | Path, error: type[DistilleryError] = CorruptFileError,
              what: str = "") -> Any:
    """The JSON value in ``path``; a torn or malformed file raises ``error`` naming the file,
    line and column. ``what`` (e.g. "rerun the eval to rewrite it") ends the message."""
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = f": {what}" if what else ""
        raise error(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}; the file is "
                    f"truncated or corrupt){hint}") from None


@contextmanager
def disk_space(path: str | Path, writing: str, survives: str) -> Iterator[None]:
    """Turn a full disk (ENOSPC) inside the block into :class:`DiskFullError`.

    ``path``: the file or directory being written; ``writing``: what it is ("checkpoint
    step-000200"); ``survives``: what is still on disk ("the previous checkpoints are kept"),
    so the user knows a re-run after freeing space resumes without loss. Other ``OSError``\\ s
    and any other exception pass through unchanged.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - anything but a full disk is re-raised as it was
        if not _is_full(exc):
            raise
        raise DiskFullError(f"no space left on {path}: writing {writing}; {survives}; free space "
                            "and re-run to resume") from None


def _is_full(exc: BaseException | None) -> bool:
    """ENOSPC from the OS; SQLite's SQLITE_FULL (the response cache); a Rust writer's I/O error,
    which safetensors reports as ``SafetensorError("... (os error 28)")``; or any of these as
    the cause or context of another error (``torch.save`` into a file object raises a
    RuntimeError while the file's ENOSPC is its context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if isinstance(exc, sqlite3.OperationalError) and (
                getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL):
            return True
        if f"(os error {errno.ENOSPC})" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
