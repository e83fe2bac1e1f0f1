"""The one user-error type: ``DistilleryError`` and the generic subclasses shared across layers.

A ``DistilleryError`` means "the user can fix this" (a bad config key, a file that is missing or
malformed, a model directory that does not fit, an extra that is not installed); its message
names the file/line/key and says how to fix it. Every command catches exactly this type,
prints the message and exits with status 2. Any other exception is a bug in distillery and
keeps its traceback.

Each module keeps its own specific subclass next to the code that raises it (``ConfigError``,
``RecordError``, ``CacheMismatchError``, ...). Most also subclass the builtin they replaced
(``ValueError``, ``FileNotFoundError``, ``ImportError``), so ``except ValueError`` in callers
and ``pytest.raises(ValueError)`` in tests keep working.

This module is at the bottom of the layers: it imports nothing from distillery.
"""

from __future__ import annotations


class DistilleryError(Exception):
    """Base of every user-fixable error; commands print its message and exit 2."""


class MissingInputError(DistilleryError, FileNotFoundError):
    """A file or directory the config names does not exist (or lacks what it must hold)."""


class MissingExtraError(DistilleryError, ImportError):
    """An optional dependency the config asks for is not installed (or not usable in this
    environment); names the pip command that fixes it."""


class DataError(DistilleryError, ValueError):
    """Data that cannot be used as configured (e.g. no trained token left after truncation to
    ``max_seq_len``, an empty dataset); says which setting or file to change."""


class ForeignOutputError(DistilleryError, FileExistsError):
    """An output directory already holds files that distillery did not write: never deleted or
    mixed into; says to move them or to choose another directory."""


class CorruptFileError(DistilleryError, ValueError):
    """A file that cannot be read as what it should be (not UTF-8, torn JSON, a truncated
    weights file); names the file (and line where known) and what to do."""


class DiskFullError(DistilleryError, OSError):
    """The disk filled up (ENOSPC) while distillery wrote a file: names the path, what was being
    written and what survives; freeing space and re-running resumes."""
