"""``distillery grade OUTPUTS.jsonl --task TASK.yaml [--json]`` on real files, through the real
command: the installed ``distillery`` script in a subprocess for the main runs, typer's
CliRunner (the same app object) for the many bad-input cases."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from distillery.cli import app
from distillery.config import TaskConfig
from distillery.evaluate.stats import bootstrap_ci
from distillery.tasks import is_correct, load_problems

DISTILLERY = Path(sys.executable).parent / "distillery"

TASK = [
    {"id": "q1", "prompt": "22+55+2", "reference": "79"},
    {"id": "q2", "prompt": "8-9", "reference": "-1"},
    {"id": "q3", "prompt": "What is 3/4 as a decimal?", "reference": "0.75"},
    {"id": "q4", "prompt": "78-73", "reference": "5"},
    {"id": "q5", "prompt": "6*7", "reference": "42"},
    {"id": "q6", "prompt": "9+10", "reference": "19"},
]
OUTPUTS = [
    {"id": "q1", "output": "22+55=77;77+2=79;#79"},  # the demo's chain
    {"prompt": "8-9", "output": "8 minus 9 is below zero. The answer: \u22121"},  # matched by prompt
    {"id": "q3", "output": "3/4 = 0.75\n\\boxed{0.75}"},
    {"id": "q4", "output": "The answer is 78-73"},  # numeric: wrong (an expression, not 78)
    {"id": "q5", "output": "6*7=42; answer 42"},
    {"id": "q6", "output": "9+10=19;19+"},  # cut off: no answer
]


def _write(tmp_path: Path, grader=None, outputs=OUTPUTS) -> tuple[Path, Path]:
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TASK))
    task = {"name": "jsonl", "path": str(tmp_path / "task.jsonl")}
    if grader is not None:
        task["grader"] = grader
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"task": task, "eval": {"bootstrap_resamples": 1000}}))
    out = tmp_path / "outputs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in outputs))
    return out, tmp_path / "task.yaml"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DISTILLERY), "grade", *args], capture_output=True, text=True, timeout=120)


def test_grade_a_file_with_json(tmp_path):
    outputs, task = _write(tmp_path)
    proc = _run(str(outputs), "--task", str(task), "--json")
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) == {"accuracy", "ci95", "n", "no_answer"}
    correct = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    acc, lo, hi = bootstrap_ci(correct, 1000, seed=0)
    assert last == {"accuracy": pytest.approx(4 / 6), "ci95": pytest.approx([lo, hi]), "n": 6, "no_answer": 1}
    assert acc == pytest.approx(4 / 6)
    graded = [json.loads(line) for line in (tmp_path / "outputs.graded.jsonl").read_text().splitlines()]
    assert [g["id"] for g in graded] == ["q1", "q2", "q3", "q4", "q5", "q6"]
    assert [g["status"] for g in graded] == ["correct", "correct", "correct", "wrong", "correct", "no_answer"]
    assert graded[3]["answer"] == "78-73"  # read whole, never as 78
    assert graded[1]["reference"] == "-1" and graded[1]["prompt"] == "8-9"


def test_grade_a_file_without_json_and_with_the_tasks_grader(tmp_path):
    outputs, task = _write(tmp_path, grader="symbolic")
    proc = _run(str(outputs), "--task", str(task))
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("accuracy 0.833 [") and first.endswith("over 6 outputs (grader symbolic); no answer: 1")
    assert "per-item results: " in proc.stdout and not proc.stdout.strip().splitlines()[-1].startswith("{")


def test_grade_with_a_judge_over_http(tmp_path):
    """The judge grader through a real openai backend: an OpenAI-compatible server on 127.0.0.1
    whose judge says CORRECT when the answer is right by the numeric grader."""
    from rule_judge import serve_rules

    def verdict(view):
        return "VERDICT: CORRECT" if is_correct(view.answers[0], view.reference) else "VERDICT: INCORRECT"

    with serve_rules(verdict) as (url, prompts):
        grader = {"name": "judge", "model": {"backend": "openai", "model": "rule-judge", "base_urls": [url]}}
        outputs, task = _write(tmp_path, grader=grader)
        res = CliRunner().invoke(app, ["grade", str(outputs), "--task", str(task), "--json"])
    assert res.exit_code == 0, res.output
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert (last["accuracy"], last["no_answer"]) == (pytest.approx(4 / 6), 0)
    # one judge prompt per output (a retried request under load may repeat one)
    assert len(set(prompts)) == 6 and any("[The Start of Reference Answer]\n79\n" in p for p in prompts)


def test_grade_the_arithmetic_task_by_id(tmp_path):
    """A generated task: the items are the held-out problems eval draws (eval.num_problems, seed)."""
    cfg = TaskConfig(num_operands=3, digits=2)
    problems = load_problems(cfg, "eval", 20, seed=3)
    rng = np.random.default_rng(0)
    right = rng.random(20) < 0.6
    lines = [{"id": p.id, "output": p.chain if ok else p.chain.replace(f"#{p.reference}", f"#{int(p.reference) + 1}")}
             for p, ok in zip(problems, right)]
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(
        {"task": cfg.model_dump(mode="json"), "eval": {"num_problems": 20, "seed": 3, "bootstrap_resamples": 500}}))
    res = CliRunner().invoke(app, ["grade", str(tmp_path / "out.jsonl"), "--task", str(tmp_path / "task.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(right.mean())


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "q1", "output": "#79"}', '{"id": "nope", "output": "#1"}'], r"outputs.jsonl:2: no task item has id 'nope'"),
        (['{"id": "q1", "output": "#79"}', "{not json"], r"outputs.jsonl:2: not valid JSON"),
        (['{"id": "q1"}'], r"outputs.jsonl:1: needs \"output\""),
        (['{"output": "#79"}'], r"outputs.jsonl:1: needs \"id\" or \"prompt\""),
        (['["q1", "#79"]'], r"outputs.jsonl:1: each line must be a JSON object"),
        (['{"prompt": "1+1", "output": "#2"}'], r"outputs.jsonl:1: no task item has prompt '1\+1'"),
        ([], r"outputs.jsonl: no outputs"),
    ],
)
def test_bad_outputs_exit_2_naming_file_and_line(tmp_path, lines, message):
    outputs, task = _write(tmp_path)
    outputs.write_text("".join(line + "\n" for line in lines))
    res = CliRunner().invoke(app, ["grade", str(outputs), "--task", str(task)])
    assert res.exit_code == 2, res.output
    assert re.search(message, " ".join(res.stderr.split())), res.stderr
    assert not (tmp_path / "outputs.graded.jsonl").exists()


def test_bad_task_files_exit_2(tmp_path):
    outputs, task = _write(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["grade", str(tmp_path / "missing.jsonl"), "--task", str(task)])
    assert res.exit_code == 2 and "outputs file not found" in res.stderr
    task.write_text("eval: {}\n")
    res = runner.invoke(app, ["grade", str(outputs), "--task", str(task)])
    assert res.exit_code == 2 and "task" in res.stderr
    task.write_text(yaml.safe_dump({"task": {"name": "jsonl", "path": str(tmp_path / "task.jsonl"),
                                             "grader": {"name": "regex", "pattern": "(a)(b)"}}}))
    res = runner.invoke(app, ["grade", str(outputs), "--task", str(task)])
    assert res.exit_code == 2 and "2 groups" in res.stderr
    task.write_text(yaml.safe_dump({"task": {"name": "jsonl", "path": str(tmp_path / "task.jsonl"), "grader": "judge"}}))
    res = runner.invoke(app, ["grade", str(outputs), "--task", str(task)])
    assert res.exit_code == 2 and "task.grader.model" in res.stderr
