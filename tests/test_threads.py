"""The threads setting: the CPUs a process may use (affinity, cgroup v2/v1 quota) and the
``--threads`` / ``DISTILLERY_THREADS`` setting every command applies before torch works."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distillery.errors import DistilleryError
from distillery.threads import available_cpus, cgroup_cpu_limit, resolve_threads


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_quota_of_the_process_cgroup_and_its_parents(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"proc/self/cgroup": "0::/jobs/me\n",
                            "sys/fs/cgroup/jobs/me/cpu.max": "150000 100000\n",
                            "sys/fs/cgroup/jobs/cpu.max": "max 100000\n",
                            "sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root) == 1.5
    assert available_cpus(root, affinity=8) == 2  # 1.5 CPUs of quota: two threads share it
    assert available_cpus(root, affinity=1) == 1  # the affinity mask binds first
    (root / "sys/fs/cgroup/jobs/cpu.max").write_text("100000 100000\n")  # a parent's quota binds too
    assert available_cpus(root, affinity=8) == 1


def test_cgroup_v1_cfs_quota_and_no_limit(tmp_path: Path) -> None:
    root = _tree(tmp_path / "v1", {"proc/self/cgroup": "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n",
                                   "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
                                   "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert available_cpus(root, affinity=16) == 3
    assert available_cpus(root, affinity=2) == 2
    (root / "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root) is None
    assert available_cpus(root, affinity=16) == 16
    assert available_cpus(tmp_path / "nothing", affinity=5) == 5  # no cgroup files at all


@given(quota=st.integers(1000, 10**7), period=st.integers(1000, 10**6), affinity=st.integers(1, 256))
def test_never_more_than_the_quota_or_the_mask(tmp_path_factory: pytest.TempPathFactory,
                                               quota: int, period: int, affinity: int) -> None:
    root = _tree(tmp_path_factory.mktemp("cg"), {"proc/self/cgroup": "0::/\n",
                                                 "sys/fs/cgroup/cpu.max": f"{quota} {period}\n"})
    cpus = available_cpus(root, affinity=affinity)
    assert 1 <= cpus <= affinity
    assert cpus <= max(1, math.ceil(quota / period))  # never more threads than the quota's CPUs
    assert cpus >= min(affinity, quota / period)  # and never fewer than it pays for


def test_resolve_order_and_cap(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "200000 100000\n"})
    cpus = available_cpus(root)
    assert resolve_threads(None, {}, root) == (cpus, "the CPUs available to this process")
    assert resolve_threads(None, {"DISTILLERY_THREADS": "1"}, root) == (1, "DISTILLERY_THREADS")
    assert resolve_threads(1, {"DISTILLERY_THREADS": "2"}, root) == (1, "--threads")  # option wins
    assert resolve_threads(None, {"OMP_NUM_THREADS": "1"}, root) == (1, "OMP_NUM_THREADS")
    assert resolve_threads(None, {"OMP_NUM_THREADS": "1", "DISTILLERY_THREADS": "2"}, root)[1] == \
        "DISTILLERY_THREADS"
    threads, source = resolve_threads(64, {}, root)
    assert threads == cpus and "capped" in source
    with pytest.raises(DistilleryError, match="DISTILLERY_THREADS='two'"):
        resolve_threads(None, {"DISTILLERY_THREADS": "two"}, root)
    with pytest.raises(DistilleryError, match="at least 1"):
        resolve_threads(None, {"DISTILLERY_THREADS": "0"}, root)


def _env_command(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DISTILLERY_THREADS")}
    return subprocess.run([sys.executable, "-m", "distillery.cli", *args, "env"], capture_output=True,
                          text=True, env={**base, **env}, timeout=120)


def test_every_command_applies_the_setting_before_torch_works() -> None:
    by_option = _env_command("--threads", "1")
    assert by_option.returncode == 0, by_option.stderr
    assert "threads: 1 (from --threads)" in by_option.stdout
    assert "interop 1" in by_option.stdout and "OMP_NUM_THREADS=1" in by_option.stdout

    by_env = _env_command(DISTILLERY_THREADS="1")
    assert "threads: 1 (from DISTILLERY_THREADS)" in by_env.stdout, by_env.stderr

    default = _env_command()
    assert f"threads: {available_cpus()} (from the CPUs available" in default.stdout, default.stderr

    bad = _env_command(DISTILLERY_THREADS="lots")
    assert bad.returncode == 2
    assert "DISTILLERY_THREADS='lots' is not a whole number" in bad.stderr


def _config_threads(tmp_path: Path, value: object, *cli: str, **env: str) -> subprocess.CompletedProcess:
    """`distillery config show` of a train config with a top-level `threads:` key, printing the
    threads torch ended up with."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"threads: {value}\noutput_dir: {tmp_path / 'out'}\ndata: {{task: {{num_operands: 2}}}}\n")
    code = ("import sys, torch; from distillery.cli import app; sys.argv = ['distillery', *sys.argv[1:]]\n"
            "try:\n    app()\nexcept SystemExit as e:\n    print('torch threads', torch.get_num_threads()); "
            "sys.exit(e.code)")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DISTILLERY_THREADS")}
    return subprocess.run([sys.executable, "-c", code, *cli, "config", "show", str(cfg), "--kind", "train"],
                          capture_output=True, text=True, env={**clean, **env}, timeout=120)


@pytest.mark.skipif(available_cpus() < 2, reason="needs 2 CPUs to tell the config's 1 from the default")
def test_a_config_threads_key_applies_unless_the_option_or_variable_chose(tmp_path: Path) -> None:
    by_config = _config_threads(tmp_path, 1)
    assert by_config.returncode == 0, by_config.stderr
    assert "torch threads 1" in by_config.stdout
    assert "threads:" not in by_config.stdout.split("torch threads")[0]  # not a job key

    by_option = _config_threads(tmp_path, 1, "--threads", "2")
    assert "torch threads 2" in by_option.stdout, by_option.stderr
    by_env = _config_threads(tmp_path, 1, DISTILLERY_THREADS="2")
    assert "torch threads 2" in by_env.stdout, by_env.stderr
    over_omp = _config_threads(tmp_path, 1, OMP_NUM_THREADS="2")
    assert "torch threads 1" in over_omp.stdout, over_omp.stderr

    bad = _config_threads(tmp_path, "many")
    assert bad.returncode == 2
    assert "job.yaml: threads: 'many' is not a number of threads" in bad.stderr


def test_a_threads_override_and_the_variable_in_a_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`threads=N` on the command line replaces the file's; in a script (no CLI) a set
    DISTILLERY_THREADS still wins over the file's key."""
    import torch

    import distillery.threads as th
    from distillery.config import TrainJobConfig, load_config

    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"threads: 2\noutput_dir: {tmp_path / 'out'}\ndata: {{task: {{num_operands: 2}}}}\n")
    monkeypatch.setattr(th, "_applied_from", None)
    monkeypatch.delenv("DISTILLERY_THREADS", raising=False)
    job = load_config(cfg, TrainJobConfig, ["threads=1", "train.steps=3"])
    assert torch.get_num_threads() == 1 and "(override)" in th.applied_from() and job.train.steps == 3

    monkeypatch.setattr(th, "_applied_from", None)
    monkeypatch.setenv("DISTILLERY_THREADS", "1")
    load_config(cfg, TrainJobConfig)
    assert torch.get_num_threads() == 1 and th.applied_from() is None
