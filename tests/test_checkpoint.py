"""Checkpoints and resume: a run killed (exception or SIGKILL) and resumed ends where an
uninterrupted run ends, to 1e-6; partial writes never count; a different run is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distillery.config import ModelConfig, TrainConfig
from distillery.models import build_model
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from distillery.train.data import Collator, SFTDataset
from distillery.train.loop import train_loop
from distillery.train.objectives.feature_kd import FeatureKDConfig, FeatureKDObjective
from distillery.train.objectives.sft import SFTObjective


@pytest.fixture(scope="module")
def dataset(task_cfg, tiny_tokenizer):
    records = ground_truth_records(load_problems(task_cfg, "train", 64, seed=0), "chain")
    return SFTDataset(records, tiny_tokenizer, 40)


def _model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu"), tokenizer)


class Crash(RuntimeError):
    pass


class CrashAt:
    """Wraps an objective and raises on its n-th call: a crash in the middle of a run."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0
        self.trainable = inner.trainable

    def loss(self, batch, student, teacher):
        self.calls += 1
        if self.calls == self.at:
            raise Crash(f"injected at call {self.at}")
        return self.inner.loss(batch, student, teacher)


def _feature_objective():
    torch.manual_seed(1)
    return FeatureKDObjective(FeatureKDConfig(relation_weight=0.5), 32, 48)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_crash_and_resume_equals_uninterrupted(tmp_path, dataset, tiny_tokenizer):
    """feature_kd: student, the objective's own projection, AdamW state and schedule all resume."""
    cfg = TrainConfig(objective="feature_kd", steps=12, batch_size=8, lr=1e-2, warmup_steps=2,
                      log_every=1, checkpoint={"every": 4, "keep_last": 2})
    teacher = _model(tiny_tokenizer, seed=5)
    teacher_big = build_model(ModelConfig(hidden_size=48, num_layers=1, num_heads=2, device="cpu"), tiny_tokenizer)
    teacher = teacher_big
    collate = Collator(tiny_tokenizer.pad_token_id)

    ref_model, ref_obj = _model(tiny_tokenizer), _feature_objective()
    ref = train_loop(ref_model, ref_obj, dataset, collate, cfg, teacher=teacher,
                     log_path=tmp_path / "ref" / "log.jsonl" if (tmp_path / "ref").mkdir() is None else None,
                     show_progress=False, checkpoint_dir=tmp_path / "ref_ckpt")

    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    run_dir.mkdir()
    model, obj = _model(tiny_tokenizer), _feature_objective()
    with pytest.raises(Crash):
        train_loop(model, CrashAt(obj, at=11), dataset, collate, cfg, teacher=teacher,
                   log_path=run_dir / "log.jsonl", show_progress=False, checkpoint_dir=ckpt)
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000004", "step_00000008"]

    # a fresh process would start from a fresh (differently initialised) model and objective
    model, obj = _model(tiny_tokenizer, seed=99), _feature_objective()
    result = train_loop(model, obj, dataset, collate, cfg, teacher=teacher, log_path=run_dir / "log.jsonl",
                        show_progress=False, checkpoint_dir=ckpt, resume=True)
    assert result.resumed_from == 8
    want, got = _params(ref_model), _params(model)
    assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-6
    for a, b in zip(ref_obj.distiller.parameters(), obj.distiller.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # the log reads as one run: every step once, same losses
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref.history], abs=1e-6)
    assert (run_dir / "loss_curve.png").stat().st_size > 1000


def test_partial_checkpoint_is_ignored_and_other_config_refused(tmp_path, dataset, tiny_tokenizer):
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=1, checkpoint={"every": 2, "keep_last": 5})
    collate = Collator(tiny_tokenizer.pad_token_id)
    run_cfg = {"train": cfg.model_dump(mode="json")}
    train_loop(_model(tiny_tokenizer), SFTObjective(),
               dataset, collate, cfg, show_progress=False, checkpoint_dir=tmp_path, run_config=run_cfg)
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    # a write cut short by a kill: a .tmp directory, never taken for a checkpoint
    (tmp_path / "step_00000006.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000004"


    other = cfg.model_copy(update={"lr": 1e-4, "steps": 6})
    with pytest.raises(CheckpointError, match="train.lr"):
        train_loop(_model(tiny_tokenizer), SFTObjective(), dataset, collate, other, show_progress=False,
                   checkpoint_dir=tmp_path, resume=True, run_config={"train": other.model_dump(mode="json")})


def _job_config(tmp_path: Path, steps: int, name: str) -> Path:
    cfg = {
        "output_dir": str(tmp_path / name),
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64,
                  "device": "cpu"},
        "tokenizer": {"vocab_size": 300},
        "data": {"task": {"name": "arithmetic", "num_operands": 2, "digits": [1, 2]},
                 "num_examples": 200, "target": "chain"},
        "train": {"objective": "sft", "steps": steps, "batch_size": 8, "warmup_steps": 2, "max_seq_len": 48,
                  "log_every": 5, "checkpoint": {"every": 10}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: same float sums
    return subprocess.Popen([sys.executable, "-m", "distillery.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    """The issue's acceptance test: kill -9 mid-run, `--resume`, same weights to 1e-6."""
    steps = 120
    ref = _cli(str(_job_config(tmp_path, steps, "ref")))
    killed_cfg = _job_config(tmp_path, steps, "run")
    run = _cli(str(killed_cfg))
    ckpt = tmp_path / "run.checkpoints"
    deadline = time.time() + 300
    while latest_checkpoint(ckpt) is None or latest_checkpoint(ckpt).name < "step_00000030":
        assert run.poll() is None, "the run ended before it could be killed:\n" + run.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = int(latest_checkpoint(ckpt).name.split("_")[1])
    assert killed_at < steps and not (tmp_path / "run").exists()

    fresh = _cli(str(killed_cfg))  # without --resume: refused, nothing deleted
    out = fresh.communicate(timeout=300)[0]
    assert fresh.returncode == 2 and "--resume" in out and latest_checkpoint(ckpt) is not None

    resumed = _cli(str(killed_cfg), "--resume")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert f"resumed after step {killed_at}" in out
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    want = load_file(tmp_path / "ref" / "model.safetensors")
    got = load_file(tmp_path / "run" / "model.safetensors")
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-6
    assert not ckpt.exists()  # removed once the final model is saved
    ref_log = (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()
    run_log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in run_log] == pytest.approx([json.loads(x)["loss"] for x in ref_log], abs=1e-6)
    assert json.loads((tmp_path / "run" / "distillery.json").read_text())["resumed_from"] == killed_at
