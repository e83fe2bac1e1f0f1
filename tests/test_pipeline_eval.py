"""`distillery run` with an LLM judge and lm-eval tasks: results in metrics.json and the report.

The run's teacher is the shipped ``assets/demo_teacher`` (~97% on its task); the students are
tiny and barely trained, so the two sides differ on most items. The judge is the rule-based
backend of ``tests/rule_judge.py`` behind a real OpenAI-compatible HTTP endpoint, configured as
``eval.judge.model: {backend: openai, base_urls: [...]}`` like any hosted judge; it prefers
the answer that matches the reference, so every win rate and grade can be computed from the
per-item outputs the plain way.
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

from distillery.answers import extract_final_answer
from distillery.config import load_config
from distillery.pipeline import run_pipeline
from distillery.run_config import RunConfig
from distillery.tasks import is_correct
from rule_judge import judge_rule, prefers_correct, serve_rules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "distillery")
JUDGED = 12  # eval.judge.max_items
STUDENTS = ("student_ground_truth", "student_distilled")


@pytest.fixture(scope="module")
def judge_server():
    with serve_rules(judge_rule(prefers_correct)) as handle:
        yield handle


def _config(tmp: Path, judge_url: str) -> Path:
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 128, "device": "cpu"}
    cfg = {
        "run_dir": str(tmp / "run"),
        "task": {"num_operands": 3, "digits": [1, 2], "operations": ["+", "-"]},  # the demo teacher's task
        "teacher": {"path": str(ROOT / "assets" / "demo_teacher"), "batch_size": 32},
        "generate": {"seeds": {"num": 32}, "sampling": {"max_new_tokens": 40},
                     "labeling": {"chain_of_thought": False, "require_answer": False, "drop_truncated": False},
                     "filters": {"near_dedup_threshold": None, "drop_refusals": False}},
        "defaults": {"model": tiny, "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "max_seq_len": 64}},
        "students": {"student_ground_truth": {"data": {"source": "task", "target": "answer", "num_examples": 32},
                                             "train": {"objective": "sft"}},
                     "student_distilled": {"train": {"objective": "logit_kd"}}},
        "eval": {"num_problems": 20, "batch_size": 20, "max_new_tokens": 40, "bootstrap_resamples": 200,
                 "speed_prompts": 2,
                 "judge": {"model": {"backend": "openai", "model": "rule-judge", "base_urls": [judge_url]},
                           "pairwise": True, "pointwise": True, "max_items": JUDGED}},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory, judge_server):
    """The pipeline run through the CLI: (config path, run dir, judge prompts seen)."""
    url, prompts = judge_server
    tmp = tmp_path_factory.mktemp("pipeline_eval")
    config = _config(tmp, url)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([CLI, "run", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, tmp / "run", prompts


def _items(run_dir: Path, name: str) -> list[dict]:
    return json.loads((run_dir / "eval" / f"{name}.json").read_text())["items"][:JUDGED]


def _markers(run_dir: Path) -> dict[str, float]:
    return {p.stem: json.loads(p.read_text())["finished"] for p in (run_dir / "stages").glob("*.json")}


def test_judge_results_in_metrics_and_report(judged_run):
    _, run_dir, prompts = judged_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    teacher = _items(run_dir, "teacher")
    assert set(metrics["judge"]) == {f"{s} vs teacher" for s in STUDENTS}
    for s in STUDENTS:
        student = _items(run_dir, s)
        # the rule's verdict per pair, both orders agreeing: 1 student right only, 0 teacher right only, ½ else
        right = [(is_correct(a["output"], a["reference"]), is_correct(b["output"], b["reference"]))
                 for a, b in zip(student, teacher)]
        expected = sum(1.0 if a and not b else 0.0 if b and not a else 0.5 for a, b in right) / JUDGED
        row = metrics["judge"][f"{s} vs teacher"]
        assert row["win_rate"]["rate"] == pytest.approx(expected) and row["win_rate"]["n"] == JUDGED
        assert row["position_bias_rate"] == 0.0 and row["position_bias_n"] == JUDGED
        assert row["length_controlled"]["n"] == JUDGED
    for name in ("teacher", *STUDENTS):
        outs = _items(run_dir, name)
        scores = [9 if is_correct(i["output"], i["reference"]) else 3 for i in outs
                  if extract_final_answer(i["output"]).answer is not None]
        grade = metrics["judge_pointwise"][name]
        assert grade["graded"] == len(scores) and grade["unparsed"] == JUDGED - len(scores)
        assert grade["mean_score"] == (pytest.approx(sum(scores) / len(scores)) if scores else None)
    assert metrics["judge_pointwise"]["teacher"]["mean_score"] > 8  # the demo teacher is right ~97% of the time
    assert len(prompts) == 2 * JUDGED * len(STUDENTS) + JUDGED * 3  # both orders per pair, one grade per answer

    kinds = {p["kind"]: p["severity"] for p in metrics["pitfalls"]}
    assert kinds["position_bias"] == "ok"
    html = unescape((run_dir / "report.html").read_text())
    md = (run_dir / "report.md").read_text()
    for text in (html, md):
        assert "student_distilled vs teacher" in text and "Judge grades" in text
        assert "the teacher's batch-1 decode speed" not in text  # one headline: the scorecard
    assert html.count("data:image/png;base64,") == 4 and "judge win rates" in html  # judge.png embedded
    assert (run_dir / "judge.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(metrics["scorecard"][s]["sentence"] in html for s in STUDENTS) == 2


def test_rerun_pays_no_judge_calls(judged_run):
    config, run_dir, prompts = judged_run
    before, calls = _markers(run_dir), len(prompts)
    again = run_pipeline(load_config(config, RunConfig))
    assert _markers(run_dir) == before and len(prompts) == calls
    # other judge settings: the judge stage runs again, answered from its cache (no new calls)
    changed = run_pipeline(load_config(config, RunConfig, ["eval.judge.pointwise=false"]))
    after = _markers(run_dir)
    assert after["judge"] > before["judge"] and len(prompts) == calls
    assert all(after[k] == before[k] for k in before if k != "judge")
    assert changed["judge"] == again["judge"] and "judge_pointwise" not in changed


def test_lm_eval_stage_added_to_a_finished_run(judged_run, tmp_path):
    pytest.importorskip("lm_eval")
    from distillery.evaluate.lm_eval_adapter import run_lm_eval
    from test_lm_eval_adapter import TASK_YAML, make_docs

    config, run_dir, _ = judged_run
    data = tmp_path / "tiny_sums.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in make_docs(20)))
    (tmp_path / "tiny_sums.yaml").write_text(TASK_YAML.format(data=data))
    lm = ["eval.lm_eval.tasks=[tiny_sums]", f"eval.lm_eval.include_path={tmp_path}", "eval.lm_eval.device=cpu"]
    before = _markers(run_dir)
    metrics = run_pipeline(load_config(config, RunConfig, lm))
    after = _markers(run_dir)
    # training, data and accuracy are reused: lm-eval settings are not part of their fingerprints
    assert all(after[k] == before[k] for k in before if k != "judge")  # (the test above left other judge settings)
    assert {k for k in after if k.startswith("lm_eval_")} == {"lm_eval_teacher", *(f"lm_eval_{s}" for s in STUDENTS)}
    direct = run_lm_eval(ROOT / "assets" / "demo_teacher", ["tiny_sums"], include_path=str(tmp_path), device="cpu")
    assert metrics["models"]["teacher"]["lm_eval"] == direct["lm_eval"]
    for s in STUDENTS:
        assert metrics["models"][s]["lm_eval"]["tiny_sums"]["acc"]["n"] == 20
    md = (run_dir / "report.md").read_text()
    assert "## lm-evaluation-harness" in md and md.count("| tiny_sums | acc |") == 3
    assert 'id="lm-eval"' in (run_dir / "report.html").read_text()
