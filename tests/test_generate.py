"""`distillery generate` as a user runs it: a real subprocess, killed with SIGKILL and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distillery.records import read_jsonl

CLI = [sys.executable, "-m", "distillery.cli"]


def _config(tmp_path: Path, model_dir: Path, n_seeds: int, **extra) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i}+{i % 7}", "reference": str(i + i % 7)})
                             + "\n" for i in range(n_seeds)))
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "method": "labeling",
        "teacher": {"backend": "hf", "model": str(model_dir), "device": "cpu", "batch_size": 4},
        "seeds": {"path": str(seeds), "num": None},
        "sampling": {"max_new_tokens": 4},
        "labeling": {"chain_of_thought": False, "require_answer": False, "drop_truncated": False},
        # keep every record: this test counts them
        "filters": {"dedup": False, "near_dedup_threshold": None, "drop_refusals": False},
        **extra,
    }
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class _Result:
    def __init__(self, r):
        self.returncode, self.stderr, self.stdout = r.exit_code, r.output, ""


def _run(*args):
    """The CLI in this process (only the SIGKILL test needs a process of its own)."""
    from typer.testing import CliRunner

    from distillery.cli import app

    return _Result(CliRunner().invoke(app, list(args)))


def _kill_mid_run(cfg: Path, partial: Path, at_least: int, total: int) -> int:
    """Start `distillery generate`, SIGKILL it once ``at_least`` records are on disk."""
    proc = subprocess.Popen([*CLI, "generate", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().count("\n") >= at_least:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = partial.read_text().count("\n")
    assert at_least <= written < total, "the kill should land mid-run"
    return written


@pytest.mark.parametrize("backend", ["hf", "openai"])
def test_sigkill_mid_run_then_restart_loses_and_repeats_nothing(tmp_path, tiny_model_dir, backend):
    from fault_server import FaultServer

    server = None
    extra = {}
    total = 120
    if backend == "openai":
        # requests in flight when the process dies: a real HTTP server that answers after 50 ms
        server = FaultServer(delay_s=0.05, capacity=16).start()
        extra["teacher"] = {"backend": "openai", "model": "m", "base_urls": [server.base_url],
                            "max_concurrency": 16}
        total = 400
    try:
        cfg = _config(tmp_path, tiny_model_dir, total, **extra)
        partial = tmp_path / "out" / "work" / "labeled.jsonl.partial"
        written = _kill_mid_run(cfg, partial, 20, total)
        done = _run("generate", str(cfg))
    finally:
        if server is not None:
            server.stop()
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    records = read_jsonl(out / "records.jsonl")
    seeds = [f"q{i}" for i in range(total)]
    assert sorted(r["meta"]["seed_id"] for r in records) == sorted(seeds)  # each exactly once
    phase = json.loads((out / "summary.json").read_text())["phases"][0]
    assert phase["resumed"] == written and phase["resumed"] + phase["requests"] == total
    assert not partial.exists()


def test_rerun_is_free_and_refiltering_needs_no_teacher(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, 12)
    first = _run("generate", str(cfg))
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 12 and summary["tokens"]["teacher"]["completion"] > 0
    assert "labeled" in first.stderr and "records.jsonl" in first.stderr  # the summary table

    # a stricter filter on the same run: re-filtered from the phase files, no teacher tokens
    again = _run("generate", str(cfg), "filters.min_chars=1000")
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"]["teacher"]["completion"] == 0
    assert summary["records"] == 0 and summary["filters"]["records"]["rejected"]["length"] == 12
    rejects = read_jsonl(out / "rejects.jsonl")
    assert {r["stage"] for r in rejects} == {"filter:length"} and len(rejects) == 12


def test_changed_sampling_refuses_to_mix_into_an_old_run(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, 4)
    assert _run("generate", str(cfg)).returncode == 0
    res = _run("generate", str(cfg), "sampling.max_new_tokens=3")
    assert res.returncode == 2
    assert "different method, teacher" in res.stderr and "output_dir" in res.stderr


def test_an_api_key_in_the_config_file_is_refused_without_echoing_it(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, 4)
    data = yaml.safe_load(cfg.read_text())
    data["teacher"]["api_key"] = "sk-very-secret-123"
    cfg.write_text(yaml.safe_dump(data))
    res = _run("generate", str(cfg))
    assert res.returncode == 2
    assert "teacher.api_key" in res.stderr and "api_key_env" in res.stderr
    assert "sk-very-secret-123" not in res.stderr + res.stdout


def _teacher_over_http(base_urls, **kw):
    return {"backend": "openai", "model": "demo_teacher", "base_urls": base_urls, "max_concurrency": 8, **kw}


def test_openai_backend_against_distillery_serve_matches_the_local_teacher(tmp_path):
    from distillery.serve import start_server

    seeds = {"task": {"name": "arithmetic", "num_operands": 3, "digits": [1, 2]}, "num": 24}
    local = _config(tmp_path / "local", Path("assets/demo_teacher"), 1, seeds=seeds,
                    sampling={"max_new_tokens": 48})
    assert _run("generate", str(local)).returncode == 0
    with start_server("assets/demo_teacher", max_batch_size=8) as server:
        remote = _config(tmp_path / "remote", Path("assets/demo_teacher"), 1, seeds=seeds,
                         sampling={"max_new_tokens": 48}, teacher=_teacher_over_http([server.base_url]))
        res = _run("generate", str(remote))
    assert res.returncode == 0, res.stderr
    by_seed = {}
    for side in ("local", "remote"):
        recs = read_jsonl(tmp_path / side / "out" / "records.jsonl")
        by_seed[side] = {r["meta"]["seed_id"]: r["messages"][1]["content"] for r in recs}
    assert len(by_seed["local"]) == 24 and by_seed["local"] == by_seed["remote"]
    summary = json.loads((tmp_path / "remote" / "out" / "summary.json").read_text())
    assert summary["tokens"]["teacher"]["completion"] > 24 and summary["teacher"] == "demo_teacher"


def test_a_teacher_that_is_down_exits_2_and_a_rerun_retries_its_requests(tmp_path):
    """Server down for the first run: every request is a retryable reject and the command exits 2
    (not 0); the server comes up on the same port and the same command labels them all."""
    import socket

    from fault_server import FaultServer

    with socket.socket() as s:  # a port nobody listens on (yet)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(tmp_path, Path("assets/demo_teacher"), 5, teacher=_teacher_over_http(
        [f"http://127.0.0.1:{port}/v1"], max_retries=1, backoff_base_s=0.01))
    res = _run("generate", str(cfg))
    assert res.returncode == 2, res.stderr
    assert "none of the 5 requests got an answer" in res.stderr and "rejects.jsonl" in res.stderr
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert len(rejects) == 5 and all(r["reason"].startswith("teacher_error") and r["retryable"] for r in rejects)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["tokens"]["teacher"]["failed_requests"] == 5

    with FaultServer(port=port) as server:
        res = _run("generate", str(cfg))
        assert res.returncode == 0, res.stderr
        assert len(server.arrivals) == 5  # exactly the failed ones, each once
    records = read_jsonl(tmp_path / "out" / "records.jsonl")
    assert sorted(r["meta"]["seed_id"] for r in records) == [f"q{i}" for i in range(5)]
    assert read_jsonl(tmp_path / "out" / "rejects.jsonl") == []
    assert not (tmp_path / "out" / "work" / "labeled.retry").exists()
    with FaultServer(port=port) as server:  # a third run has nothing left to ask
        assert _run("generate", str(cfg)).returncode == 0
        assert server.arrivals == []


def test_failures_past_max_failure_rate_exit_2_and_keep_the_records(tmp_path):
    """A 400 is final (not retried by a re-run); over the threshold the command exits 2 with the
    records that succeeded written; under it, it exits 0."""
    from fault_server import Fault, FaultServer

    with FaultServer(prompt_faults={"1+1": Fault.http(400), "2+2": Fault.http(400)}) as server:
        teacher = _teacher_over_http([server.base_url], max_retries=0)
        cfg = _config(tmp_path / "strict", Path("assets/demo_teacher"), 10, teacher=teacher)
        res = _run("generate", str(cfg))
        assert res.returncode == 2, res.stderr
        assert "2 of 10 requests (20%) got no answer, more than max_failure_rate=0.1" in res.stderr
        assert "0 of the failures are retryable" in res.stderr
        out = tmp_path / "strict" / "out"
        assert len(read_jsonl(out / "records.jsonl")) == 8
        rejects = read_jsonl(out / "rejects.jsonl")
        assert len(rejects) == 2 and not any(r.get("retryable") for r in rejects)
        arrived = len(server.arrivals)
        assert _run("generate", str(cfg)).returncode == 2  # final failures are not sent again
        assert len(server.arrivals) == arrived

        lenient = _config(tmp_path / "lenient", Path("assets/demo_teacher"), 10, teacher=teacher,
                          max_failure_rate=0.25)
        assert _run("generate", str(lenient)).returncode == 0


ARITH = {"name": "arithmetic", "num_operands": 3, "digits": [1, 2]}
DEMO = {"backend": "hf", "model": "assets/demo_teacher", "device": "cpu", "batch_size": 16}
METHODS = {
    "expansion": {"expansion": {"strategy": "evol_instruct", "rounds": 1, "per_round": 4,
                                "max_new_tokens": 24, "temperature": 1.0}},
    "curation": {"curation": {"taxonomy": {"sums": ["two numbers", "three numbers"], "differences": ["small"]},
                              "tasks_per_subtopic": 2, "max_new_tokens": 24}},
    "feedback": {"student": DEMO, "feedback": {"samples_per_prompt": 2, "student_max_new_tokens": 24,
                                               "correct_below": 5}},
    "self_knowledge": {"student": DEMO, "self_knowledge": {"k": 2, "max_new_tokens": 48, "rationalize": True}},
}


@pytest.fixture(scope="module")
def long_context_teacher(tmp_path_factory):
    """A random 1-layer Llama with the demo tokenizer and 1024 positions: the methods' built-in
    prompts (300-400 tokens) do not fit the demo teacher's 128, which makes them ``too_long``."""
    from distillery.config import ModelConfig
    from distillery.models import build_model, load_tokenizer, save_model

    tok = load_tokenizer("assets/demo_teacher")
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu",
                                    max_position_embeddings=1024), tok)
    path = save_model(model, tok, tmp_path_factory.mktemp("long_context_teacher"))
    return {**DEMO, "model": str(path)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end_through_the_cli(tmp_path, method, long_context_teacher):
    cfg = {"output_dir": str(tmp_path / "out"), "method": method, "teacher": long_context_teacher,
           "seeds": {"task": ARITH, "num": 4}, "sampling": {"max_new_tokens": 24},
           "labeling": {"chain_of_thought": False, "require_answer": False, "drop_truncated": False},
           **METHODS[method]}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = _run("generate", str(path))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == method and summary["phases"]
    produced = sum(summary.get(k, 0) for k in ("records", "preferences")) + summary["rejects"]
    assert produced > 0  # every request ended somewhere: kept, or rejected with a reason
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert all(r.get("reason") for r in rejects)
    # a second run asks nobody anything
    again = _run("generate", str(path))
    assert again.returncode == 0, again.stderr
    tokens = json.loads((tmp_path / "out" / "summary.json").read_text())["tokens"]
    assert tokens["teacher"]["completion"] == 0 and tokens.get("student", {}).get("completion", 0) == 0


def test_method_feature_points_to_the_capture_stage(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, 2, method="feature")
    res = _run("generate", str(cfg))
    assert res.returncode == 2 and "distillery capture" in res.stderr
    assert not (tmp_path / "out" / "work").exists()  # refused before any work
