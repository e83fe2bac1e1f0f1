"""The real demo (minutes): distillation must beat ground-truth-only training, for real.

Run with `make test-slow`. It runs `distillery run configs/demo.yaml` into a temporary run
directory with the shipped teacher and checks the issue's acceptance criterion: the distilled
student beats the ground-truth student by more than the overlap of their 95% CIs, on at least
500 held-out problems.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_distillation_beats_ground_truth(tmp_path):
    cli = str(Path(sys.executable).parent / "distillery")
    proc = subprocess.run([cli, "run", "configs/demo.yaml", f"run_dir={tmp_path / 'demo'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["n_eval"] >= 500
    gt, dist = metrics["models"]["student_ground_truth"], metrics["models"]["student_distilled"]
    assert dist["ci95"][0] > gt["ci95"][1], (gt, dist)
    diff = metrics["comparisons"]["student_distilled - student_ground_truth"]
    assert diff["ci95"][0] > 0
