"""GPU check (issue 19 item 5): our fused loss against Liger-Kernel's, and a bf16 train step.

Two parts, one JSON line per figure, on ``--device`` (``cuda`` when there is one, else ``cpu``):

1. **Fused linear JSD** (β = 0.5, temperature 1) at Liger's published shape (``--hidden`` 4096,
   ``--vocab`` 128256, ``--tokens`` 8192, ``--dtype`` bfloat16; Liger publishes 60.7 ms and
   11.1 GB on an H100), set up as Liger's ``benchmark_fused_linear_jsd.py`` does: student and
   teacher hidden states ``[tokens, hidden]`` and lm_head weights ``[vocab, hidden]`` drawn from
   ``torch.rand``, the student's hidden states and weight trained (gradients for both). Per
   implementation: the median wall time of forward + backward over ``--repeats`` (after a
   warm-up; CUDA synchronized), ``max_memory_gb`` = ``torch.cuda.max_memory_allocated`` over one
   forward + backward (inputs and weights included, as Liger's ``_test_memory``; null on CPU) and
   the loss. Implementations: ``ours`` (``distillery.losses.distillation_loss`` in the ``fused``
   form with a teacher given as hidden states + lm_head, one line per ``--chunk-tokens``),
   ``liger_jsd_loss`` (``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``, hard-loss weight 0)
   and ``liger_fused_linear_jsd`` (``liger_kernel.transformers.LigerFusedLinearJSD``). When
   liger-kernel cannot be imported a ``{"part": "liger", "available": false, ...}`` line says so
   and the rest still runs. With ``--reference`` (default: when tokens × vocab ≤ 2e8) the loss is
   also computed the plain way in float64 (``reference_loss``).
2. **Train step at SmolLM2 shapes**: a random-init SmolLM2-135M (30 layers × 576, 9 heads, 3 KV
   heads, MLP 1536, V = 49152, tied embeddings) teaches a 15-layer student of the same widths,
   through the product's ``train_loop`` and ``LogitKDObjective`` (JSD β = 0.5, ``fused`` and
   ``dense``) with ``mixed_precision: bf16`` (``--dtype float32``: no autocast), ``--batch`` ×
   ``--seq`` random tokens, loss on the second half. tokens/s of the median step after
   ``--warmup`` steps and the peak CUDA memory. ``train_loop`` runs on accelerate's device (the
   GPU when there is one). The model shapes are flags (``--model-*``) for a tiny CPU run.

A final ``summary`` line gives ours against Liger (time and memory ratios, fastest ``ours``).

Usage: ``python bench/gpu_check.py [--device cuda] [--hidden H --vocab V --tokens N]
[--dtype bfloat16] [--chunk-tokens 256,1024] [--parts loss,train] [--out FILE]``;
``bench/gpu_check.sh`` runs it with the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import Marks, build_items, emitter, run_ours  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    gc.collect()  # the previous run's models and optimizer (reference cycles) go first
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def loss_inputs(args, device: torch.device) -> dict[str, torch.Tensor]:
    """Liger's benchmark set-up: ``torch.rand`` hidden states ``[tokens, hidden]`` and weights
    ``[vocab, hidden]``; the student's hidden states and weight are trained."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    dtype = DTYPES[args.dtype]

    def rand(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.rand(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    return {"h_s": rand(args.tokens, args.hidden, grad=True), "w_s": rand(args.vocab, args.hidden, grad=True),
            "h_t": rand(args.tokens, args.hidden), "w_t": rand(args.vocab, args.hidden),
            "labels": torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)}


def ours_loss(chunk_tokens: int):
    from distillery.losses import LossSpec, distillation_loss

    spec = LossSpec(divergence="jsd", beta=0.5, form="fused", chunk_tokens=chunk_tokens)

    def run(x: dict[str, torch.Tensor]) -> torch.Tensor:
        return distillation_loss(spec, student_hidden=x["h_s"], lm_head_weight=x["w_s"],
                                 teacher_hidden=x["h_t"], teacher_lm_head_weight=x["w_t"])[0]
    return run


def liger_losses() -> tuple[dict, dict]:
    """Liger's two fused linear JSD losses that import here, and a line saying what is missing."""
    found, missing = {}, {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0)
        found["liger_jsd_loss"] = lambda x: module(x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"])
    except Exception as e:  # noqa: BLE001 - absent or broken (no triton): reported, not fatal
        missing["liger_jsd_loss"] = f"{type(e).__name__}: {e}"
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        fl = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
        found["liger_fused_linear_jsd"] = lambda x: fl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], None)
    except Exception as e:  # noqa: BLE001
        missing["liger_fused_linear_jsd"] = f"{type(e).__name__}: {e}"
    return found, missing


def reference_jsd(x: dict[str, torch.Tensor]) -> float:
    """JSD (β = 0.5) the plain way in float64: full logits, log-softmax, mean over tokens."""
    log_q = F.log_softmax(x["h_s"].detach().double() @ x["w_s"].detach().double().T, -1)
    log_p = F.log_softmax(x["h_t"].double() @ x["w_t"].double().T, -1)
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return float((0.5 * kl_pm + 0.5 * kl_qm).mean())


def time_loss(fn, x: dict[str, torch.Tensor], device: torch.device, repeats: int) -> dict:
    """Median forward + backward time, peak memory of one more, the loss."""
    def step() -> float:
        x["h_s"].grad = x["w_s"].grad = None
        loss = fn(x)
        loss.backward()
        return float(loss.detach())

    step()  # warm-up (compilation, autotuning, allocator)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    x["h_s"].grad = x["w_s"].grad = None
    peak_reset(device)
    loss = step()
    return {"ms_fwd_bwd": round(1e3 * statistics.median(times), 2), "ms_min": round(1e3 * min(times), 2),
            "max_memory_gb": peak_gb(device), "loss": loss}


def loss_part(args, device: torch.device, emit) -> dict[str, dict]:
    x = loss_inputs(args, device)
    if args.save_inputs:  # for a test to compute its own reference on the same tensors
        torch.save({k: v.detach().cpu() for k, v in x.items()}, args.save_inputs)
    shape = {"part": "fused_loss", "hidden": args.hidden, "vocab": args.vocab, "tokens": args.tokens,
             "dtype": args.dtype, "device": str(device)}
    reference = reference_jsd(x) if args.reference else None
    impls = {f"ours_chunk{c}": ours_loss(c) for c in args.chunk_tokens}
    found, missing = liger_losses()
    emit({"part": "liger", "available": bool(found), "found": sorted(found), "missing": missing})
    impls.update(found)
    rows = {}
    for name, fn in impls.items():
        try:
            rows[name] = {**shape, "impl": name, **time_loss(fn, x, device, args.repeats)}
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other lines still come
            emit({**shape, "impl": name, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        if reference is not None:
            rows[name].update(reference_loss=reference,
                              loss_rel_err=abs(rows[name]["loss"] - reference) / max(abs(reference), 1e-30))
        emit(rows[name])
    return rows


def smollm2(layers: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.model_vocab, hidden_size=args.model_hidden,
                      intermediate_size=args.model_intermediate, num_hidden_layers=layers,
                      num_attention_heads=args.model_heads, num_key_value_heads=args.model_kv_heads,
                      max_position_embeddings=max(args.seq, 2048), rope_theta=100000.0,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def train_part(args, device: torch.device, emit) -> dict[str, dict]:
    """The product's train step at SmolLM2 shapes, bf16 autocast: ours fused and dense."""
    rows = {}
    for form in ("fused", "dense"):
        torch.manual_seed(0)
        student, teacher = smollm2(args.student_layers, args), smollm2(args.model_layers, args)
        items = build_items(args.batch, args.seq, args.model_vocab)
        run_args = SimpleNamespace(impl="ours" if form == "fused" else "ours_dense", warmup=args.warmup,
                                   steps=args.steps, batch=args.batch, seq=args.seq,
                                   mixed_precision="bf16" if args.dtype == "bfloat16" else "no")
        marks = Marks()
        peak_reset(device)
        try:
            losses = run_ours(run_args, student, teacher, items, marks)
        except Exception as e:  # noqa: BLE001 - reported; the other form still runs
            emit({"part": "train_step", "form": form, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        wall = [w for w, _, _ in marks.steps()[args.warmup:]]
        tokens = args.batch * args.seq
        rows[form] = {"part": "train_step", "impl": run_args.impl, "form": form,
                      "device": str(next(student.parameters()).device), "mixed_precision": run_args.mixed_precision,
                      "student": f"{args.student_layers}x{args.model_hidden}",
                      "teacher": f"{args.model_layers}x{args.model_hidden}", "vocab": args.model_vocab,
                      "batch": args.batch, "seq": args.seq, "tokens_per_step": tokens,
                      "step_seconds": [round(w, 4) for w in wall],
                      "tokens_per_s": round(tokens / statistics.median(wall), 1),
                      "max_memory_gb": peak_gb(device), "loss_first": losses[0], "loss_last": losses[-1]}
        emit(rows[form])
        del student, teacher
    return rows


def summary(losses: dict[str, dict], train: dict[str, dict]) -> dict:
    out: dict = {"summary": True}
    ours = [r for n, r in losses.items() if n.startswith("ours")]
    best = min(ours, key=lambda r: r["ms_fwd_bwd"]) if ours else None
    if best:
        out["ours_best"] = {"impl": best["impl"], "ms_fwd_bwd": best["ms_fwd_bwd"], "max_memory_gb": best["max_memory_gb"]}
    for name, r in losses.items():
        if name.startswith("liger") and best:
            mem = (None if r["max_memory_gb"] is None or best["max_memory_gb"] is None
                   else round(best["max_memory_gb"] / r["max_memory_gb"], 3))
            out[f"vs_{name}"] = {"ms_fwd_bwd": r["ms_fwd_bwd"], "max_memory_gb": r["max_memory_gb"],
                                 "time_ratio_ours_over_liger": round(best["ms_fwd_bwd"] / r["ms_fwd_bwd"], 3),
                                 "memory_ratio_ours_over_liger": mem}
    if "fused" in train and "dense" in train:
        out["train_fused_over_dense_tokens_per_s"] = round(train["fused"]["tokens_per_s"] / train["dense"]["tokens_per_s"], 3)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default="loss,train", help="loss, train or both")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk-tokens", default="256,1024", help="ours: tokens per chunk, comma-separated")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                    help="also the float64 plain loss (default: when tokens × vocab <= 2e8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-hidden", type=int, default=576)
    ap.add_argument("--model-layers", type=int, default=30)
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--model-heads", type=int, default=9)
    ap.add_argument("--model-kv-heads", type=int, default=3)
    ap.add_argument("--model-intermediate", type=int, default=1536)
    ap.add_argument("--model-vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    ap.add_argument("--save-inputs", type=Path, default=None, help="torch.save the loss part's inputs here")
    args = ap.parse_args(argv)
    args.chunk_tokens = [int(c) for c in args.chunk_tokens.split(",")]
    if args.reference is None:
        args.reference = args.tokens * args.vocab <= 2e8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    emit = emitter(args.out)
    env = {"part": "env", "date": datetime.date.today().isoformat(), "device": str(device),
           "torch": torch.__version__, "cuda": torch.version.cuda, "machine": platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    emit(env)
    parts = args.parts.split(",")
    losses = loss_part(args, device, emit) if "loss" in parts else {}
    train = train_part(args, device, emit) if "train" in parts else {}
    emit(summary(losses, train))


if __name__ == "__main__":
    main()
