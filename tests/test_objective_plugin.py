"""Objectives are plugins: the example objective of docs/training.md, registered from its file,
is accepted by the train-job config, computes what it says, and trains through run_train_job."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distillery.config import ConfigError, ModelConfig, TrainJobConfig, load_config
from distillery.models import build_model
from distillery.train.data import Collator, SFTDataset
from distillery.train.job import run_train_job
from distillery.train.objectives import get_objective, objective_names

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs/examples/my_objective.py"
DISTILLERY = Path(sys.executable).parent / "distillery"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plugin():
    """The example module, imported from its file: importing it registers ``smoothed_ce``."""
    spec = importlib.util.spec_from_file_location("my_objective", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["my_objective"] = module  # as an import would (pydantic resolves names through it)
    spec.loader.exec_module(module)
    return module


def test_the_doc_shows_exactly_the_example_file():
    doc = (REPO / "docs/training.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert EXAMPLE.read_text() in blocks


def test_a_registered_objective_is_a_train_objective(plugin, tmp_path):
    assert "smoothed_ce" in objective_names() and get_objective("smoothed_ce").needs.packing
    job = {"output_dir": "o", "data": {"path": "d.jsonl"},
           "train": {"objective": {"name": "smoothed_ce", "smoothing": 0.2}, "packing": True}}
    cfg = TrainJobConfig.model_validate(job)
    assert isinstance(cfg.train.objective, plugin.SmoothedCEConfig) and cfg.train.objective.smoothing == 0.2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(ConfigError, match=r"train\.objective\.smoothing': Input should be less than 1"):
        load_config(path, TrainJobConfig, ["train.objective.smoothing=1.5"])
    with pytest.raises(ConfigError, match="unknown objective 'smoothed': did you mean 'smoothed_ce'"):
        load_config(path, TrainJobConfig, ["train.objective.name=smoothed"])


def test_the_loss_is_label_smoothed_cross_entropy(plugin, tiny_tokenizer):
    """Against the definition in float64: (1 − ε)·NLL + ε·mean over the vocabulary of −log p."""
    records = [{"id": str(i), "messages": [{"role": "user", "content": f"{i}+{i}"},
                                           {"role": "assistant", "content": f"#{2 * i}"}]} for i in range(6)]
    batch = Collator(tiny_tokenizer.pad_token_id)(SFTDataset(records, tiny_tokenizer, 32).items)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu"), tiny_tokenizer)
    eps = 0.3
    out = plugin.SmoothedCE(eps).loss(batch, model.eval())
    logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logp.log_softmax(-1)
    total, n = 0.0, 0
    for b in range(batch["input_ids"].shape[0]):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target == -100:
                continue
            row = logp[b, t]
            total += (1 - eps) * -row[target].item() + eps * -row.mean().item()
            n += 1
    assert out.count == n > 0
    assert out.loss.item() == pytest.approx(total / n, rel=1e-5)


def test_run_train_job_trains_with_it(plugin, tmp_path):
    cfg = TrainJobConfig.model_validate({
        "output_dir": str(tmp_path / "student"),
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64,
                  "device": "cpu"},
        "data": {"task": {"name": "arithmetic", "num_operands": 2, "digits": [1, 2]}, "num_examples": 200},
        "train": {"objective": {"name": "smoothed_ce", "smoothing": 0.1}, "steps": 20, "batch_size": 16,
                  "warmup_steps": 2, "max_seq_len": 48, "log_every": 5},
    })
    result = run_train_job(cfg, show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "student" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    assert log[-1]["loss"] < 0.9 * log[0]["loss"]
    assert log[-1]["smoothed_ce"] == pytest.approx(log[-1]["loss"])
    assert result.final_loss == pytest.approx(log[-1]["loss"])
    saved = json.loads((tmp_path / "student" / "distillery.json").read_text())
    assert saved["config"]["train"]["objective"] == {"name": "smoothed_ce", "smoothing": 0.1}


def test_the_cli_loads_it_from_the_environment(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("output_dir: o\ndata: {path: d.jsonl}\ntrain: {objective: {name: smoothed_ce}}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLE.parent)}
    shown = subprocess.run([str(DISTILLERY), "config", "show", str(path)], capture_output=True, text=True,
                           env={**env, "DISTILLERY_OBJECTIVES": "my_objective"}, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["train"]["objective"] == {"name": "smoothed_ce", "smoothing": 0.1}
    missing = subprocess.run([str(DISTILLERY), "config", "show", str(path)], capture_output=True, text=True,
                             env=env, timeout=120)
    assert missing.returncode == 2 and "unknown objective 'smoothed_ce'" in missing.stderr
