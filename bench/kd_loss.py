"""Benchmark: one forward + backward of a distillation loss, per implementation, on CPU.

Each implementation runs in its own subprocess (this script re-runs itself with ``--impl``),
one after another, and prints one JSON object per line:

    {"impl", "tokens", "vocab", "hidden", "seconds", "extra_peak_rss_gb", "baseline_rss_gb", "loss"}

* ``seconds``: wall time of forward + backward of the loss (the lm_head projection included).
* ``cpu_seconds``: user + system CPU time of the process over the same region (all threads);
  on a shared machine this is the fairer comparison, wall time depends on the neighbours' load.
* ``extra_peak_rss_gb``: peak RSS during forward + backward minus the RSS right before it, i.e.
  *after* the inputs exist (student hidden + lm_head weight, teacher hidden + its lm_head weight,
  and for ``*_tlogits`` the teacher logits). RSS is sampled from /proc/self/statm every 5 ms in
  a background thread. The student's lm_head gradient (vocab × hidden × 4 bytes) is part of it.

Every implementation gets the same inputs: student hidden ``[T, H]`` (requires grad) and lm_head
``[V, H]`` (a Parameter), teacher hidden ``[T, H]`` and lm_head ``[V, H]``. The dense baselines
compute the teacher logits inside the timed region under ``no_grad`` (a teacher forward would
have to); the ``*_tlogits`` variants receive precomputed teacher logits instead.

Usage: ``python bench/kd_loss.py`` (full: T=2048, V=128256, H=2048), ``--quick`` (small),
``--tokens/--vocab/--hidden``, ``--impls a,b``, ``--chunk-tokens``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

IMPLS = [
    "dense_fkl",
    "dense_fkl_tlogits",
    "trl_gkd_jsd",
    "trl_chunked_jsd",
    "ours_fused_fkl",
    "ours_fused_jsd",
    "ours_fused_fkl_tlogits",
]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples RSS every ``interval`` seconds in a thread; ``peak`` is the max seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def torchtune_forward_kl(student_logits, teacher_logits, labels):
    """torchtune's ForwardKLLoss, written out (softmax over the full logits)."""
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != -100).int()
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def build(impl, T, V, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(T, H, generator=g).requires_grad_()
    s_weight = torch.nn.Parameter(torch.randn(V, H, generator=g) / H**0.5)
    t_hidden = torch.randn(T, H, generator=g)
    t_weight = torch.randn(V, H, generator=g) / H**0.5 * 1.5
    inputs = dict(s_hidden=s_hidden, s_weight=s_weight, t_hidden=t_hidden, t_weight=t_weight)
    if impl.endswith("_tlogits"):
        with torch.no_grad():
            inputs["t_logits"] = t_hidden @ t_weight.T
    return inputs


def run_loss(impl, x, chunk_tokens):
    s_hidden, s_weight, t_hidden, t_weight = x["s_hidden"], x["s_weight"], x["t_hidden"], x["t_weight"]
    T = s_hidden.shape[0]
    if impl in ("dense_fkl", "dense_fkl_tlogits", "trl_gkd_jsd"):
        if "t_logits" in x:
            t_logits = x["t_logits"]
        else:
            with torch.no_grad():
                t_logits = t_hidden @ t_weight.T
        logits = s_hidden @ s_weight.T
        if impl == "trl_gkd_jsd":
            from trl.experimental.gkd import GKDTrainer

            loss = GKDTrainer.generalized_jsd_loss(logits[None], t_logits[None], beta=0.5)
        else:
            loss = torchtune_forward_kl(logits, t_logits, torch.zeros(T, dtype=torch.long))
        del logits, t_logits
    elif impl == "trl_chunked_jsd":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        per_token, _entropy = ChunkedDivergenceFunction.apply(
            s_hidden, s_weight, None, t_hidden, t_weight, None, 0.5, 1.0
        )
        loss = per_token.mean()
    else:
        from distillery.losses import LossSpec, distillation_loss

        div = "jsd" if "jsd" in impl else "forward_kl"
        spec = LossSpec(divergence=div, form="fused", chunk_tokens=chunk_tokens,
                        **({"beta": 0.5} if div == "jsd" else {}))
        teacher = (
            {"teacher_logits": x["t_logits"]} if "t_logits" in x
            else {"teacher_hidden": t_hidden, "teacher_lm_head_weight": t_weight}
        )
        loss, _ = distillation_loss(spec, student_hidden=s_hidden, lm_head_weight=s_weight, **teacher)
    loss.backward()
    return float(loss.detach())


def _import_for(impl):
    """Import outside the timed region (trl's import alone takes seconds)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if impl == "trl_gkd_jsd":
        import trl.experimental.gkd  # noqa: F401
    elif impl == "trl_chunked_jsd":
        import trl.kernels.chunked_divergence  # noqa: F401
    elif impl.startswith("ours"):
        import distillery.losses  # noqa: F401


def _cpu_seconds():
    """User + system CPU time of this process (all threads): robust to other load on the machine."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child(args):
    T, V, H = args.tokens, args.vocab, args.hidden
    _import_for(args.impl)
    x = build(args.impl, T, V, H)
    import gc

    gc.collect()
    base = rss_bytes()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    with PeakRSS() as mon:
        loss = run_loss(args.impl, x, args.chunk_tokens)
    seconds = time.perf_counter() - t0
    cpu_seconds = _cpu_seconds() - cpu0
    print(json.dumps({
        "impl": args.impl, "tokens": T, "vocab": V, "hidden": H,
        "chunk_tokens": args.chunk_tokens if args.impl.startswith("ours") else None,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "extra_peak_rss_gb": round((mon.peak - base) / 1e9, 3),
        "baseline_rss_gb": round(base / 1e9, 3),
        "loss": round(loss, 6),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
    }), flush=True)


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _estimated_peak_bytes(impl, T, V, H):
    """Inputs + the extra peak measured earlier per [T, V] float32 tensor (rough, for skipping)."""
    inputs = 4 * (2 * T * H + 2 * V * H)
    per_tv = {"trl_gkd_jsd": 16, "dense_fkl": 5, "dense_fkl_tlogits": 6}.get(impl, 3)
    return inputs + per_tv * 4 * T * V


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="small shape (T=256, V=8192, H=256)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.hidden = 256, 8192, 256
    if args.impl:
        child(args)
        return
    for impl in args.impls.split(","):
        need = _estimated_peak_bytes(impl, args.tokens, args.vocab, args.hidden)
        avail = _available_bytes()
        if avail is not None and need > 0.9 * avail:
            print(json.dumps({"impl": impl, "tokens": args.tokens, "vocab": args.vocab,
                              "hidden": args.hidden, "skipped": f"needs ~{need / 1e9:.1f} GB, "
                              f"{avail / 1e9:.1f} GB available"}), flush=True)
            continue
        cmd = [sys.executable, __file__, "--impl", impl, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--hidden", str(args.hidden),
               "--chunk-tokens", str(args.chunk_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(json.dumps({"impl": impl, "error": err, "returncode": proc.returncode}), flush=True)
        else:
            sys.stdout.write(proc.stdout)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
