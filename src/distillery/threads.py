"""How many CPU threads torch may use: ``--threads N``, ``DISTILLERY_THREADS``, else the CPUs
this process may run on.

torch sizes its thread pools from the host's core count, not from what the process is allowed:
in a container limited to 2 CPUs on a 64-core host, or on a 2-core machine shared with other
jobs, 64 (or 2 contended) spinning OpenMP threads made every command 7-18x slower than one
thread (docs/threads.md). So every command resolves the number once, before torch does any
work, from (first set wins) the ``--threads`` option, the ``DISTILLERY_THREADS`` variable,
``OMP_NUM_THREADS``, and the CPUs available to this process: its affinity mask, capped by the cgroup CPU quota (v2
``cpu.max``, else v1 ``cpu.cfs_quota_us``). An explicit number above that is capped too: more
threads than CPUs only adds contention.

This module is in the core layer: it imports only :mod:`distillery.errors` (and torch, lazily).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from distillery.errors import DistilleryError

ENV = "DISTILLERY_THREADS"


def _quota(cpu_max: Path) -> float | None:
    """CPUs a cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") allows; None: no limit."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(cpu_dir: Path) -> float | None:
    """CPUs a cgroup v1 CFS quota allows (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; -1: none)."""
    try:
        quota = int((cpu_dir / "cpu.cfs_quota_us").read_text())
        period = int((cpu_dir / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The tightest CPU quota on this process's cgroup path (None: unlimited or unknown).

    ``root`` is the filesystem root (a test points it at a crafted tree). cgroup v2: the
    ``cpu.max`` of the process's cgroup (from ``/proc/self/cgroup``) and of each ancestor, since
    a parent's quota binds its children too; v1 (no v2 ``cpu.max`` found): the CFS quota of the
    ``cpu`` hierarchy's cgroup, else of its root.
    """
    fs = root / "sys/fs/cgroup"
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    entries = dict(line.split(":", 2)[1:] for line in lines if line.count(":") >= 2)
    limits = []
    if "" in entries:  # v2: "0::/path"
        path = fs / entries[""].lstrip("/")
        for directory in (path, *path.parents):
            limits.append(_quota(directory / "cpu.max"))
            if directory == fs:
                break
    if not any(limit is not None for limit in limits):
        v1 = next((p for ctrl, p in entries.items() if "cpu" in ctrl.split(",")), "/")
        for base in ("cpu", "cpu,cpuacct"):
            for directory in (fs / base / v1.lstrip("/"), fs / base):
                limits.append(_quota_v1(directory))
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def available_cpus(root: Path = Path("/"), affinity: int | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up, so
    a 1.5-CPU quota gives 2), at least 1. ``affinity`` overrides the mask (tests)."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = cgroup_cpu_limit(root)
    cpus = affinity or 1
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def resolve_threads(option: int | None, env: Mapping[str, str] = os.environ,
                    root: Path = Path("/")) -> tuple[int, str]:
    """``(threads, where the number came from)``: ``--threads``, ``$DISTILLERY_THREADS``,
    ``$OMP_NUM_THREADS`` or the available CPUs; capped at the available CPUs."""
    cpus = available_cpus(root)
    if option is not None:
        wanted, source = option, "--threads"
    else:
        # OMP_NUM_THREADS: what users (and the test suite) already set for torch; honoured so
        # that distillery never raises a thread count someone lowered on purpose
        var = next((v for v in (ENV, "OMP_NUM_THREADS") if env.get(v, "").strip()), None)
        if var is None:
            return cpus, "the CPUs available to this process"
        try:
            wanted, source = int(env[var]), var
        except ValueError:
            raise DistilleryError(f"{var}={env[var]!r} is not a whole number of threads; "
                                  f"set it to 1..{cpus} or unset it") from None
    if wanted < 1:
        raise DistilleryError(f"{source} {wanted}: the number of threads must be at least 1")
    if wanted > cpus:
        return cpus, f"{source} {wanted}, capped at the {cpus} CPUs available to this process"
    return wanted, source


# where the number applied by the command came from (set by the CLI through ``apply_threads``)
_applied_from: str | None = None


def apply_config_threads(value: object, where: str) -> None:
    """A config file's top-level ``threads:`` key: applied unless ``--threads`` or
    ``$DISTILLERY_THREADS`` chose the number (they win), over ``$OMP_NUM_THREADS`` and the
    default. ``where``: the config file, named in errors."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DistilleryError(f"{where}: threads: {value!r} is not a number of threads; give a whole "
                              "number >= 1, or remove the key (default: the CPUs available)")
    if _applied_from is not None and _applied_from.startswith(("--threads", ENV)):
        return
    if _applied_from is None and os.environ.get(ENV, "").strip():  # no CLI (a script): the variable wins
        return
    cpus = available_cpus()
    apply_threads(min(value, cpus), f"{where} (threads: {value}" + (f", capped at {cpus} CPUs)" if value > cpus else ")"))


def applied_from() -> str | None:
    """Where the thread count in force came from (None: no distillery command set one)."""
    return _applied_from


def apply_threads(threads: int, source: str | None = None) -> None:
    """Make torch and the processes distillery starts use ``threads`` threads.

    The variables reach subprocesses (and a torch imported later); ``set_num_interop_threads``
    raises once torch has started parallel work, when it can no longer be changed: then the
    inter-op pool keeps its size (it only runs independent ops side by side, rarely on CPU).
    """
    global _applied_from
    _applied_from = source
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass
