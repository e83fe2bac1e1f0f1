"""Directories distillery writes: marked when made, replaced atomically, deleted only when ours.

Every directory distillery creates to write into (a model ``output_dir`` and its ``.tmp``, the
checkpoint directory, a fine-tuned teacher, a logit cache, a stage of ``distillery run``, the
judge's work directory) carries a marker file, :data:`MARKER`, a small JSON object saying what
made it. The rules:

- a directory is replaced or removed only when it carries the marker (or is empty): a user's
  files in a directory they named as an output are never deleted, the command stops with
  :class:`~distillery.errors.ForeignOutputError` (exit 2) naming the directory and what to do;
- a finished output takes the place of the old one by renames only (:func:`replace_dir`): the
  old directory is renamed aside to ``<target>.old``, the new one renamed in, then the old one
  removed. A kill at any moment leaves a complete old or a complete new directory under the
  target's name, or the old one under ``<target>.old`` with no target; :func:`recover` (called
  by :func:`replace_dir` and :func:`check_replaceable`) puts it back, or removes a half-deleted
  old copy once the new one is in place.

This module is in the core layer: it imports only :mod:`distillery.errors`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from distillery.errors import ForeignOutputError

MARKER = ".distillery"  # in each directory distillery made: {"made_by": ..., plus what the maker adds}
ASIDE = ".old"  # suffix of the old output while a new one is renamed in


def read_marker(directory: Path) -> dict | None:
    """The marker's content, or None when ``directory`` has no marker (or is not a directory)."""
    try:
        return json.loads((directory / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # a torn marker is still ours: it is only ever written into our own directories


def is_ours(directory: Path) -> bool:
    """Whether distillery made ``directory`` (it carries the marker)."""
    return read_marker(directory) is not None


def _empty(directory: Path) -> bool:
    return directory.is_dir() and not any(directory.iterdir())


def _refuse(directory: Path, made_by: str, hint: str) -> ForeignOutputError:
    return ForeignOutputError(
        f"{directory} is not empty and was not made by {made_by} (it has no {MARKER} marker); "
        f"distillery replaces or deletes only directories it made: {hint}")


def check_replaceable(directory: Path, made_by: str, hint: str) -> None:
    """Raise :class:`ForeignOutputError` unless ``directory`` is absent, empty or ours.

    ``made_by`` names the command that would have made it (``distillery train``); ``hint`` says
    how to proceed (another ``output_dir``, or move the files). A left-aside old copy of it from
    a killed :func:`replace_dir` is recovered first.
    """
    directory = Path(directory)
    recover(directory)
    if directory.exists() and not directory.is_dir():
        raise ForeignOutputError(f"{directory} is a file, not a directory: {hint}")
    if directory.is_dir() and not _empty(directory) and not is_ours(directory):
        raise _refuse(directory, made_by, hint)


def claim_dir(directory: Path, made_by: str, hint: str, **info: object) -> Path:
    """Create ``directory`` (or take an empty one) with the marker; keep one that is already ours.

    An existing marker is left as it is (``info`` is written only when the marker is new), so a
    stage's fingerprint survives a writer that claims the same directory again.
    """
    directory = Path(directory)
    check_replaceable(directory, made_by, hint)
    directory.mkdir(parents=True, exist_ok=True)
    if not is_ours(directory):
        (directory / MARKER).write_text(json.dumps({"made_by": made_by, **info}) + "\n")
    return directory


def remove_dir(directory: Path, made_by: str, hint: str) -> None:
    """Delete ``directory`` when it is ours; refuse (and keep it) when it is a user's directory
    with files in it. An empty one without the marker is the user's and stays."""
    directory = Path(directory)
    check_replaceable(directory, made_by, hint)
    if directory.is_dir() and is_ours(directory):
        _remove_ours(directory)


def _remove_ours(directory: Path) -> None:
    """Delete a directory that is ours or empty, its marker last: a kill halfway leaves a
    directory that is still recognised as ours (or an empty one), never a foreign-looking one."""
    for child in directory.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (directory / MARKER).unlink(missing_ok=True)
    directory.rmdir()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power cut must not undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path, made_by: str, hint: str) -> None:
    """Put the complete directory ``new`` (ours, beside ``target``) in ``target``'s place.

    Old aside, new in, old removed: each step is one rename or the removal of a copy no longer
    needed, so a SIGKILL anywhere leaves a complete model under ``target`` or ``<target>.old``
    (see :func:`recover`). Refuses a ``target`` that is not empty and not ours.
    """
    new, target = Path(new), Path(target)
    check_replaceable(target, made_by, hint)
    aside = target.with_name(target.name + ASIDE)
    if _empty(target):
        target.rmdir()
    elif target.exists():
        os.rename(target, aside)
    os.rename(new, target)
    _fsync_dir(target.parent)
    if aside.exists():
        _remove_ours(aside)


def recover(target: Path) -> None:
    """Finish a :func:`replace_dir` that was killed: restore ``<target>.old`` when ``target`` is
    missing (the new one never arrived), remove it when ``target`` is in place (it is the old
    copy, perhaps half-deleted). A ``<target>.old`` that is not ours is left alone."""
    target = Path(target)
    aside = target.with_name(target.name + ASIDE)
    if _empty(aside):  # the last step of a removal: only the directory itself was left
        aside.rmdir()
    if not aside.is_dir() or not is_ours(aside):
        return
    if target.exists():
        _remove_ours(aside)
    else:
        os.rename(aside, target)
