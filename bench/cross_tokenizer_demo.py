"""Benchmark: cross-tokenizer logit KD against SFT on the same teacher text, over several seeds.

``configs/demo_cross_tokenizer.yaml`` trains two students of one size, each with a unigram
tokenizer of its own (not the teacher's BPE): one by SFT on the teacher-written chains (the
baseline), one by cross-tokenizer ``logit_kd``. One run of that config is one draw: on this
task a student's accuracy moves by tens of points with the training seed alone (SFT ranged from
25% to 57% over ten seeds), so a single comparison says little. This script runs the
comparison for ``--seeds`` training seeds, the same way ``distillery run`` does:

1. the teacher labels the problems once (``prepare_teacher`` / ``generate_stage`` of the
   pipeline), into ``OUT/data``, and is evaluated once on the held-out problems;
2. per seed, in a subprocess of its own with one thread (``--jobs`` at a time), both students
   train on those records with ``train.seed = seed`` (``train_stage`` of the pipeline, into
   ``OUT/seed<N>``)
   and are evaluated greedily on the same held-out problems (``evaluate_model``);
3. one JSON line per seed and student (``"part": "seed"``), then one per student over all seeds
   (``"part": "student"``: the mean and the two-level bootstrap 95% CI of
   :func:`~distillery.evaluate.stats.aggregate_over_seeds`, seeds and items resampled) and one
   for each student against the baseline (``"part": "difference"``: the same over per-item
   differences, seeds paired).

Finished seeds are kept (``OUT/seed<N>/result.json``): a re-run with more seeds trains only the
new ones. Usage: ``python bench/cross_tokenizer_demo.py --seeds 0-9 --jobs 2``; each seed takes
about 5 minutes of one CPU core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _config(args: argparse.Namespace, seed: int | None = None):
    from distillery.config import load_config
    from distillery.run_config import RunConfig

    run_dir = Path(args.out) / ("data" if seed is None else f"seed{seed}")
    overrides = [f"run_dir={run_dir}", *args.override]
    if seed is not None:  # every seed's students read the records generated once, in OUT/data
        records = Path(args.out) / "data" / "generate" / "records.jsonl"
        overrides += [f"defaults.train.seed={seed}", f"defaults.data.path={records}"]
    return load_config(args.config, RunConfig, overrides)


def _teacher_and_data(args: argparse.Namespace) -> tuple[Path, str, Path, dict]:
    """The teacher, its labeled records (once, resumable) and its held-out accuracy."""
    from distillery.evaluate.run import evaluate_model
    from distillery.evaluate.stages import Stage
    from distillery.pipeline import generate_stage, prepare_teacher
    from distillery.tasks import load_problems
    from distillery.teachers import HFTeacher

    cfg = _config(args)
    run_dir = Path(cfg.run_dir)
    teacher_dir, teacher_fp = prepare_teacher(cfg, run_dir)
    records, _ = generate_stage(cfg, run_dir, teacher_dir, teacher_fp)
    path = run_dir / "teacher_eval.json"
    if not Stage(run_dir, "eval_teacher").done(teacher_fp, path):
        problems = load_problems(cfg.task, "eval", cfg.eval.num_problems, seed=cfg.eval.seed)
        res = evaluate_model(HFTeacher.from_pretrained(teacher_dir, batch_size=cfg.eval.batch_size), problems, cfg.eval)
        path.write_text(json.dumps({"accuracy": res["accuracy"], "ci95": res["ci95"]}))
        Stage(run_dir, "eval_teacher").finish(teacher_fp)
    return teacher_dir, teacher_fp, records, json.loads(path.read_text())


def _worker(args: argparse.Namespace) -> None:
    """One seed: train every student of the config, evaluate each; writes seed<N>/result.json."""
    import torch

    torch.set_num_threads(1)
    from distillery.evaluate.run import evaluate_model
    from distillery.pipeline import train_stage
    from distillery.tasks import load_problems
    from distillery.teachers import HFTeacher

    teacher_dir, teacher_fp, _, _ = _teacher_and_data(args)
    cfg = _config(args, args.worker)
    run_dir = Path(cfg.run_dir)
    t0 = time.perf_counter()
    students = train_stage(cfg, run_dir, teacher_dir, teacher_fp, {})
    seconds = time.perf_counter() - t0
    problems = load_problems(cfg.task, "eval", cfg.eval.num_problems, seed=cfg.eval.seed)
    result = {}
    for name, (model_dir, _) in students.items():
        res = evaluate_model(HFTeacher.from_pretrained(model_dir, batch_size=cfg.eval.batch_size), problems, cfg.eval)
        log = [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
        result[name] = {"accuracy": res["accuracy"], "ci95": res["ci95"], "final_ce": log[-1].get("ce"),
                        "correct": [bool(i["correct"]) for i in res["items"]], "ids": [i["id"] for i in res["items"]]}
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps({"seed": args.worker, "train_seconds": seconds, "students": result}))
    tmp.replace(run_dir / "result.json")


def _summary(args: argparse.Namespace, seeds: list[int], teacher: dict) -> None:
    from distillery.config import load_config
    from distillery.evaluate.stats import aggregate_over_seeds
    from distillery.pipeline import baseline_student
    from distillery.run_config import RunConfig

    cfg = load_config(args.config, RunConfig, args.override)
    names = list(cfg.students)
    base = args.baseline or baseline_student(cfg)
    results = {s: json.loads((Path(args.out) / f"seed{s}" / "result.json").read_text()) for s in seeds}
    print(json.dumps({"part": "teacher", "accuracy": teacher["accuracy"], "ci95": teacher["ci95"]}))
    for s, r in results.items():
        for name in names:
            st = r["students"][name]
            print(json.dumps({"part": "seed", "seed": s, "student": name, "accuracy": st["accuracy"],
                              "ci95": st["ci95"], "final_ce": st["final_ce"]}))
    scores = {n: [np.asarray(results[s]["students"][n]["correct"], dtype=float) for s in seeds] for n in names}
    for name in names:
        agg = aggregate_over_seeds(scores[name])
        print(json.dumps({"part": "student", "student": name, "seeds": seeds, "mean": agg.mean,
                          "ci95": [agg.lo, agg.hi], "seed_means": agg.seed_means}))
    for name in names:
        if name == base:
            continue
        diff = aggregate_over_seeds([a - b for a, b in zip(scores[name], scores[base], strict=True)])
        wins = int(sum(a.mean() > b.mean() for a, b in zip(scores[name], scores[base], strict=True)))
        print(json.dumps({"part": "difference", "student": name, "baseline": base, "seeds": seeds,
                          "mean": diff.mean, "ci95": [diff.lo, diff.hi], "seeds_won": wins}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo_cross_tokenizer.yaml")
    ap.add_argument("--seeds", default="0-9", help="training seeds: '0-9' or '0,3,5'")
    ap.add_argument("--jobs", type=int, default=2, help="seeds trained at once (one CPU thread each)")
    ap.add_argument("--out", default="runs/bench_cross_tokenizer")
    ap.add_argument("--baseline", default=None, help="the student the others are compared with "
                    "(default: the config's first sft student)")
    ap.add_argument("--override", action="append", default=[], help="a config override (key=value), repeatable")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return _worker(args)
    seeds = _seeds(args.seeds)
    _, _, _, teacher = _teacher_and_data(args)  # once, before the workers share it
    todo = [s for s in seeds if not (Path(args.out) / f"seed{s}" / "result.json").is_file()]
    running: list[tuple[int, subprocess.Popen]] = []
    base_cmd = [sys.executable, __file__, "--config", args.config, "--out", args.out]
    base_cmd += [x for o in args.override for x in ("--override", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while todo or running:
        while todo and len(running) < args.jobs:
            s = todo.pop(0)
            log = open(Path(args.out) / f"seed{s}.log", "w")  # noqa: SIM115 (closed with the process)
            running.append((s, subprocess.Popen([*base_cmd, "--worker", str(s)], stdout=log, stderr=log, env=env)))
        time.sleep(2)
        for s, proc in list(running):
            if proc.poll() is not None:
                running.remove((s, proc))
                if proc.returncode != 0:
                    raise SystemExit(f"seed {s} failed (exit {proc.returncode}): see {Path(args.out) / f'seed{s}.log'}")
                print(f"seed {s} done", file=sys.stderr, flush=True)
    _summary(args, seeds, teacher)


if __name__ == "__main__":
    main()
