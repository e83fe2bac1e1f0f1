"""`distillery run` as a real job: every section is a stand-alone job's config.

The teacher is served over HTTP on 127.0.0.1 by distillery's own server (the shipped demo
teacher behind ``/v1``), and the run talks to it as it would to vLLM: it writes data by
*expansion* (new instructions, then labels), a *capture* stage stores its top-k log-probs
(prompt log-probs through ``/v1/completions``), one pretrained student trains with logit_kd from
that cache and one with on_policy against the live teacher, and evaluation asks an LLM judge
(the rule judge of ``rule_judge.py``, also over HTTP). A second run redoes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distillery.serve import start_server
from rule_judge import judge_rule, prefers_correct, serve_rules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "distillery")
DEMO = ROOT / "assets" / "demo_teacher"
STUDENTS = ("student_kd_cache", "student_on_policy")


@pytest.fixture(scope="module")
def pretrained_student(tmp_path_factory) -> Path:
    """A 'pretrained' small model on disk with the teacher's tokenizer: loaded from a path like a
    user's checkpoint (random weights are enough to show the path is taken)."""
    from distillery.config import ModelConfig
    from distillery.models import build_model, load_tokenizer, save_model

    tok = load_tokenizer(str(DEMO))
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=128,
                                    device="cpu"), tok)
    return save_model(model, tok, tmp_path_factory.mktemp("pretrained_student"))


@pytest.fixture(scope="module")
def servers():
    with start_server(DEMO, model_name="demo-teacher", max_batch_size=8, device="cpu") as teacher:
        with serve_rules(judge_rule(prefers_correct)) as (judge_url, judge_prompts):
            yield teacher, judge_url, judge_prompts


def _config(tmp: Path, teacher_url: str, judge_url: str, student_dir: Path) -> Path:
    remote = {"backend": "openai", "model": "demo-teacher", "base_urls": [teacher_url], "max_concurrency": 4}
    cfg = {
        "run_dir": str(tmp / "run"),
        "task": {"num_operands": 3, "digits": [1, 2], "operations": ["+", "-"]},  # the demo teacher's task
        "teacher": {"path": str(DEMO)},  # the local copy: the on-policy student's live teacher, and evaluated
        "generate": {
            "method": "expansion",
            "teacher": remote,
            "seeds": {"num": 6},
            # the demo teacher reads 128 tokens at most: a short prompt of examples (a user
            # template, rendered sandboxed) instead of the built-in instruction
            "expansion": {"per_round": 4, "examples_per_prompt": 2, "max_new_tokens": 16,
                          "drop_truncated": False, "temperature": 1.0,
                          "self_instruct_template": "{{ examples | join(' ') }}"},
            "sampling": {"max_new_tokens": 40},
            "labeling": {"chain_of_thought": False, "require_answer": False, "drop_truncated": False},
            "filters": {"near_dedup_threshold": None, "drop_refusals": False},
        },
        "capture": {"teacher": remote, "k": 8, "max_seq_len": 96},
        "defaults": {
            "model": {"path": str(student_dir), "device": "cpu"},
            "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "max_seq_len": 96},
        },
        "students": {
            "student_kd_cache": {"train": {"objective": {"name": "logit_kd", "loss": {"kd_ratio": 0.5}}}},
            "student_on_policy": {"train": {"objective": {"name": "on_policy", "lmbda": 1.0,
                                                          "max_new_tokens": 8}}},
        },
        "eval": {"num_problems": 8, "batch_size": 8, "max_new_tokens": 40, "bootstrap_resamples": 200,
                 "speed_prompts": 1,
                 "judge": {"model": {"backend": "openai", "model": "rule-judge", "base_urls": [judge_url]},
                           "pairwise": True, "pointwise": False, "max_items": 4}},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _markers(run_dir: Path) -> dict[str, float]:
    return {p.stem: json.loads(p.read_text())["finished"] for p in (run_dir / "stages").glob("*.json")}


def _run(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([CLI, "run", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def test_run_composes_the_stage_jobs_and_a_rerun_redoes_nothing(tmp_path, servers, pretrained_student):
    teacher, judge_url, judge_prompts = servers
    config = _config(tmp_path, teacher.base_url, judge_url, pretrained_student)
    proc = _run(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "run"

    # generate: expansion through the remote teacher wrote new instructions and labeled them
    summary = json.loads((run_dir / "generate" / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "generate" / "records.jsonl").read_text().splitlines()]
    assert summary["method"] == "expansion" and summary["records"] == len(records) > 6
    assert {r["meta"]["method"] for r in records} >= {"expansion"}
    assert summary["tokens"]["teacher"]["completion"] > 0
    # capture: one cached row per record, k = 8, scored by the server
    manifest = json.loads((run_dir / "capture" / "manifest.json").read_text())
    assert manifest["count"] == len(records) and manifest["k"] == 8
    # the students are the train jobs the run filled in: one from the cache, one with the live teacher
    for name in STUDENTS:
        meta = json.loads((run_dir / "students" / name / "distillery.json").read_text())
        job = meta["config"]
        assert job["model"]["path"] == str(pretrained_student) and meta["steps"] == 3
        assert job["data"]["path"] == str(run_dir / "generate" / "records.jsonl")
    kd = json.loads((run_dir / "students" / "student_kd_cache" / "distillery.json").read_text())["config"]
    op = json.loads((run_dir / "students" / "student_on_policy" / "distillery.json").read_text())["config"]
    assert kd["teacher_cache"] == str(run_dir / "capture") and kd["teacher"] is None
    assert op["teacher"]["path"] == str(DEMO) and op["teacher_cache"] is None
    # eval with the judge
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", *STUDENTS}
    assert set(metrics["judge"]) == {f"{s} vs teacher" for s in STUDENTS}
    # both orders, 4 items, per student; a prompt asked twice (two students answering alike) is
    # answered from the judge's response cache
    assert 0 < len(judge_prompts) == len(set(judge_prompts)) <= 2 * 4 * len(STUDENTS)

    # a second run: every stage is found done; no request reaches the teacher or the judge
    before, teacher_calls, judge_calls = _markers(run_dir), teacher.stats.requests, len(judge_prompts)
    assert teacher_calls > 0
    assert {"generate", "capture", "train_student_kd_cache", "train_student_on_policy", "judge"} <= set(before)
    proc = _run(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _markers(run_dir) == before
    assert teacher.stats.requests == teacher_calls and len(judge_prompts) == judge_calls
