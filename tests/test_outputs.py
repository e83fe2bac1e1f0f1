"""Directories distillery writes (distillery.outputs): a user's files are never deleted, and a
SIGKILL during the final save leaves a complete old or new model (docs/training.md, "Outputs
and markers"). Real files, the real CLI in a subprocess, a real SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from conftest import tiny_train_job
from distillery.errors import ForeignOutputError
from distillery.outputs import MARKER, claim_dir, recover, remove_dir, replace_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GOOD = {"id": "a", "messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}


def _cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "distillery.cli", "train", str(config), *args]


def _train(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(config, *args), cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture
def config(tmp_path) -> Path:
    return tiny_train_job(tmp_path)



def _steps_of_complete_model(directory: Path) -> int:
    """The ``steps`` of the model in ``directory``; fails unless every file of it is whole."""
    assert json.loads((directory / "config.json").read_text())
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) > 0
    assert (directory / "tokenizer.json").is_file()
    return json.loads((directory / "distillery.json").read_text())["steps"]


def test_train_refuses_an_output_dir_holding_the_users_files(config, tmp_path):
    """The reproduction of issue 18: data inside output_dir, and an unrelated file beside it."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "records.jsonl").write_text(json.dumps(GOOD) + "\n")
    (mine / "sub" / "thesis.tex").write_text("years of work")
    res = _train(config, f"data.path={mine / 'records.jsonl'}", "data.task=null", f"output_dir={mine}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{mine} is not empty and was not made by distillery train" in res.stderr
    assert "choose another output_dir, or move the files out of it" in res.stderr
    assert "Traceback" not in res.stderr
    assert (mine / "records.jsonl").read_text() == json.dumps(GOOD) + "\n"
    assert (mine / "sub" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "train.yaml"]  # nothing made beside it


def test_a_users_checkpoint_dir_is_never_wiped(config, tmp_path):
    user = tmp_path / "my_ckpts"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    res = _train(config, f"train.checkpoint.dir={user}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{user} is not empty and was not made by distillery train" in res.stderr
    assert "set train.checkpoint.dir to another directory" in res.stderr
    assert (user / "notes.txt").read_text() == "keep me" and len(list(user.iterdir())) == 1


def test_a_rerun_replaces_its_own_output_and_removes_its_checkpoints(config, tmp_path):
    out = tmp_path / "out"
    assert _train(config).returncode == 0
    assert json.loads((out / MARKER).read_text())["made_by"] == "distillery train"
    (out / "stale.txt").write_text("from the first run")  # ours to replace: the whole dir goes
    res = _train(config, "train.steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _steps_of_complete_model(out) == 3 and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.yaml"]  # no .tmp/.old/.checkpoints


def test_sigkill_during_the_final_save_leaves_a_complete_model_and_the_next_run_recovers(config, tmp_path):
    out, aside = tmp_path / "out", tmp_path / "out.old"
    assert _train(config).returncode == 0  # the old model: 2 steps
    pad = out / "pad"  # many files: removing the old model takes long enough to be killed inside
    pad.mkdir()
    for i in range(4000):
        (pad / f"{i}.bin").write_bytes(b"x")
    before = set(os.listdir(out))
    proc = subprocess.Popen(_cmd(config, "train.steps=3"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the moment the old model starts to change (renamed aside, or its files deleted)
        while proc.poll() is None and not aside.exists() and out.exists() and set(os.listdir(out)) == before:
            time.sleep(0.0005)
        assert proc.poll() is None, "the run finished before the final save could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    # whatever the moment: a complete model under out, or (between the two renames) the old one aside
    assert _steps_of_complete_model(out if out.exists() else aside) in (2, 3)
    res = _train(config, "train.steps=3", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _steps_of_complete_model(out) == 3 and not aside.exists() and not pad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.yaml"]


def _model_dir(path: Path, tag: str, n_files: int) -> Path:
    claim_dir(path, "test", "unused")
    for i in range(n_files):
        (path / f"{i}.bin").write_text(tag)
    (path / "done").write_text(tag)  # written last: a directory with it is complete
    return path


def _tag_of_complete(directory: Path, n_files: int) -> str:
    tag = (directory / "done").read_text()
    assert all((directory / f"{i}.bin").read_text() == tag for i in range(n_files))
    return tag


SWAP = "import sys; from distillery.outputs import replace_dir; replace_dir(sys.argv[1], sys.argv[2], 'test', '')"


def test_replace_dir_killed_at_random_moments_never_leaves_a_half_model(tmp_path):
    """SIGKILL at 12 random moments of the swap: each time the target (or, between the renames,
    its old copy aside) is complete, and ``recover`` leaves exactly one complete target."""
    rng = random.Random(0)
    n = 1500
    for trial in range(12):
        root = tmp_path / str(trial)
        target, new = _model_dir(root / "model", "old", n), _model_dir(root / "model.tmp", "new", n)
        proc = subprocess.Popen([sys.executable, "-c", SWAP, str(new), str(target)], env=ENV)
        while proc.poll() is None and not (root / "model.old").exists() and new.exists():
            time.sleep(0.0002)
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        there = target if target.exists() else root / "model.old"
        assert _tag_of_complete(there, n) in ("old", "new")
        recover(target)
        assert _tag_of_complete(target, n) in ("old", "new") and not (root / "model.old").exists()


def test_recover_puts_back_an_old_model_left_aside_between_the_renames(tmp_path):
    """The state a kill between ``rename(target, aside)`` and ``rename(new, target)`` leaves."""
    aside = _model_dir(tmp_path / "model.old", "old", 3)
    remove_dir(tmp_path / "missing", "test", "unused")  # nothing there: nothing to do
    replace_dir(_model_dir(tmp_path / "model.tmp", "new", 3), tmp_path / "model", "test", "")
    assert _tag_of_complete(tmp_path / "model", 3) == "new" and not aside.exists()  # old restored, then replaced
    aside = _model_dir(tmp_path / "other.old", "old", 3)
    recover(tmp_path / "other")
    assert _tag_of_complete(tmp_path / "other", 3) == "old" and not aside.exists()


def test_only_marked_directories_are_removed_or_replaced(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.txt").write_text("a")
    with pytest.raises(ForeignOutputError, match="not made by distillery x"):
        remove_dir(user, "distillery x", "move it")
    with pytest.raises(ForeignOutputError, match="not made by distillery x"):
        replace_dir(_model_dir(tmp_path / "new", "new", 1), user, "distillery x", "move it")
    assert (user / "a.txt").read_text() == "a"
    empty = tmp_path / "empty"
    empty.mkdir()
    remove_dir(empty, "distillery x", "move it")
    assert empty.is_dir()  # an empty directory of the user's is left alone ...
    replace_dir(tmp_path / "new", empty, "distillery x", "move it")  # ... but may be taken
    assert _tag_of_complete(empty, 1) == "new"
    user_aside = tmp_path / "user2.old"  # a user's directory that happens to have our aside's name
    user_aside.mkdir()
    (user_aside / "b.txt").write_text("b")
    recover(tmp_path / "user2")
    assert (user_aside / "b.txt").read_text() == "b"


def test_generate_refuses_an_output_dir_holding_the_users_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "records.jsonl").write_text(json.dumps(GOOD) + "\n")
    (mine / "config.yaml").write_text("# my own\n")
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(mine), "method": "labeling",
        "teacher": {"backend": "hf", "model": str(tmp_path / "no_model"), "device": "cpu"},
        "seeds": {"path": str(mine / "records.jsonl"), "num": None}}))
    res = subprocess.run([sys.executable, "-m", "distillery.cli", "generate", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{mine} is not empty and was not made by distillery generate" in res.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "records.jsonl"]  # nothing written into it
    assert (mine / "config.yaml").read_text() == "# my own\n"
