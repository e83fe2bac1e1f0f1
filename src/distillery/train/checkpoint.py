"""Crash-safe training checkpoints: write to ``step_N.tmp/``, fsync, rename to ``step_N/``.

A checkpoint holds everything a resumed run needs to continue *exactly*:

* ``model.safetensors``: the trainable parameters (all of them for full fine-tuning, the
  adapters for LoRA), by name; ``objective.safetensors``: the objective's own trainable modules
  (e.g. feature projections);
* ``optimizer.pt``: the optimizer state (tensors only, read back with ``weights_only=True``);
* ``state.json``: step, tokens seen, the schedule's state, the objective's state (e.g. its
  coin generator), the run's config (to refuse resuming a different run);
* ``rng_rank<r>.json``: each process's Python, NumPy and torch generator states.

The data position needs no file: the batch of step s is a function of (seed, s)
(:mod:`distillery.train.batches`). Only complete checkpoints are ever renamed into place, so
a run killed while writing leaves the previous one intact; the newest ``keep_last`` are kept.
No pickle is read: weights are safetensors, JSON for the rest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distillery.errors import DiskFullError, DistilleryError
from distillery.files import disk_space
from distillery.outputs import claim_dir
from distillery.records import json_text

PREFIX = "step_"


class CheckpointError(DistilleryError, RuntimeError):
    """A checkpoint that cannot be resumed from (missing, corrupt, or from another run)."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (``*.tmp`` are partial writes)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's generator states as JSON values."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------- tensors


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (tied weights once), as contiguous CPU tensors."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the checkpoint's parameters do not match the model being trained "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): it was written "
            "for another model or LoRA setting"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))


def _modules_state(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().to("cpu").contiguous() for i, m in enumerate(modules)
            for k, v in m.state_dict().items()}


def _load_modules_state(modules: list[nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    for i, m in enumerate(modules):
        prefix = f"{i}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    objective: Any,
    state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically; every process calls it (each saves its RNG).

    ``model`` is the unwrapped student; ``state`` holds the loop's JSON state (tokens seen,
    the run config). ``barrier`` synchronizes processes (``accelerator.wait_for_everyone``).
    """
    sync = barrier or (lambda: None)
    root = Path(directory)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        # marked, so that a user's directory named as train.checkpoint.dir is never taken
        claim_dir(root, "distillery train",
                  "set train.checkpoint.dir to another directory, or move the files out of it")
        shutil.rmtree(tmp, ignore_errors=True)  # our half-written step, inside our marked root
        tmp.mkdir()
    sync()
    with _disk_full(tmp, final.name):
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
        if rank == 0:
            save_file(trainable_state(model), tmp / "model.safetensors")
            modules = list(getattr(objective, "trainable", []))
            if modules:
                save_file(_modules_state(modules), tmp / "objective.safetensors")
            # through a file object: a full disk then surfaces as the file's ENOSPC (torch.save
            # given a path reports it as an opaque "unexpected pos" RuntimeError)
            with open(tmp / "optimizer.pt", "wb") as f:
                torch.save(optimizer.state_dict(), f)
            objective_state = objective.state_dict() if hasattr(objective, "state_dict") else None
            meta = {**state, "step": step, "world_size": world_size,
                    "scheduler": scheduler.state_dict(), "objective_state": objective_state}
            (tmp / "state.json").write_text(json_text(meta, root / "state.json", indent=1))
    sync()
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():  # a re-run that reached this step again: replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    sync()
    return final


@contextmanager
def _disk_full(tmp: Path, name: str) -> Iterator[None]:
    """A full disk while writing checkpoint ``name`` into ``tmp``: the half-written ``tmp`` is
    removed (freeing its space) and the error says the earlier checkpoints are intact."""
    try:
        with disk_space(tmp.parent, f"checkpoint {name}", f"the earlier checkpoints in "
                        f"{tmp.parent} are kept (`distillery train CONFIG --resume` continues "
                        "from the last one)"):
            yield
    except DiskFullError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    objective: Any,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the loop's state (with ``step``)."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({exc})") from None
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"{path} was written by {meta['world_size']} process(es), this run has {world_size}: "
            "resume with the same number of processes (the RNG streams are per process)")
    load_trainable_state(model, load_file(path / "model.safetensors"), path)
    modules = list(getattr(objective, "trainable", []))
    if modules:
        _load_modules_state(modules, load_file(path / "objective.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(meta["scheduler"])
    if meta.get("objective_state") is not None and hasattr(objective, "load_state_dict"):
        objective.load_state_dict(meta["objective_state"])
    set_rng_state(json.loads((path / f"rng_rank{rank}.json").read_text()))
    return meta


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for a clear resume error)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(saved.keys() | current.keys()):
            out += config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [prefix.rstrip(".")]
