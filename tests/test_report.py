"""The run report: scorecard numbers, the self-contained HTML, `distillery report`, speed probes."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from distillery.chat import prompt_text
from distillery.evaluate.report import build_report, scorecard
from distillery.evaluate.speed import estimated_memory_bytes, kv_cache_bytes, measure_speed
from distillery.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "distillery")
N_ITEMS = 60
RESAMPLES = 2000


def _correct(seed: int, p: float) -> list[bool]:
    return list(np.random.default_rng(seed).random(N_ITEMS) < p)


def _model(correct: list[bool], decode: float, mem: float, params: int) -> dict:
    acc = float(np.mean(correct))
    return {"accuracy": acc, "ci95": [max(acc - 0.1, 0), min(acc + 0.1, 1)], "tokens_per_s": decode,
            "params": params, "tokens_per_s_batched": 4 * decode, "no_answer": 3, "n": N_ITEMS,
            "ttft_s": 0.01, "decode_tokens_per_s_batch1": decode, "decode_tokens_per_s_batched": 5 * decode,
            "peak_memory_mb": mem, "peak_memory_source": "estimate"}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A crafted run directory: metrics.json, per-item eval results, train logs, training data."""
    correct = {"teacher": _correct(0, 0.8), "student_a": _correct(1, 0.5), "student_b": _correct(2, 0.3)}
    speed = {"teacher": (100.0, 730.0, 7_300_000), "student_a": (230.0, 100.0, 1_000_000),
             "student_b": (400.0, 50.0, 500_000)}
    metrics = {"models": {n: _model(c, *speed[n]) for n, c in correct.items()}, "task": "arithmetic(test)",
               "n_eval": N_ITEMS, "comparisons": {"student_a - teacher": {"accuracy_diff": -0.3, "ci95": [-0.4, -0.2]}},
               "judge": {"student_a vs student_b": {"win_rate": {"rate": 0.62, "lo": 0.5, "hi": 0.74, "n": 40},
                                                     "position_bias_rate": 0.3, "position_bias_n": 40}}}
    metrics["models"]["teacher"]["lm_eval"] = {
        "toy_task": {"exact_match": {"value": 0.9, "stderr": 0.02, "ci95": [0.86, 0.94], "n": 50}}}
    (tmp_path / "eval").mkdir()
    for name, flags in correct.items():
        items = [{"id": str(i), "prompt": f"what is {i} plus {i} times three", "reference": str(i),
                  "output": "x", "answer": None if i < 3 else str(i), "correct": bool(c)}
                 for i, c in enumerate(flags)]
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps({"items": items}))
    for d in ("teacher", "students/student_a", "students/student_b"):
        (tmp_path / d).mkdir(parents=True)
        rows = [{"step": s, "loss": 3.0 / s, "ce": 2.5 / s} for s in range(1, 21)]
        (tmp_path / d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data").mkdir()
    rec = {"messages": [{"role": "user", "content": "what is 7 plus 7 times three"},
                        {"role": "assistant", "content": "28"}], "meta": {}}
    (tmp_path / "data" / "teacher_labeled.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


def test_scorecard_against_a_hand_computation(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    items = {n: json.loads((run_dir / "eval" / f"{n}.json").read_text())["items"] for n in metrics["models"]}
    card = scorecard(metrics["models"], items, resamples=RESAMPLES, seed=3)
    assert set(card) == {"student_a", "student_b"}
    t = np.array([i["correct"] for i in items["teacher"]], dtype=float)
    for name in card:
        s = np.array([i["correct"] for i in items[name]], dtype=float)
        # the paired bootstrap written the plain way: the same item indices for both models
        idx = np.random.default_rng(3).integers(0, N_ITEMS, size=(RESAMPLES, N_ITEMS))
        ratios = [s[i].mean() / t[i].mean() for i in idx]
        assert card[name]["retention"] == pytest.approx(s.mean() / t.mean())
        assert card[name]["retention_ci95"] == pytest.approx(list(np.quantile(ratios, [0.025, 0.975])))
    assert card["student_a"]["speedup"] == pytest.approx(2.3)
    assert card["student_a"]["memory_ratio"] == pytest.approx(7.3)
    lo, hi = card["student_a"]["retention_ci95"]
    r = card["student_a"]["retention"]
    assert card["student_a"]["sentence"] == (
        f"student_a keeps {100 * r:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%] of the teacher's accuracy "
        "at 2.3× the speed and 7.3× less memory")
    # without per-item results the interval comes from metrics.json's comparisons
    comps = {"student_a / teacher": {"accuracy_ratio": 0.535, "ci95": [0.491, 0.58]}}
    only = scorecard(metrics["models"], {}, comps)
    assert only["student_a"]["sentence"] == (
        "student_a keeps 53.5% [49.1%, 58.0%] of the teacher's accuracy at 2.3× the speed and 7.3× less memory")
    assert only["student_b"]["retention"] is None and "no retention figure" in only["student_b"]["sentence"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        if tag == "img":
            self.imgs.append(dict(attrs))
        self.scripts += tag == "script"

    def handle_data(self, data):  # noqa: ANN001
        self.text.append(data)


def _png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(data), format="png")


def test_report_command_rebuilds_a_self_contained_html(run_dir):
    before = json.loads((run_dir / "metrics.json").read_text())
    proc = subprocess.run([CLI, "report", str(run_dir), "--resamples", "500"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.md", "report.html", "accuracy.png", "retention.png", "loss_curves.png", "judge.png"):
        assert (run_dir / name).is_file(), name
    after = json.loads((run_dir / "metrics.json").read_text())
    for key, value in before.items():  # every key kept, with its content
        assert after[key] == value, key
    assert set(after["scorecard"]) == {"student_a", "student_b"}
    kinds = {p["kind"]: p["severity"] for p in after["pitfalls"]}
    assert kinds["position_bias"] == "warning" and kinds["contamination"] == "warning"  # crafted to fire

    page = _Page()
    page.feed((run_dir / "report.html").read_text())
    text = " ".join(page.text)
    assert page.scripts == 0
    assert len(page.imgs) == 4
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        pixels = _png_pixels(base64.b64decode(img["src"].split(",", 1)[1]))
        assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.01  # a drawn plot, not a blank image
    for row in after["scorecard"].values():
        assert row["sentence"] in text
    for name in before["models"]:
        assert name in text
    assert "toy_task" in text and "student_a vs student_b" in text and "position bias" in text
    md = (run_dir / "report.md").read_text()
    assert after["scorecard"]["student_a"]["sentence"] in md and "![retention vs speed-up](retention.png)" in md


def test_report_command_names_a_missing_metrics_file(tmp_path):
    proc = subprocess.run([CLI, "report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "metrics.json" in proc.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium (Debian `chromium`) is not installed")
def test_html_renders_in_headless_chromium(run_dir, tmp_path):
    build_report(run_dir, resamples=500)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1200,6000", f"--screenshot={shot}", (run_dir / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = _png_pixels(shot.read_bytes())[..., :3]
    # the plots are the only large non-white areas: rows far down the page carry ink
    ink_rows = np.where((pixels < 0.9).any(axis=(1, 2)))[0]
    assert ink_rows.size > 0 and ink_rows.max() > 1500, "no plots rendered below the tables"
    assert pixels[1500:].std() > 0.02
    # the accuracy plot (720 px wide, shown 1:1) is on screen: each model's bar colour, which
    # nothing else on the page uses, covers as many pixels as in accuracy.png itself
    plot = _png_pixels((run_dir / "accuracy.png").read_bytes())[..., :3]
    for colour in ("#4c72b0", "#dd8452", "#55a868"):
        rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        in_plot, on_screen = ((np.abs(img - rgb).max(axis=-1) < 4 / 255).sum() for img in (plot, pixels))
        assert in_plot > 1000 and on_screen >= 0.9 * in_plot, colour


def test_measure_speed_on_a_tiny_model(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = [prompt_text([{"role": "user", "content": f"{i}+{i}"}], tok) for i in range(3)]
    res = measure_speed(model, tok, prompts, max_new_tokens=6, throughput_batch=8, repeats=1)
    assert set(res) == {"ttft_s", "decode_tokens_per_s_batch1", "decode_tokens_per_s_batched",
                        "peak_memory_mb", "peak_memory_source", "params"}
    assert res["ttft_s"] > 0 and res["decode_tokens_per_s_batch1"] > 0
    # 8 rows per decode step cost far less than 8 steps on a tiny model
    assert res["decode_tokens_per_s_batched"] > res["decode_tokens_per_s_batch1"]
    assert res["params"] == sum(p.numel() for p in model.parameters())
    assert res["peak_memory_source"] == "estimate" and res["peak_memory_mb"] > 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        measure_speed(model, tok, prompts, max_new_tokens=1, throughput_batch=2)


def test_kv_cache_estimate_matches_a_real_cache(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(model, 3, 7) == real
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimated_memory_bytes(model, 3, 7) >= weights + real
