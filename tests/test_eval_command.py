"""`distillery eval`: existing model directories evaluated without training, into the run report.

Two model directories: the shipped demo teacher (the reference, named by ``reference:``) and
the random tiny Llama of ``tests/conftest.py``. The report's numbers must equal evaluating each
model directly with ``evaluate_model``; the judge (the rule judge over HTTP, always "[[A]]")
must give the textbook 50% win rate and trip the position-bias pitfall; planted training records
must trip the contamination check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest
import yaml

from distillery.config import ConfigError, EvalConfig, EvalJobConfig, TaskConfig, load_config
from distillery.evaluate import evaluate_model
from distillery.evaluate.job import run_eval_job
from distillery.tasks import load_problems
from distillery.teachers import HFTeacher
from rule_judge import always, judge_rule, serve_rules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "distillery")
DEMO = ROOT / "assets" / "demo_teacher"
TASK = {"num_operands": 3, "digits": [1, 2], "operations": ["+", "-"]}
EVAL = {"num_problems": 16, "batch_size": 16, "max_new_tokens": 40, "bootstrap_resamples": 300, "speed_prompts": 2}
PLANTED = 3  # eval problems copied into the training data


@pytest.fixture(scope="module")
def judge_server():
    with serve_rules(judge_rule(always("A"))) as handle:
        yield handle


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, judge_server):
    """``distillery eval CONFIG models.random=DIR`` through the CLI: (config, output dir)."""
    url, _ = judge_server
    tmp = tmp_path_factory.mktemp("eval_command")
    problems = load_problems(TaskConfig(**TASK), "eval", EVAL["num_problems"])
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{i}", "messages": [
        {"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.reference}]}) + "\n"
        for i, p in enumerate(problems[:PLANTED])))
    cfg = {"output_dir": str(tmp / "out"), "task": TASK, "models": {"demo": str(DEMO)}, "reference": "demo",
           "train_data": str(train), "device": "cpu",
           "eval": {**EVAL, "judge": {"model": {"backend": "openai", "model": "rule-judge", "base_urls": [url]},
                                      "max_items": 8}}}
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([CLI, "eval", str(path), f"models.random={tiny_model_dir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path, tmp / "out"


def test_report_numbers_equal_direct_evaluation(evaluated, tiny_model_dir):
    _, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["demo", "random"] and metrics["reference"] == "demo"
    problems = load_problems(TaskConfig(**TASK), "eval", EVAL["num_problems"])
    html, md = unescape((out / "report.html").read_text()), (out / "report.md").read_text()
    for name, model_dir in (("demo", DEMO), ("random", tiny_model_dir)):
        direct = evaluate_model(HFTeacher.from_pretrained(model_dir, device="cpu"), problems, EvalConfig(**EVAL))
        saved = json.loads((out / "eval" / f"{name}.json").read_text())
        assert [i["output"] for i in saved["items"]] == [i["output"] for i in direct["items"]]
        assert metrics["models"][name]["accuracy"] == direct["accuracy"]
        assert metrics["models"][name]["ci95"] == direct["ci95"]
        assert f"{100 * direct['accuracy']:.1f}%" in md
    assert metrics["models"]["demo"]["accuracy"] > 0.8  # the demo teacher on its own task
    row = metrics["scorecard"]["random"]
    acc = {n: metrics["models"][n]["accuracy"] for n in ("demo", "random")}
    assert row["retention"] == pytest.approx(acc["random"] / acc["demo"])
    assert "of demo's accuracy" in row["sentence"] and row["sentence"] in html


def test_judge_and_pitfalls(evaluated):
    _, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    pair = metrics["judge"]["random vs demo"]
    # a judge that always answers [[A]] contradicts itself on every pair: each counts ½
    assert pair["win_rate"]["rate"] == 0.5 and pair["win_rate"]["inconsistent"] == 8
    assert pair["position_bias_rate"] == 1.0 and pair["position_bias_n"] == 8
    found = {p["kind"]: p for p in metrics["pitfalls"]}
    assert found["position_bias"]["severity"] == "warning"
    contamination = found["contamination"]
    assert contamination["severity"] == "warning" and contamination["figures"]["contaminated"] == PLANTED
    planted = {i["id"] for i in json.loads((out / "eval" / "demo.json").read_text())["items"][:PLANTED]}
    assert set(contamination["figures"]["flagged"]) == planted
    html = unescape((out / "report.html").read_text())
    assert "random vs demo" in html and html.count("data:image/png;base64,") == 4
    # `distillery report` rebuilds the same report from the directory (train_data kept in metrics.json)
    proc = subprocess.run([CLI, "report", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((out / "metrics.json").read_text())
    assert again["pitfalls"] == metrics["pitfalls"] and again["scorecard"] == metrics["scorecard"]


def test_rerun_resumes(evaluated, judge_server, tiny_model_dir):
    path, out = evaluated
    _, prompts = judge_server
    markers = {p.stem: p.read_text() for p in (out / "stages").glob("*.json")}
    calls = len(prompts)
    cfg = load_config(path, EvalJobConfig, [f"models.random={tiny_model_dir}"])
    run_eval_job(cfg)
    assert {p.stem: p.read_text() for p in (out / "stages").glob("*.json")} == markers and len(prompts) == calls


def test_config_errors_name_the_key(tmp_path, monkeypatch):
    base = ["output_dir=x", f"models.teacher={DEMO}"]
    with pytest.raises(ConfigError, match="eval.judge.max_items"):
        load_config(None, EvalJobConfig, [*base, "eval.judge.model.model=j", "eval.judge.max_items=0"])
    with pytest.raises(ConfigError, match=r"eval\.judge\.model.*base_urls"):
        load_config(None, EvalJobConfig, [*base, "eval.judge.model.model=j", "eval.judge.model.backend=openai"])
    with pytest.raises(ConfigError, match="did you mean 'eval.judge.pointwise'"):
        load_config(None, EvalJobConfig, [*base, "eval.judge.model.model=j", "eval.judge.pointwyse=true"])
    with pytest.raises(ConfigError, match="reference model 'student'"):
        load_config(None, EvalJobConfig, [*base, "reference=student"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"eval\.lm_eval.*pip install 'distillery\[lm_eval\]'"):
        load_config(None, EvalJobConfig, [*base, "eval.lm_eval.tasks=[x]"])
    # the CLI: exit 2 and the message; a model directory that is not one is named
    (tmp_path / "bad.yaml").write_text(f"output_dir: {tmp_path / 'o'}\nmodels:\n  teacher: {tmp_path}\n")
    proc = subprocess.run([CLI, "eval", str(tmp_path / "bad.yaml"), "eval.num_problemz=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "did you mean 'eval.num_problems'" in proc.stderr
    with pytest.raises(FileNotFoundError, match=r"models\.teacher: .* \(no config\.json\)"):
        run_eval_job(load_config(tmp_path / "bad.yaml", EvalJobConfig))
