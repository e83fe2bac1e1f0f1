"""Aggregate finished `distillery run` directories that differ only in the training seed.

Each RUN_DIR holds ``eval/<model>.json`` (every held-out item, graded). For every model this
prints one JSON line per run and one over all runs (the mean with the two-level bootstrap 95% CI
of :func:`~distillery.evaluate.stats.aggregate_over_seeds`, seeds and items resampled), then the
paired difference of each student against ``--baseline`` and its share of the reference's
accuracy, over the same runs. Usage (the real demo over three training seeds, docs/real_demo.md)::

    python bench/aggregate_runs.py runs/demo-real seed1/runs/demo-real seed2/runs/demo-real \\
        --baseline student_sft
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from distillery.evaluate.stats import aggregate_over_seeds


def _correct(run_dir: Path, model: str) -> np.ndarray:
    items = json.loads((run_dir / "eval" / f"{model}.json").read_text())["items"]
    return np.asarray([float(i["correct"]) for i in items])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--baseline", default="student_sft")
    ap.add_argument("--reference", default="teacher")
    args = ap.parse_args()
    models = sorted(p.stem for p in (args.run_dirs[0] / "eval").glob("*.json"))
    scores = {m: [_correct(d, m) for d in args.run_dirs] for m in models}
    for m in models:
        for d, s in zip(args.run_dirs, scores[m], strict=True):
            print(json.dumps({"part": "run", "run_dir": str(d), "model": m, "accuracy": float(s.mean())}))
        agg = aggregate_over_seeds(scores[m])
        print(json.dumps({"part": "model", "model": m, "runs": len(args.run_dirs), "mean": agg.mean,
                          "ci95": [agg.lo, agg.hi], "run_means": agg.seed_means}))
    for m in models:
        if m in (args.baseline, args.reference):
            continue
        pairs = list(zip(scores[m], scores[args.baseline], strict=True))
        diff = aggregate_over_seeds([a - b for a, b in pairs])
        print(json.dumps({"part": "difference", "model": m, "baseline": args.baseline, "mean": diff.mean,
                          "ci95": [diff.lo, diff.hi], "runs_won": int(sum(a.mean() > b.mean() for a, b in pairs))}))
        kept = np.mean([s.mean() for s in scores[m]]) / np.mean([s.mean() for s in scores[args.reference]])
        print(json.dumps({"part": "retention", "model": m, "reference": args.reference, "kept": float(kept)}))


if __name__ == "__main__":
    main()
