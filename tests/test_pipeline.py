"""End to end at a tiny size: `distillery run` through the CLI, then resume and staleness."""

from __future__ import annotations

import json
import subprocess
import sys
from html import unescape
from pathlib import Path

import torch
import yaml

from distillery.config import load_config
from distillery.pipeline import run_pipeline
from distillery.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "distillery")

TINY_TEACHER = {
    "output_dir": "unused",
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64, "device": "cpu"},
    "tokenizer": {"vocab_size": 300},
    "data": {"task": {"name": "arithmetic"}, "num_examples": 300, "target": "chain"},
    "train": {"steps": 20, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "max_seq_len": 48},
}


def _tiny_run_config(tmp: Path) -> Path:
    (tmp / "teacher.yaml").write_text(yaml.safe_dump(TINY_TEACHER))
    cfg = {
        "run_dir": str(tmp / "run"),
        "task": {"num_operands": 2, "digits": [1, 2]},
        "teacher": {"path": str(tmp / "no_teacher_here"), "recipe": str(tmp / "teacher.yaml"), "batch_size": 24},
        "generate": {"seeds": {"num": 48, "seed": 1}, "sampling": {"max_new_tokens": 12},
                     "labeling": {"chain_of_thought": False, "require_answer": False, "drop_truncated": False},
                     "filters": {"near_dedup_threshold": None, "drop_refusals": False}},
        "defaults": {
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64,
                      "device": "cpu"},
            "train": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "max_seq_len": 48},
        },
        "students": {
            "student_ground_truth": {"data": {"source": "task", "target": "answer", "num_examples": 48},
                                     "train": {"objective": "sft"}},
            "student_distilled": {"train": {"objective": "logit_kd"}},
        },
        "eval": {"num_problems": 30, "batch_size": 15, "max_new_tokens": 12, "bootstrap_resamples": 200, "speed_prompts": 2},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _markers(run_dir: Path) -> dict[str, float]:
    return {p.stem: json.loads(p.read_text())["finished"] for p in (run_dir / "stages").glob("*.json")}


def test_demo_pipeline_end_to_end_then_resumes(tmp_path):
    config = _tiny_run_config(tmp_path)
    proc = subprocess.run([CLI, "run", str(config), "defaults.train.lr=0.004"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "student_ground_truth", "student_distilled"}
    for m in metrics["models"].values():
        assert isinstance(m["accuracy"], float) and 0 <= m["accuracy"] <= 1
        lo, hi = m["ci95"]
        assert lo <= m["accuracy"] <= hi
        assert m["tokens_per_s"] > 0 and isinstance(m["params"], int) and m["params"] > 0
        # the speed probe's figures, per model
        assert m["ttft_s"] > 0 and m["decode_tokens_per_s_batched"] > 0 and m["peak_memory_mb"] > 0
        assert m["tokens_per_s"] == m["decode_tokens_per_s_batch1"]
    assert metrics["n_eval"] == 30 and metrics["task"].startswith("arithmetic")
    assert (run_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "student_distilled" in (run_dir / "report.md").read_text()
    assert "keeps" in metrics["scorecard"]["student_distilled"]["sentence"] or metrics["models"]["teacher"]["accuracy"] == 0
    html = unescape((run_dir / "report.html").read_text())
    assert metrics["scorecard"]["student_distilled"]["sentence"] in html and html.count("data:image/png;base64,") == 3
    assert "How each model was made" in html  # the pipeline's own sections, kept for `distillery report`
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    # the override, recorded in the run and reaching every student
    assert all(s["train"]["lr"] == 0.004 for s in resolved["students"].values())
    # the students are plain HF directories
    assert (run_dir / "students" / "student_distilled" / "model.safetensors").is_file()
    # the teacher-labeled data follows the records contract
    rec = json.loads((run_dir / "generate" / "records.jsonl").read_text().splitlines()[0])
    assert rec["meta"]["method"] == "labeling" and rec["messages"][0]["role"] == "user"

    # a re-run with the same config skips every stage
    cfg = load_config(config, RunConfig, ["defaults.train.lr=0.004"])
    before = _markers(run_dir)
    again = run_pipeline(cfg)
    assert _markers(run_dir) == before
    assert again["models"]["teacher"]["accuracy"] == metrics["models"]["teacher"]["accuracy"]

    # more student steps: the students retrain and are re-evaluated; teacher and data do not
    cfg = load_config(config, RunConfig, ["defaults.train.lr=0.004", "defaults.train.steps=7"])
    run_pipeline(cfg)
    after = _markers(run_dir)
    for stage in ("teacher", "generate"):
        assert after[stage] == before[stage], stage
    for stage in ("train_student_distilled", "train_student_ground_truth", "eval_student_distilled"):
        assert after[stage] > before[stage], stage
    assert after["eval_teacher"] == before["eval_teacher"]

    # new sampling settings make the generated data stale: the run's own generate directory
    # (its phase files and partial files a killed run left) is redone, never resumed into
    work = run_dir / "generate" / "work"
    stale = json.loads((run_dir / "generate" / "records.jsonl").read_text().splitlines()[0])
    stale["id"] = "left-by-a-killed-run"
    (work / "labeled.jsonl.partial").write_text(json.dumps(stale) + "\n")
    run_pipeline(load_config(config, RunConfig, ["defaults.train.lr=0.004", "defaults.train.steps=7",
                                                 "generate.sampling.max_new_tokens=10"]))
    lines = (run_dir / "generate" / "records.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert "left-by-a-killed-run" not in ids and len(ids) == 48
    assert all(json.loads(line)["meta"]["sampling"]["max_new_tokens"] == 10 for line in lines)
    assert _markers(run_dir)["train_student_distilled"] > after["train_student_distilled"]  # new data, retrained


def test_run_never_deletes_a_directory_it_did_not_make(tmp_path):
    config = _tiny_run_config(tmp_path)
    mine = tmp_path / "run" / "generate"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    proc = subprocess.run([CLI, "run", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "was not made by distillery run" in proc.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_train_command_saves_a_loadable_model(tmp_path):
    from distillery.models import load_model, load_tokenizer

    cfg = dict(TINY_TEACHER, output_dir=str(tmp_path / "out"))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([CLI, "train", str(tmp_path / "t.yaml"), "train.steps=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, tok = load_model(str(tmp_path / "out")), load_tokenizer(str(tmp_path / "out"))
    assert model.config.vocab_size == len(tok)
    meta = json.loads((tmp_path / "out" / "distillery.json").read_text())
    assert meta["steps"] == 3 and meta["config"]["train"]["steps"] == 3
    assert len((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()) >= 1


def test_run_reports_config_errors_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nteacher: {path: assets/demo_teacher}\nstudents:\n  s:\n    train:\n      stepz: 3\n")
    proc = subprocess.run([CLI, "run", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bad.yaml:6" in proc.stderr and "students.s.train.steps" in proc.stderr


def test_report_names_how_each_student_learned():
    """The report's "how each model was made" line says a student crossed tokenizers, and how."""
    from distillery.pipeline import _report_sections

    cfg = load_config(Path(__file__).parents[1] / "configs/demo_cross_tokenizer.yaml", RunConfig)
    teacher = Path("assets/demo_teacher")
    jobs = {name: cfg.student_job(name, teacher) for name in cfg.students}
    items = [{"prompt": "1+2+3", "reference": "6", "output": "#6", "answer": "6", "correct": True}]
    results = {name: {"items": items, "no_answer": 0} for name in ("teacher", *jobs)}
    _, notes = _report_sections(cfg, {}, results, teacher, jobs)
    assert ("- **student_xtok_kd**: 2 layers × 64 hidden from random weights, 1200 steps of logit_kd "
            "(loss={'kd_ratio': 0.5}, cross_tokenizer={'method': 'vocab_map'}) at batch 64, on the records the "
            "teacher wrote (labeling; the teacher never saw the answers).") in notes
    assert "- **student_sft_own_tokenizer**: 2 layers × 64 hidden from random weights, 1200 steps of sft " in notes


def test_a_student_killed_mid_training_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL `distillery run` once a student has written a checkpoint: the next run continues
    that student from it (same fingerprint) and ends with the weights of an uninterrupted run."""
    import signal
    import time

    from safetensors.torch import load_file

    from distillery.train.checkpoint import list_checkpoints

    config = _tiny_run_config(tmp_path)
    every = ["defaults.train.steps=40", "defaults.train.checkpoint.every=4", "defaults.train.checkpoint.keep_last=20"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "run"
    ckpts = killed / "students" / "student_distilled.checkpoints"
    proc = subprocess.Popen([CLI, "run", str(config), *every], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list_checkpoints(ckpts) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list_checkpoints(ckpts)
    assert left, "the run ended before a checkpoint of student_distilled was written"
    again = subprocess.run([CLI, "run", str(config), *every], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after step" in again.stderr

    clean = subprocess.run([CLI, "run", str(config), *every, f"run_dir={tmp_path / 'clean'}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a = load_file(killed / "students" / "student_distilled" / "model.safetensors")
    b = load_file(tmp_path / "clean" / "students" / "student_distilled" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpts.exists()  # removed once the model is safe


def test_every_objective_is_a_student_of_a_run(tmp_path):
    """A run's students are whole train jobs: preference on the generated pairs, reward with a
    verifier (no teacher loaded) or the teacher's log-probs (the run's teacher, live), LoRA on a
    model from a path, a student pruned from the run's teacher; each resolves to the job
    `distillery train` would run."""
    cfg = load_config(None, RunConfig, [
        "teacher.path=/models/teacher", f"run_dir={tmp_path}", "generate.method=feedback",
        "generate.student={backend: hf, model: /models/student}",
        "students.pref.model.path=/models/student", "students.pref.data.source=preferences",
        "students.pref.train.objective=preference",
        "students.rl.model.path=/models/student", "students.rl.train.objective={name: reward, source: verifier}",
        "students.rl_teacher.model.path=/models/student",
        "students.rl_teacher.train.objective={name: reward, source: teacher_logprob}",
        "students.lora.model.path=/models/student", "students.lora.train.lora={r: 8}",
        "students.pruned.model.prune={source: teacher, layers: 2}", "students.pruned.train.objective=logit_kd",
    ])
    teacher = Path("/models/teacher")
    pref, rl, rl_t, lora, pruned = (cfg.student_job(n, teacher) for n in ("pref", "rl", "rl_teacher", "lora", "pruned"))
    assert pref.data.path == str(tmp_path / "generate" / "preferences.jsonl") and pref.teacher is None
    assert rl.teacher is None and rl.data.path == str(tmp_path / "generate" / "records.jsonl")
    assert rl_t.teacher is not None and rl_t.teacher.path == str(teacher)
    assert lora.train.lora.r == 8 and lora.model.path == "/models/student" and lora.tokenizer.path is None
    assert pruned.model.prune.source == str(teacher) and pruned.teacher.path == str(teacher)
    assert pruned.tokenizer.path == str(teacher)  # a model built here speaks the teacher's tokens
    assert {j.output_dir for j in (pref, rl, rl_t, lora, pruned)} == {
        str(tmp_path / "students" / n) for n in ("pref", "rl", "rl_teacher", "lora", "pruned")}
