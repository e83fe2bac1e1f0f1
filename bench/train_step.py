"""Benchmark: one off-policy logit-KD training step (generalized JSD, β = 0.5) on CPU, ours vs TRL.

Each implementation runs in its own subprocess (this script re-runs itself with ``--impl``), on
the same random-init models built from ``transformers.LlamaConfig`` with a fixed seed (student
8 layers × 512, teacher 12 layers × 768, intermediate 4 × hidden, vocab 32000, untied lm_heads),
the same batch (``--batch`` × ``--seq`` random token ids, no padding, labels on the second half of
each sequence: prompt/completion split), fp32, AdamW (lr 1e-5, betas (0.9, 0.95), no weight
decay), grad-norm clipping at 1.0, no gradient checkpointing. ``--rounds`` runs every
implementation that many times, every other round in reverse order (ours, dense, TRL, TRL,
dense, ours), so that a load that drifts during the run (a shared machine) hits all alike:

* ``ours``: the product's training path, run through ``distillery.train.loop.train_loop`` itself
  (called by its public signature) with ``LogitKDObjective(LossSpec(divergence="jsd",
  beta=0.5, form="fused"))`` and the product's
  ``Collator``. The objective is wrapped in a clock that only timestamps each ``loss()`` call
  (the start of each step); nothing else of the loop is replaced.
* ``ours_dense``: the same with ``form="dense"`` (full student and teacher logits).
* ``trl_gkd``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (no on-policy generation),
  ``beta=0.5``, ``seq_kd=False``, ``bf16=False``, ``use_cpu=True``, ``gradient_checkpointing=
  False`` (TRL's default is on; off does the same work as ours), the same collate function and an
  AdamW/schedule built exactly as ``train_loop`` builds them (passed in ``optimizers``). A
  ``TrainerCallback`` timestamps ``on_step_begin`` (and ``on_step_end`` of the last step).

A step's time runs from the start of one step to the start of the next (the last one to the end
of training); it includes fetching the batch, both forwards, the loss, backward, clipping, the
optimizer and the schedule. The first ``--warmup`` steps of each run are excluded. One JSON line
per run (``"part": "round"``), then per implementation one line (``"part": "impl"``) with the
figures of its fastest run (``best_round``; every run's median step and CPU pressure beside it in
``rounds_seconds_per_step``/``rounds_cpu_pressure``; memory: the highest of its runs), as timeit
takes the best of its repeats: on a shared machine the fastest run is the least disturbed one.
The figures of a run:

* ``tokens_per_step``: non-padding tokens of the batch (``attention_mask.sum()``), the same for all;
* ``tokens_per_s``: ``tokens_per_step / seconds_per_step`` (median step); ``tokens_per_s_mean``
  over the whole timed region; ``seconds_per_step`` (median), ``seconds_per_step_min``,
  ``step_seconds`` (all timed steps);
* ``cpu_seconds_per_step``: median user + system CPU time of the process per step (all threads);
  on a shared machine it is the fairer comparison: wall time depends on the neighbours' load;
* ``cpu_pressure``: median over the timed steps of the share of the step's wall time during which
  some task on the machine waited for a CPU (Linux PSI ``/proc/pressure/cpu``): near 0 on a quiet
  machine; on a shared one, steps with a high value are slowed by the neighbours, not the code;
* ``rss_before_gb``: RSS after the models and the batch exist, before the loop/trainer is built;
  ``peak_rss_gb``: peak RSS from there to the end of training (warm-up steps included: the
  optimizer state appears in the first step); ``extra_peak_rss_gb`` = peak − before. RSS is
  sampled from /proc/self/statm every 5 ms in a background thread (``bench/kd_loss.py``'s
  ``PeakRSS``);
* ``loss_first``/``loss_last``: the loss of the first and last step (the same model, batch and
  divergence: step 1 must agree between implementations; a sanity check, not a figure).

A final ``summary`` line gives, per ``ours*`` implementation, ``speedup_vs_trl`` (tokens/s
ratio), ``cpu_speedup_vs_trl`` (CPU-seconds-per-step ratio), ``peak_rss_ratio_vs_trl`` and
``extra_peak_rss_ratio_vs_trl``, and whether the issue's target (≥ 1.3× TRL's tokens/s at ≤ TRL's
peak memory) is met; ``quiet`` says whether every compared run had the cores to itself (median
``cpu_pressure`` < 0.2; alone on the machine it is ~0.05). When it is false, the ratios are not
the code's: other jobs took the cores, unevenly (libgomp threads spin while their partner is
descheduled, so even CPU seconds grow under load); run again on a quiet machine.

Duration: the default run (2 rounds × 3 implementations × (2 warm-up + 4 timed) steps of 2 × 512
tokens) takes about 9 minutes on the 2-core CPU machine when it is quiet (steps of ~5 s for ours,
~7.5 s for ours_dense, ~8 s for TRL; building the models and importing take ~15 s a run);
``--quick`` (tiny models, one round) about 35 seconds. Under load (other jobs on the cores) it
takes two to four times longer, and a loaded run's figures say more about the neighbours than the
code: read ``cpu_pressure`` and the summary's ``quiet`` first.

Usage: ``python bench/train_step.py [--quick] [--impls ours,trl_gkd] [--rounds R] [--steps N]
[--warmup N] [--batch B] [--seq S] [--threads T] [--out bench/results_train_step_DATE.jsonl]``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_loss import PeakRSS, _cpu_seconds, rss_bytes  # noqa: E402

IMPLS = ["ours", "ours_dense", "trl_gkd"]
# (layers, hidden, heads); intermediate = 4 × hidden
FULL = {"student": (8, 512, 8), "teacher": (12, 768, 12), "vocab": 32000, "seq": 512}
QUICK = {"student": (2, 64, 2), "teacher": (2, 96, 2), "vocab": 1000, "seq": 64}
IGNORE = -100
QUIET_PRESSURE = 0.2  # median share of a step with some task waiting for a CPU; ~0.05 when alone


def build_model(layers: int, hidden: int, heads: int, vocab: int, seq: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=seq,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return LlamaForCausalLM(cfg)


def build_items(batch: int, seq: int, vocab: int, seed: int = 1234) -> list[dict[str, list[int]]]:
    """``batch`` sequences of random ids (no pad id 0), labels on the second half only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = IGNORE
    return [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)]


def optimizer_like_train_loop(model, lr: float, steps: int):
    """The AdamW and schedule ``train_loop`` builds (same groups, betas, schedule), for TRL."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    return opt, get_cosine_with_min_lr_schedule_with_warmup(opt, 0, steps, min_lr_rate=0.1)


def cpu_stall_seconds() -> float:
    """Machine-wide seconds during which some task waited for a CPU (Linux PSI), or NaN."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return float("nan")


class Marks:
    """Timestamps (wall, process CPU, machine CPU stall) at each step start, and one at the end."""

    def __init__(self):
        self.begin: list[tuple[float, float, float]] = []
        self.end: tuple[float, float, float] | None = None

    @staticmethod
    def now() -> tuple[float, float, float]:
        return time.perf_counter(), _cpu_seconds(), cpu_stall_seconds()

    def steps(self) -> list[tuple[float, float, float]]:
        points = [*self.begin, self.end]
        return [tuple(y - x for x, y in zip(a, b)) for a, b in zip(points, points[1:])]


class ClockedObjective:
    """Delegates to the product's objective; records when each step's ``loss()`` is called."""

    def __init__(self, objective, marks: Marks):
        self.objective, self.marks = objective, marks

    def __getattr__(self, name: str):  # trainable, state_dict, ...
        return getattr(self.objective, name)

    def loss(self, batch, student, teacher):
        self.marks.begin.append(Marks.now())
        return self.objective.loss(batch, student, teacher)


def ours_config(args, form: str):
    """The train config every ``ours*`` run uses: JSD β = 0.5 in ``form``, the bench's schedule."""
    from distillery.config import TrainConfig
    from distillery.losses import LossSpec

    return TrainConfig(objective={"name": "logit_kd", "loss": LossSpec(divergence="jsd", beta=0.5, form=form)},
                       steps=args.warmup + args.steps, batch_size=args.batch, lr=1e-5,
                       warmup_steps=0, weight_decay=0.0, grad_clip=1.0, max_seq_len=args.seq,
                       log_every=1, seed=0, mixed_precision=getattr(args, "mixed_precision", "no"))


def run_ours(args, student, teacher, items, marks: Marks) -> list[float]:
    from distillery.train.data import Collator
    from distillery.train.loop import train_loop
    from distillery.train.objectives.logit_kd import LogitKDObjective

    cfg = ours_config(args, "dense" if args.impl == "ours_dense" else "fused")
    objective = ClockedObjective(LogitKDObjective(cfg.objective.resolved_loss()), marks)
    result = train_loop(student, objective, items, Collator(pad_id=0), cfg, teacher=teacher,
                        show_progress=False)
    marks.end = Marks.now()
    return [h["loss"] for h in result.history]


def tiny_tokenizer():
    """A three-token tokenizer: GKDTrainer only reads its pad/eos ids (we pass the collator)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def run_trl(args, student, teacher, items, marks: Marks) -> list[float]:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillery.train.data import Collator

    steps = args.warmup + args.steps
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(output_dir=out, lmbda=0.0, beta=0.5, seq_kd=False, temperature=1.0,
                           bf16=False, use_cpu=True, gradient_checkpointing=False,
                           per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                           max_steps=steps, learning_rate=1e-5, max_grad_norm=1.0,
                           logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                           max_length=args.seq, seed=0, dataloader_num_workers=0)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                             data_collator=Collator(pad_id=0), train_dataset=Dataset.from_list(items),
                             processing_class=tiny_tokenizer(),
                             optimizers=optimizer_like_train_loop(student, 1e-5, steps),
                             callbacks=[trl_clock(marks, steps, losses)])
        trainer.train()
    return losses


def trl_clock(marks: Marks, steps: int, losses: list[float]):
    """A ``TrainerCallback`` that marks each step's start (and the end of the last of ``steps``)
    and appends each logged loss to ``losses``."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            marks.begin.append(Marks.now())

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == steps:
                marks.end = Marks.now()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Clock()


def child(args):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.impl == "trl_gkd":  # imports outside the measured region (trl's alone takes seconds)
        import trl.experimental.gkd  # noqa: F401
    else:
        import distillery.train.loop  # noqa: F401
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    student = build_model(*sizes["student"], args.vocab, args.seq, seed=0)
    teacher = build_model(*sizes["teacher"], args.vocab, args.seq, seed=1)
    items = build_items(args.batch, args.seq, args.vocab)
    s_layers, s_hidden, _ = sizes["student"]
    t_layers, t_hidden, _ = sizes["teacher"]
    run = run_trl if args.impl == "trl_gkd" else run_ours
    row = measure(args, run, student, teacher, items, {
        "vocab": args.vocab, "student": f"{s_layers}x{s_hidden}", "teacher": f"{t_layers}x{t_hidden}",
        "student_params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1),
        "teacher_params_m": round(sum(p.numel() for p in teacher.parameters()) / 1e6, 1)})
    print(json.dumps(row), flush=True)


def measure(args, run, student, teacher, items, about: dict) -> dict:
    """``run(args, student, teacher, items, marks)`` timed step by step under a peak-RSS monitor:
    a run's figures (see the module doc), with ``about`` (the models, the vocabulary) in them."""
    tokens_per_step = sum(len(it["input_ids"]) for it in items)  # no padding: all are counted
    gc.collect()
    before = rss_bytes()
    marks = Marks()
    with PeakRSS() as mon:
        losses = run(args, student, teacher, items, marks)
    steps = marks.steps()
    if len(steps) != args.warmup + args.steps:
        raise RuntimeError(f"timed {len(steps)} steps, expected {args.warmup + args.steps}")
    timed = steps[args.warmup:]
    row = {
        "impl": args.impl, "batch": args.batch, "seq": args.seq, **about,
        "warmup_steps": args.warmup, "tokens_per_step": tokens_per_step,
        "step_seconds": [round(w, 3) for w, _, _ in timed],
        "step_cpu_seconds": [round(c, 3) for _, c, _ in timed],
        "step_cpu_pressure": [round(p / w, 3) for w, _, p in timed],
        "rss_before_gb": round(before / 1e9, 3),
        "peak_rss_gb": round(mon.peak / 1e9, 3),
        "loss_first": round(losses[0], 5) if losses else None,
        "loss_last": round(losses[-1], 5) if losses else None,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
    }
    return figures(row)


def figures(row: dict) -> dict:
    """A run's figures over its timed steps."""
    wall, tokens = row["step_seconds"], row["tokens_per_step"]
    median = statistics.median(wall)
    return {
        **row,
        "timed_steps": len(wall),
        "tokens_per_s": round(tokens / median, 1),
        "tokens_per_s_mean": round(tokens * len(wall) / sum(wall), 1),
        "seconds_per_step": round(median, 3),
        "seconds_per_step_min": round(min(wall), 3),
        "cpu_seconds_per_step": round(statistics.median(row["step_cpu_seconds"]), 3),
        "cpu_pressure": round(statistics.median(row["step_cpu_pressure"]), 3),
        "extra_peak_rss_gb": round(row["peak_rss_gb"] - row["rss_before_gb"], 3),
    }


def best_run(runs: list[dict]) -> dict:
    """An implementation's fastest run (lowest median step: the least disturbed by other load,
    as timeit takes the best of its repeats), with every run's median and CPU pressure beside it;
    memory is the highest of all runs (load does not change it)."""
    best = min(runs, key=lambda r: r["seconds_per_step"])
    return {
        **best,
        "best_round": runs.index(best),
        "rounds_seconds_per_step": [r["seconds_per_step"] for r in runs],
        "rounds_cpu_pressure": [r["cpu_pressure"] for r in runs],
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "extra_peak_rss_gb": max(r["extra_peak_rss_gb"] for r in runs),
    }


def summary(rows: dict[str, dict], baseline: str = "trl_gkd") -> dict:
    """Each ``ours*`` row against the ``baseline`` row (TRL)."""
    out: dict = {"summary": True, "target": "ours >= 1.3x TRL tokens/s at <= TRL peak RSS",
                 "baseline": baseline}
    trl = rows.get(baseline)
    for impl, row in rows.items():
        if not impl.startswith("ours") or trl is None:
            continue
        speed = row["tokens_per_s"] / trl["tokens_per_s"]
        peak = row["peak_rss_gb"] / trl["peak_rss_gb"]
        out[impl] = {
            "tokens_per_s": row["tokens_per_s"], "trl_tokens_per_s": trl["tokens_per_s"],
            "speedup_vs_trl": round(speed, 3),
            "cpu_speedup_vs_trl": round(trl["cpu_seconds_per_step"] / row["cpu_seconds_per_step"], 3),
            "peak_rss_gb": row["peak_rss_gb"], "trl_peak_rss_gb": trl["peak_rss_gb"],
            "peak_rss_ratio_vs_trl": round(peak, 3),
            "extra_peak_rss_ratio_vs_trl": round(row["extra_peak_rss_gb"] / trl["extra_peak_rss_gb"], 3),
            "meets_target": speed >= 1.3 and peak <= 1.0,
        }
    # on a shared machine: did the runs compared above have the cores to themselves?
    out["quiet"] = all(r["cpu_pressure"] < QUIET_PRESSURE for r in rows.values())
    return out


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        proc = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return proc.stdout.strip()

    # the distillery the children import: the checkout's src/, or PYTHONPATH's (e.g. an export
    # of HEAD while others edit the working tree)
    proc = subprocess.run([sys.executable, "-c", "import distillery; print(distillery.__file__)"],
                          capture_output=True, text=True)
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "src_dirty": bool(git("status", "--porcelain", "--", "src")),
            "distillery": str(Path(proc.stdout.strip()).parent)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models (2x64 / 2x96, V=1000, seq 64)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (512; quick: 64)")
    ap.add_argument("--vocab", type=int, default=None, help="32000; quick: 1000")
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs of every implementation, alternating (2; quick: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps of a run (2; quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps of a run (4; quick: 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = QUICK if args.quick else FULL
    args.seq = args.seq or sizes["seq"]
    args.vocab = args.vocab or sizes["vocab"]
    args.warmup = (1 if args.quick else 2) if args.warmup is None else args.warmup
    args.steps = (3 if args.quick else 4) if args.steps is None else args.steps
    args.rounds = (1 if args.quick else 2) if args.rounds is None else args.rounds
    if args.impl:
        child(args)
        return
    emit = emitter(args.out)
    setup = {"what": "setup", "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
             "quick": args.quick, "rounds": args.rounds, "threads": args.threads or None}
    emit({**setup, "load_avg_1m": round(os.getloadavg()[0], 2), **git_state()})

    def command(impl: str) -> list[str]:
        return [sys.executable, __file__, "--impl", impl, "--batch", str(args.batch),
                "--seq", str(args.seq), "--vocab", str(args.vocab), "--warmup", str(args.warmup),
                "--steps", str(args.steps), "--threads", str(args.threads),
                *(["--quick"] if args.quick else [])]

    runs = run_rounds(args.impls.split(","), args.rounds, command, emit)
    rows = {impl: best_run(rs) for impl, rs in runs.items() if rs}
    for impl, row in rows.items():
        emit({"part": "impl", "rounds": len(runs[impl]), **row})
    emit(summary(rows))


def emitter(path: Path | None):
    """A function printing a dict as a JSON line, and appending it to ``path`` when given."""

    def emit(obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if path is not None:
            with open(path, "a") as f:  # one line at a time: each reaches the file as printed
                f.write(line + "\n")

    return emit


def run_rounds(impls: list[str], rounds: int, command, emit) -> dict[str, list[dict]]:
    """Runs every implementation ``rounds`` times, each in its own subprocess (``command(impl)``:
    its argv; its last JSON line on stdout: its figures); every other round in reverse order, so
    that a load that drifts during the run hits all alike. Emits a line per run (or its error)."""
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            proc = subprocess.run(command(impl), capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                emit({"impl": impl, "round": r, "error": err, "returncode": proc.returncode})
                continue
            runs[impl].append(json.loads(lines[-1]))
            emit({"part": "round", "round": r, **runs[impl][-1]})
    return runs


if __name__ == "__main__":
    main()
