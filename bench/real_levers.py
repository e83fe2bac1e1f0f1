"""Which lever moves the real demo's students: one change at a time, scored on a validation split.

The real demo (configs/real/smollm2.yaml, docs/real_demo.md) misses its efficacy targets. This
script asks why without touching the evaluation split: it retrains one student of a finished
demo run with one setting changed (learning rate, steps, temperature, kd_ratio, layers kept,
pruning method, random initialisation) and scores it on **validation** problems: problems of the
task's *train* split (disjoint from the evaluation split by hash) that are not among the run's
labeled records. The teacher (merged, in ``RUN_DIR/teacher``) and the labeled records
(``RUN_DIR/generate/records.jsonl``) are the run's own; nothing in ``RUN_DIR`` is written.

One JSON line per (variant, seed): validation accuracy with its bootstrap 95% CI, training
seconds, the final loss; the teacher's validation accuracy first; at the end, per variant, the
mean over seeds with the two-level bootstrap CI and the paired difference against ``--base``
(same seeds, same problems). Usage (1 thread, one variant after another)::

    OMP_NUM_THREADS=1 python bench/real_levers.py runs/demo-real --work /tmp/levers \\
        --variants kd sft kd_T2 kd_lr2e-4 --seeds 0 --out bench/results_real_levers.jsonl

A finished (variant, seed) is reused from ``--work`` (delete its folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from distillery.config import EvalConfig, load_config
from distillery.evaluate.run import evaluate_model
from distillery.evaluate.stats import aggregate_over_seeds, bootstrap_ci
from distillery.models.loading import load_model, load_tokenizer
from distillery.run_config import RunConfig
from distillery.tasks import load_problems
from distillery.teachers import HFTeacher
from distillery.train.job import run_train_job

# variant: (the demo's student it starts from, overrides of that student's settings)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "kd": ("student_kd", []),
    "sft": ("student_sft", []),
    "kd_T2": ("student_kd", ["train.objective.loss.temperature=2.0"]),
    "kd_ratio1": ("student_kd", ["train.objective.loss.kd_ratio=1.0"]),
    "kd_lr2e-4": ("student_kd", ["train.lr=2.0e-4"]),
    "kd_lr1e-3": ("student_kd", ["train.lr=1.0e-3"]),
    "kd_steps400": ("student_kd", ["train.steps=400"]),
    "sft_steps400": ("student_sft", ["train.steps=400"]),
    "kd_layers18": ("student_kd", ["model.prune.layers=18"]),
    "kd_uniform": ("student_kd", ["model.prune.method=uniform"]),
    "scratch_kd": ("student_kd", ["model.init=random"]),
    # depth and width (docs/models.md: lower perplexity than 15 layers at fewer parameters)
    "kd_w20": ("student_kd", ["model.prune.layers=20", "model.prune.mlp_ratio=0.5", "model.prune.heads=6"]),
    "sft_w20": ("student_sft", ["model.prune.layers=20", "model.prune.mlp_ratio=0.5", "model.prune.heads=6"]),
}


def validation_problems(cfg: RunConfig, records: Path, n: int, seed: int) -> list:
    """``n`` train-split problems that no labeled record was made from (by problem id)."""
    used = {json.loads(line)["meta"]["seed_id"] for line in records.open()}
    pool = load_problems(cfg.task, "train", len(used) + 4 * n, seed=seed)
    out = [p for p in pool if p.id not in used][:n]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} unused train-split problems: lower --val")
    return out


def score(model_dir: Path, problems: list, eval_cfg: EvalConfig) -> dict:
    model = load_model(str(model_dir))
    teacher = HFTeacher(model, load_tokenizer(str(model_dir)), batch_size=eval_cfg.batch_size)
    result = evaluate_model(teacher, problems, eval_cfg)
    return {"accuracy": result["accuracy"], "ci95": result["ci95"], "params": result["params"],
            "tokens_per_s": result["tokens_per_s"],
            "correct": [float(i["correct"]) for i in result["items"]]}


def train_variant(run_dir: Path, work: Path, variant: str, seed: int) -> tuple[Path, dict]:
    student, overrides = VARIANTS[variant]
    base = [f"run_dir={work}", f"students.{student}.data.path={run_dir / 'generate' / 'records.jsonl'}",
            f"students.{student}.train.seed={seed}"]
    cfg = load_config(run_dir / "config.yaml", RunConfig,
                      base + [f"students.{student}.{o}" for o in overrides])
    job = cfg.student_job(student, run_dir / "teacher")
    out = work / "students" / f"{variant}-s{seed}"
    job = job.model_copy(update={"output_dir": str(out)})
    start = time.perf_counter()
    result = run_train_job(job)
    return out, {"train_seconds": time.perf_counter() - start, "final_loss": result.final_loss,
                 "overrides": overrides, "student": student}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished run of configs/real/smollm2.yaml")
    ap.add_argument("--work", type=Path, required=True, help="where the variants' students go")
    ap.add_argument("--variants", nargs="+", default=["kd", "sft"], choices=sorted(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--val", type=int, default=300, help="validation problems")
    ap.add_argument("--val-seed", type=int, default=4242)
    ap.add_argument("--base", default="kd", help="the variant the others are compared with")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    run_dir, work = args.run_dir.resolve(), args.work.resolve()
    cfg = load_config(run_dir / "config.yaml", RunConfig, [f"run_dir={work}"])
    problems = validation_problems(cfg, run_dir / "generate" / "records.jsonl", args.val, args.val_seed)
    eval_cfg = cfg.eval.model_copy(update={"speed_prompts": 4})
    meta = {"threads": torch.get_num_threads(), "val_problems": len(problems), "val_seed": args.val_seed,
            "split": "validation (train split, unlabeled problems)"}

    def emit(line: dict) -> None:
        print(json.dumps(line), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(line) + "\n")

    teacher = score(run_dir / "teacher", problems, eval_cfg)
    emit({"part": "teacher", **meta, **{k: v for k, v in teacher.items() if k != "correct"}})
    scores: dict[str, list[np.ndarray]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            done = work / "results" / f"{variant}-s{seed}.json"
            if done.is_file():
                line = json.loads(done.read_text())
            else:
                out, trained = train_variant(run_dir, work, variant, seed)
                line = {"part": "variant", "variant": variant, "seed": seed, **meta, **trained,
                        **score(out, problems, eval_cfg)}
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(line))
            scores.setdefault(variant, []).append(np.asarray(line["correct"]))
            emit({k: v for k, v in line.items() if k != "correct"}
                 | {"retained": line["accuracy"] / teacher["accuracy"]})
    for variant, runs in scores.items():
        agg = aggregate_over_seeds(runs)
        line = {"part": "summary", "variant": variant, "seeds": args.seeds, **meta,
                "accuracy": agg.mean, "ci95": [agg.lo, agg.hi], "seed_means": agg.seed_means,
                "retained": agg.mean / teacher["accuracy"]}
        if args.base in scores and variant != args.base:
            diffs = [a - b for a, b in zip(runs, scores[args.base], strict=True)]
            mean, lo, hi = bootstrap_ci(np.mean(diffs, axis=0), 2000, seed=0)
            line["vs_base"] = {"base": args.base, "diff": mean, "ci95": [lo, hi]}
        emit(line)


if __name__ == "__main__":
    main()
