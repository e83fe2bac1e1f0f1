"""Benchmark: on-policy distillation against off-policy logit KD on the demo task, over seeds.

``configs/demo.yaml`` as shipped (its teacher ``assets/demo_teacher``, its labeled records, its
student architecture and steps), with the students replaced by two arms that train for the same
steps on the same records:

- ``student_logit_kd``: the demo's ``student_distilled`` as it is (0.5·CE on the teacher's text
  + 0.5·forward KL(teacher‖student) on it, dense, live teacher): off-policy;
- ``student_on_policy``: ``on_policy`` with λ = 1 (every batch's continuations are sampled by
  the student, temperature 1, up to ``--max-new-tokens``) and ``--divergence`` (default reverse
  KL, MiniLLM-style; ``jsd`` for GKD's β = 0.5), no CE (on_policy drops it on student samples);
  ``--extra-divergence jsd`` adds the arm ``student_on_policy_jsd`` beside it.

The seeds loop, the evaluation and the statistics are those of ``bench/cross_tokenizer_demo.py``
(run as a subprocess on the config written here): per seed, one process with one thread trains
both arms with ``train.seed = seed`` and evaluates them greedily on the demo's 500 held-out
problems; then the mean over seeds with the two-level bootstrap CI
(:func:`~distillery.evaluate.stats.aggregate_over_seeds`) and the paired difference on_policy −
logit_kd (per-item differences, seeds paired).

Output (stdout, JSON lines): a ``"part": "setup"`` line stating how it was run (threads, seeds,
steps, the two objectives), then the lines of ``cross_tokenizer_demo.py`` (teacher, seed,
student, difference), then ``"part": "timing"`` (each arm's training seconds per seed). Usage:
``OMP_NUM_THREADS=1 python bench/on_policy_efficacy.py --seeds 0-2 --jobs 1 [--steps 300]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent


def _config(args: argparse.Namespace) -> dict:
    """demo.yaml with the two arms as its students (and ``--steps`` when given, for both)."""
    cfg = yaml.safe_load(Path(args.config).read_text())
    logit_kd = cfg["students"]["student_distilled"]
    cfg["students"] = {"student_logit_kd": logit_kd, "student_on_policy": _on_policy(args, args.divergence, logit_kd)}
    for div in args.extra_divergence:  # more on-policy arms, named by their divergence
        cfg["students"][f"student_on_policy_{div}"] = _on_policy(args, div, logit_kd)
    if args.steps is not None:
        cfg["defaults"]["train"]["steps"] = args.steps
        cfg["defaults"]["train"]["warmup_steps"] = min(cfg["defaults"]["train"]["warmup_steps"], args.steps // 10)
    return cfg


def _on_policy(args: argparse.Namespace, divergence: str, logit_kd: dict) -> dict:
    """The on-policy arm: λ = 1, samples at temperature 1, ``divergence`` (JSD: β = 0.5), dense."""
    loss = {"divergence": divergence, "temperature": 1.0, "form": "dense", **({"beta": 0.5} if divergence == "jsd" else {})}
    return {"data": logit_kd["data"], "train": {"objective": {
        "name": "on_policy", "lmbda": 1.0, "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "loss": loss}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seeds", default="0-2", help="training seeds: '0-2' or '0,3,5'")
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained at once (one CPU thread each)")
    ap.add_argument("--steps", type=int, default=None, help="train steps of both arms (default: the config's)")
    ap.add_argument("--divergence", choices=["reverse_kl", "jsd"], default="reverse_kl",
                    help="the divergence of the arm named student_on_policy")
    ap.add_argument("--extra-divergence", action="append", choices=["reverse_kl", "jsd", "forward_kl"], default=[],
                    help="add an on-policy arm student_on_policy_<divergence> (repeatable); finished arms of "
                         "a seed are not retrained (delete OUT/seed<N>/result.json to evaluate the new arm)")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="on_policy sample length (demo eval: 40)")
    ap.add_argument("--out", default="runs/bench_on_policy_efficacy")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(args)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    train = cfg["defaults"]["train"]
    print(json.dumps({"part": "setup", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "jobs": args.jobs,
                      "seeds": args.seeds, "steps": train["steps"], "batch_size": train["batch_size"],
                      "config": args.config, "students": cfg["students"],
                      "note": "train.seed = seed for both arms; teacher, records and eval problems shared"}),
          flush=True)
    cmd = [sys.executable, str(BENCH / "cross_tokenizer_demo.py"), "--config", str(config_path),
           "--seeds", args.seeds, "--jobs", str(args.jobs), "--out", str(out), "--baseline", "student_logit_kd"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from cross_tokenizer_demo import _seeds  # the same seed syntax

    for name in cfg["students"]:  # the pipeline's stage record holds each arm's training time
        seconds = {s: json.loads((out / f"seed{s}" / "stages" / f"train_{name}.json").read_text())["seconds"]
                   for s in _seeds(args.seeds)}
        print(json.dumps({"part": "timing", "student": name, "train_seconds": seconds}))


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    main()
