"""End to end at a tiny size: `distillery run` through the CLI, then resume and staleness."""

from __future__ import annotations

import json
import subprocess
import sys
from html import unescape
from pathlib import Path

import yaml

from distillery.config import RunConfig, load_config
from distillery.pipeline import run_pipeline

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
        "teacher": {"path": str(tmp / "no_teacher_here"), "recipe": str(tmp / "teacher.yaml")},
        "student": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 64, "device": "cpu"},
        "generate": {"num_problems": 48, "batch_size": 24, "max_new_tokens": 12},
        "train": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "max_seq_len": 48},
        "eval": {"num_problems": 30, "batch_size": 15, "max_new_tokens": 12, "bootstrap_resamples": 200, "speed_prompts": 2},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _markers(run_dir: Path) -> dict[str, float]:
    return {p.stem: json.loads(p.read_text())["finished"] for p in (run_dir / "stages").glob("*.json")}


def test_demo_pipeline_end_to_end_then_resumes(tmp_path):
    config = _tiny_run_config(tmp_path)
    proc = subprocess.run([CLI, "run", str(config), "train.lr=0.004"], cwd=ROOT, capture_output=True, text=True, timeout=600)
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
    assert resolved["train"]["lr"] == 0.004  # the override, recorded in the run
    # the students are plain HF directories
    assert (run_dir / "students" / "student_distilled" / "model.safetensors").is_file()
    # the teacher-labeled data follows the records contract
    rec = json.loads((run_dir / "data" / "teacher_labeled.jsonl").read_text().splitlines()[0])
    assert rec["meta"]["method"] == "labeling" and rec["messages"][0]["role"] == "user"

    # a re-run with the same config skips every stage
    cfg = load_config(config, RunConfig, ["train.lr=0.004"])
    before = _markers(run_dir)
    again = run_pipeline(cfg)
    assert _markers(run_dir) == before
    assert again["models"]["teacher"]["accuracy"] == metrics["models"]["teacher"]["accuracy"]

    # more student steps: the students retrain and are re-evaluated; teacher and data do not
    cfg = load_config(config, RunConfig, ["train.lr=0.004", "train.steps=7"])
    run_pipeline(cfg)
    after = _markers(run_dir)
    for stage in ("teacher", "data_teacher", "data_ground_truth_answer"):
        assert after[stage] == before[stage], stage
    for stage in ("train_student_distilled", "train_student_ground_truth", "eval_student_distilled"):
        assert after[stage] > before[stage], stage
    assert after["eval_teacher"] == before["eval_teacher"]

    # new sampling settings make the labeled data stale: a partial file a killed run left under
    # the old settings must not be resumed into the new data
    data = run_dir / "data" / "teacher_labeled.jsonl"
    stale = json.loads(data.read_text().splitlines()[0])
    stale["id"] = "left-by-a-killed-run"
    (run_dir / "data" / "teacher_labeled.jsonl.partial").write_text(json.dumps(stale) + "\n")
    run_pipeline(load_config(config, RunConfig, ["train.lr=0.004", "train.steps=7", "generate.max_new_tokens=10"]))
    ids = [json.loads(line)["id"] for line in data.read_text().splitlines()]
    assert "left-by-a-killed-run" not in ids and len(ids) == 48
    assert all(json.loads(line)["meta"]["sampling"]["max_new_tokens"] == 10 for line in data.read_text().splitlines())


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
    bad.write_text("run_dir: x\ntrain:\n  stepz: 3\n")
    proc = subprocess.run([CLI, "run", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bad.yaml:3" in proc.stderr and "train.steps" in proc.stderr


def test_report_names_how_each_student_learned():
    """The report's "how each model was made" line says a student crossed tokenizers, and how."""
    from distillery.pipeline import _describe_objective

    cfg = load_config(Path(__file__).parents[1] / "configs/demo_cross_tokenizer.yaml", RunConfig)
    kd, sft = cfg.students["student_xtok_kd"], cfg.students["student_sft_own_tokenizer"]
    assert _describe_objective(cfg, kd) == ("logit_kd (forward_kl, kd_ratio 0.5, T=1.0, form dense, "
                                            "across tokenizers by vocab_map (prefix mapping))")
    assert _describe_objective(cfg, sft) == "sft"
