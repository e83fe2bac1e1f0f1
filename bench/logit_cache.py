"""Benchmark: the logit cache codec on teacher distributions of a real vocabulary size, on CPU.

A small Llama (vocab 32000, and 128256 unless ``--quick``) gives the teacher distributions:

* ``flat``: the random-init model as is (near-uniform: the hard case for the ids);
* ``peaked``: its logits scaled so their std over the vocabulary is ``--peak-std`` (8: mean
  top-1 probability ~0.6, like a trained LM's); the scaled model is the teacher.

Per vocab, kind and k in (32, 64, 128), one JSON line: bytes/token and mean/max KL (nats, over
the k + 1 buckets: top-k and tail, float64) of raw top-k (int32 ids + fp16 log-probs + fp16 tail +
the token id) and of ours (the whole shard file / tokens), encode and decode tokens/s.
Per vocab and teacher size one ``capture`` line: tokens/s of the plain forward alone and of the
capture on the same batches (``distillery.teachers.hf.topk_logprobs``, the function
``HFTeacher.logprobs`` and ``distillery capture`` run: forward + logsumexp + topk + tail, then the
shard encoder), k = 64. Two teacher sizes: ``tiny`` (2 layers × 256, where the lm_head is most of
the forward: the worst case for the overhead), ``small`` (6 layers × 768) and, with
``--sizes medium``, 12 layers × 1024: the larger the transformer relative to the lm_head, the
closer the capture gets to the forward alone, as with real teachers. Timings are medians of ``--repeats`` runs.

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
from distillery.losses import TeacherTopK
from distillery.teachers.hf import topk_logprobs

SIZES = {"tiny": (256, 2), "small": (768, 6), "medium": (1024, 12)}


def build(vocab: int, size: str = "tiny", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    hidden, layers = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def capture_batch(model, batch: torch.Tensor, k: int, temperature: float = 1.0) -> list[TeacherTopK]:
    return topk_logprobs(model, batch.tolist(), k, temperature=temperature, batch_size=batch.shape[0])


def to_examples(tokens: torch.Tensor, tops: list[TeacherTopK], start: int) -> list[TopKExample]:
    return [TopKExample(f"ex{start + i}", tokens[i].numpy(), t.ids.numpy(), t.logprobs.numpy(),
                        t.log_tail.numpy()) for i, t in enumerate(tops)]


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


def capture_throughput(vocab: int, size: str, batches: list[torch.Tensor], args, emit) -> None:
    """Forward alone vs the whole capture (forward, top-k, tail, encode) on the same batches."""
    model = build(vocab, size)
    n_tokens = sum(b.numel() for b in batches)

    def forward_only():
        with torch.no_grad():
            for b in batches:
                _ = model(input_ids=b).logits

    def capture():
        for b in batches:
            for t in capture_batch(model, b, 64):
                encode_positions(t.ids.numpy(), t.logprobs.numpy(), t.log_tail.numpy(), vocab_size=vocab)

    forward_only()  # warm up
    t_fwd = median_time(forward_only, args.repeats)
    t_cap = median_time(capture, args.repeats)
    emit({"what": "capture", "vocab": vocab, "teacher": size, "layers_x_hidden": list(SIZES[size][::-1]),
          "k": 64, "tokens": n_tokens, "forward_tokens_per_s": round(n_tokens / t_fwd),
          "capture_tokens_per_s": round(n_tokens / t_cap), "capture_over_forward": round(t_cap / t_fwd, 3)})


def run_vocab(vocab: int, args: argparse.Namespace, emit) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(args.batches)]
    n_tokens = args.batch * args.seq * args.batches
    for size in args.sizes.split(","):
        capture_throughput(vocab, size, batches, args, emit)
    if args.capture_only:
        return
    model = build(vocab)
    with torch.no_grad():
        std = statistics.mean(float(model(input_ids=b).logits.float().std(-1).mean()) for b in batches[:1])
    scale = {"flat": 1.0, "peaked": args.peak_std / std}

    for kind in ("flat", "peaked"):
        for k in (32, 64, 128):
            examples: list[TopKExample] = []
            for j, b in enumerate(batches):  # the peaked teacher = the model at temperature 1/scale
                examples += to_examples(b, capture_batch(model, b, k, 1 / scale[kind]), j * args.batch)
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
    ap.add_argument("--sizes", default="tiny,small", help="teacher sizes for the capture lines: " + ",".join(SIZES))
    ap.add_argument("--capture-only", action="store_true", help="only the capture lines")
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
          "peak_std": args.peak_std, "model": "Llama random init; codec lines: tiny (2 layers x 256)"})
    for vocab in (32000,) if args.quick else (32000, 128256):
        run_vocab(vocab, args, emit)


if __name__ == "__main__":
    main()
