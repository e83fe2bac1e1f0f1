"""Benchmark: the logit cache codec on teacher distributions of a real vocabulary size, on CPU.

A small Llama (vocab 32000, and 128256 unless ``--quick``) gives the teacher distributions:

* ``flat``: the random-init model as is (near-uniform: the hard case for the ids);
* ``peaked``: its logits scaled so their std over the vocabulary is ``--peak-std`` (8: mean
  top-1 probability ~0.6, like a trained LM's); the scaled model is the teacher.

Per vocab, kind and k in (32, 64, 128), one JSON line: bytes/token and mean/max KL (nats, over
the k + 1 buckets: top-k and tail, float64) of raw top-k (int32 ids + fp16 log-probs + fp16 tail +
the token id) and of ours (the whole shard file / tokens), encode and decode tokens/s.
Per vocab one ``capture`` line: tokens/s of the plain forward alone and of the capture on the
same batches: forward + log_softmax + topk + tail + encode, the way ``HFTeacher.logprobs`` does it
(``hf``) and a lean variant (``lean``: topk on the logits, one logsumexp, the tail from the
top-k's own logsumexp), k = 64. Timings are medians of ``--repeats`` runs.

Usage: ``python bench/logit_cache.py [--quick] [--out bench/results_logit_cache_DATE.jsonl]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillery.logits import ShardReader, TopKExample, write_shard
from distillery.logits.format import _kl_rows, encode_positions


def build(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def hf_capture(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = logp.topk(k, dim=-1)
    log_tail = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_ids, top_lp, log_tail


def lean_capture(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax + topk; the tail from the top-k's own mass (float64): no second pass over V.
    Tails below ~1e-7 lose relative precision (float32 log-probs), which costs < 1e-7 nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = logp.topk(k, dim=-1)
    in_top = top_lp.double().logsumexp(-1).clamp(max=-1e-300)
    return top_ids, top_lp, torch.log(-torch.expm1(in_top)).float()


def to_examples(tokens: torch.Tensor, ids, lp, tail, start: int) -> list[TopKExample]:
    return [TopKExample(f"ex{start + i}", tokens[i].numpy(), ids[i].numpy(), lp[i].numpy(),
                        tail[i].numpy()) for i in range(tokens.shape[0])]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_bytes_and_kl(ex: TopKExample, vocab: int) -> tuple[int, np.ndarray]:
    """Raw top-k: int32 ids + fp16 log-probs + fp16 tail per position, the token id per token."""
    nbytes = ex.ids.size * 4 + ex.logprobs.size * 2 + ex.log_tail.size * 2
    nbytes += ex.token_ids.size * (2 if vocab <= 1 << 16 else 4)
    lp16 = ex.logprobs.astype(np.float16).astype(np.float64)
    lt16 = ex.log_tail.astype(np.float16).astype(np.float64)
    both = np.concatenate([lp16, lt16[:, None]], axis=1)
    both -= np.logaddexp.reduce(both, axis=1, keepdims=True)
    kl = _kl_rows(ex.logprobs.astype(np.float64), ex.log_tail.astype(np.float64),
                  both[:, :-1], both[:, -1])
    return nbytes, kl


def run_vocab(vocab: int, args: argparse.Namespace, emit) -> None:
    model = build(vocab)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(args.batches)]
    n_tokens = args.batch * args.seq * args.batches
    with torch.no_grad():
        std = statistics.mean(float(model(input_ids=b).logits.float().std(-1).mean()) for b in batches[:1])
    scale = {"flat": 1.0, "peaked": args.peak_std / std}

    # capture throughput, k = 64, on the peaked teacher (the forward is the same for both)
    def forward_only():
        with torch.no_grad():
            for b in batches:
                _ = model(input_ids=b).logits

    def capture(kind: str):
        def go():
            fn = hf_capture if kind == "hf" else lean_capture
            with torch.no_grad():
                for j, b in enumerate(batches):
                    logits = model(input_ids=b).logits * scale["peaked"]
                    ids, lp, tail = fn(logits, 64)
                    for ex in to_examples(b, ids, lp, tail, j * args.batch):
                        encode_positions(ex.ids, ex.logprobs, ex.log_tail, vocab_size=vocab)
        return go

    forward_only()  # warm up
    t_fwd = median_time(forward_only, args.repeats)
    t_hf = median_time(capture("hf"), args.repeats)
    t_lean = median_time(capture("lean"), args.repeats)
    emit({"what": "capture", "vocab": vocab, "k": 64, "tokens": n_tokens,
          "forward_tokens_per_s": round(n_tokens / t_fwd),
          "capture_hf_tokens_per_s": round(n_tokens / t_hf),
          "capture_lean_tokens_per_s": round(n_tokens / t_lean),
          "capture_hf_over_forward": round(t_hf / t_fwd, 3),
          "capture_lean_over_forward": round(t_lean / t_fwd, 3)})

    for kind in ("flat", "peaked"):
        with torch.no_grad():
            all_logits = [model(input_ids=b).logits * scale[kind] for b in batches]
        for k in (32, 64, 128):
            examples: list[TopKExample] = []
            for j, (b, logits) in enumerate(zip(batches, all_logits)):
                examples += to_examples(b, *hf_capture(logits, k), j * args.batch)
            raw_total, raw_kls = 0, []
            for ex in examples:
                nb, kl = raw_bytes_and_kl(ex, vocab)
                raw_total += nb
                raw_kls.append(kl)
            raw_kl = np.concatenate(raw_kls)
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "s.dlc"
                t_enc = median_time(lambda p=path, e=examples, k=k: write_shard(p, e, k, vocab, max_kl=args.max_kl),
                                    args.repeats)
                size = path.stat().st_size
                with ShardReader(path) as r:
                    t_dec = median_time(lambda r=r: [r[i] for i in range(len(r))], args.repeats)
                    decoded = [r[i] for i in range(len(r))]
            kls = []
            for ex, dec in zip(examples, decoded):
                order = np.argsort(ex.ids, axis=1, kind="stable")
                assert (np.take_along_axis(ex.ids, order, axis=1) == dec.ids).all()
                kls.append(_kl_rows(np.take_along_axis(ex.logprobs, order, axis=1).astype(np.float64),
                                    ex.log_tail.astype(np.float64), dec.logprobs.astype(np.float64),
                                    dec.log_tail.astype(np.float64)))
            kl = np.concatenate(kls)
            p1 = np.concatenate([np.exp(ex.logprobs[:, 0]) for ex in examples])
            tail = np.concatenate([np.exp(ex.log_tail) for ex in examples])
            emit({"what": "codec", "vocab": vocab, "kind": kind, "k": k, "tokens": n_tokens,
                  "mean_top1_p": round(float(p1.mean()), 4), "mean_tail_mass": round(float(tail.mean()), 4),
                  "raw_bytes_per_token": round(raw_total / n_tokens, 2),
                  "raw_mean_kl": float(f"{raw_kl.mean():.3g}"), "raw_max_kl": float(f"{raw_kl.max():.3g}"),
                  "ours_bytes_per_token": round(size / n_tokens, 2),
                  "ours_mean_kl": float(f"{kl.mean():.3g}"), "ours_max_kl": float(f"{kl.max():.3g}"),
                  "max_kl_setting": args.max_kl,
                  "encode_tokens_per_s": round(n_tokens / t_enc),
                  "decode_tokens_per_s": round(n_tokens / t_dec)})
        del all_logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-std", type=float, default=8.0)
    ap.add_argument("--max-kl", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = open(args.out, "a") if args.out else None

    def emit(obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit({"what": "setup", "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
          "threads": args.threads, "load_avg_1m": os.getloadavg()[0], "batch": args.batch,
          "seq": args.seq, "batches": args.batches, "repeats": args.repeats,
          "peak_std": args.peak_std, "model": "Llama hidden 256, 2 layers, random init"})
    for vocab in (32000,) if args.quick else (32000, 128256):
        run_vocab(vocab, args, emit)


if __name__ == "__main__":
    main()
