"""bench/gpu_check.py's plumbing on CPU at tiny shapes: its JSON lines, and our fused loss there
against a float64 JSD written the plain way on the very tensors the script used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--dtype", "float32", "--hidden", "64", "--vocab", "1000", "--tokens", "64",
        "--chunk-tokens", "16,64", "--repeats", "2", "--model-hidden", "64", "--model-layers", "2",
        "--student-layers", "1", "--model-heads", "4", "--model-kv-heads", "2", "--model-intermediate", "128",
        "--model-vocab", "1000", "--batch", "2", "--seq", "32", "--warmup", "1", "--steps", "2"]


def plain_jsd(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor) -> float:
    """0.5·KL(p‖m) + 0.5·KL(q‖m), m = (p + q) / 2, in float64 from the full logits; token mean."""
    q = torch.softmax(h_s.double() @ w_s.double().T, -1)
    p = torch.softmax(h_t.double() @ w_t.double().T, -1)
    m = (p + q) / 2
    kl_pm = (p * (p.log() - m.log())).sum(-1)
    kl_qm = (q * (q.log() - m.log())).sum(-1)
    return float((0.5 * kl_pm + 0.5 * kl_qm).mean())


def test_gpu_check_plumbing_on_cpu(tmp_path: Path) -> None:
    inputs, out = tmp_path / "inputs.pt", tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *TINY,
                           "--save-inputs", str(inputs), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [json.loads(ln) for ln in out.read_text().splitlines()] == lines  # --out gets the same lines
    by_part: dict[str, list[dict]] = {}
    for line in lines:
        by_part.setdefault(line.get("part", "summary" if line.get("summary") else "?"), []).append(line)
    assert by_part["env"][0]["device"] == "cpu"

    # liger: present or not, one line says which; liger-kernel needs triton, so absent here
    (liger,) = by_part["liger"]
    assert isinstance(liger["available"], bool)
    names = ("liger_jsd_loss", "liger_fused_linear_jsd")
    assert set(liger["found"]) | set(liger["missing"]) == set(names)

    x = torch.load(inputs)
    assert x["h_s"].shape == (64, 64) and x["w_s"].shape == (1000, 64)
    reference = plain_jsd(x["h_s"], x["w_s"], x["h_t"], x["w_t"])
    assert reference > 1e-3  # two different random heads: a divergence worth comparing
    rows = {r["impl"]: r for r in by_part["fused_loss"]}
    assert {"ours_chunk16", "ours_chunk64"} <= set(rows)
    for name in ("ours_chunk16", "ours_chunk64"):
        r = rows[name]
        assert (r["hidden"], r["vocab"], r["tokens"], r["dtype"]) == (64, 1000, 64, "float32")
        assert r["ms_fwd_bwd"] > 0 and r["max_memory_gb"] is None  # no CUDA memory on CPU
        assert abs(r["loss"] - reference) <= 1e-5 * reference, (name, r["loss"], reference)
        assert abs(r["reference_loss"] - reference) <= 1e-12 * reference  # the script's own float64 one

    train = {r["form"]: r for r in by_part["train_step"]}
    assert set(train) == {"fused", "dense"}
    for r in train.values():
        assert r["tokens_per_step"] == 2 * 32 and r["tokens_per_s"] > 0 and len(r["step_seconds"]) == 2
        assert (r["student"], r["teacher"], r["mixed_precision"]) == ("1x64", "2x64", "no")
    # the same models and batch: the first step's loss agrees between the two forms
    assert abs(train["fused"]["loss_first"] - train["dense"]["loss_first"]) <= 1e-5 * train["dense"]["loss_first"]

    (summary,) = by_part["summary"]
    assert summary["ours_best"]["impl"] in ("ours_chunk16", "ours_chunk64")
    assert summary["train_fused_over_dense_tokens_per_s"] > 0
