"""On-policy step time with the teacher in process against the teacher behind `distillery serve`.

The same tiny models in every setting: a student of ``--student-layers`` × ``--student-hidden``
(default 2 × 64, random init, seed 0) with the demo teacher's tokenizer, and the shipped ``assets/demo_teacher`` (4 × 128) as the teacher.
Each setting trains ``--steps`` on-policy steps (λ = 1, batch ``--batch-size``, sampling at
temperature 1, ``--max-new-tokens``) on the demo task, through ``distillery``'s own objective
and loop (``build_training_parts`` + ``train_loop``), and prints one JSON line:

* ``in_process_dense``: the teacher in this process, full logits (on_policy without ``scoring``);
* ``in_process_topk``: the teacher in this process, scored as top-k (``scoring`` without teachers);
* ``remote_s0``: ``scoring.teacher`` = the served teacher, ``staleness: 0`` (sample, score, update);
* ``remote_s1``: the same at ``staleness: 1`` (the next batch is scored during the update).

Per line: seconds per step (the run's wall time over its steps, the first ``--warmup`` steps left
out), and for the scored settings the scoring time per step (the scoring thread's time on a
batch), the time the training thread waited for it, and ``hidden`` = 1 − waited / scoring summed
over the steps after the warm-up (the first step has nothing to overlap with). A last line
gives the ratios to ``in_process_dense``.

How it is meant to be run (and how docs/training/on_policy.md's figures were made)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/on_policy.py --out bench/results_on_policy_$(date +%F).jsonl

``OMP_NUM_THREADS`` is passed on to the server; torch in this process runs ``--threads``
intra-op threads (default 1). Server and trainer share this machine's CPUs; a teacher on another
machine takes its forward passes off them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = str(ROOT / "assets" / "demo_teacher")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model: str, port: int):
    """``distillery serve MODEL`` on 127.0.0.1:``port`` until the block ends."""
    log = open(Path(tempfile.gettempdir()) / f"bench_on_policy_serve_{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "distillery.cli", "serve", model, "--port", str(port),
                             "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 400
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"distillery serve exited (see {log.name})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("distillery serve did not start within 400 s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def run_setting(name: str, args: argparse.Namespace, scoring: dict | None, out_dir: Path) -> dict:
    from distillery.config import TrainJobConfig
    from distillery.models import build_model, load_model, load_tokenizer
    from distillery.tasks import load_records
    from distillery.train import train_loop
    from distillery.train.objectives import BuildContext, build_training_parts

    objective = {"name": "on_policy", "lmbda": 1.0, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                 "loss": {"divergence": "jsd", "beta": 0.5}}
    if scoring is not None:
        objective["scoring"] = scoring
    job = TrainJobConfig.model_validate({
        "output_dir": str(out_dir / name), "tokenizer": {"path": TEACHER},
        "model": {"hidden_size": args.student_hidden, "num_layers": args.student_layers, "num_heads": 4,
                  "max_position_embeddings": 128, "device": "cpu"},
        "teacher": None if scoring is not None and "teacher" in scoring else {"path": TEACHER, "device": "cpu"},
        "data": {"task": {"name": "arithmetic", "num_operands": 3, "digits": [1, 2]}, "num_examples": 512},
        "train": {"objective": objective, "steps": args.steps, "batch_size": args.batch_size, "lr": 3e-3,
                  "warmup_steps": 0, "max_seq_len": 64, "log_every": 1, "seed": 0},
    })
    tok = load_tokenizer(TEACHER)
    records = load_records(job.data)
    torch.manual_seed(0)
    student = build_model(job.model, tok)
    teacher = load_model(job.teacher) if job.teacher is not None else None
    dataset, collate, obj = build_training_parts(BuildContext(job, records, tok, student, teacher))
    times: list[float] = []
    result = None
    t_last = time.perf_counter()

    class Timed:  # the loop's objective, with the wall time between loss calls recorded
        trainable = obj.trainable

        def loss(self, batch, model, t):
            nonlocal t_last
            out = obj.loss(batch, model, t)
            now = time.perf_counter()
            times.append(now - t_last)
            t_last = now
            return out

        def state_dict(self):
            return obj.state_dict()

        def load_state_dict(self, state):
            obj.load_state_dict(state)

    result = train_loop(student, Timed(), dataset, collate, job.train, teacher=teacher, show_progress=False)
    if getattr(obj, "queue", None) is not None:
        obj.queue.close()
    w = args.warmup
    hist = result.history[w:]
    line = {"bench": "on_policy", "setting": name, "steps": args.steps, "warmup_steps": w,
            "s_per_step": round(sum(times[w + 1:]) / max(len(times[w + 1:]), 1), 4),
            "gen_tokens": round(sum(h["gen_tokens"] for h in hist) / len(hist), 1),
            "final_loss": round(result.final_loss, 4)}
    if scoring is not None:
        scored = sum(h["scoring/seconds"] for h in hist)
        waited = sum(h["scoring/waited_s"] for h in hist)
        line.update(staleness=scoring.get("staleness", 0), top_k=scoring.get("top_k", 20),
                    scoring_s_per_step=round(scored / len(hist), 4), waited_s_per_step=round(waited / len(hist), 4),
                    hidden=round(1 - waited / scored, 3) if scored > 0 else None,
                    prefetched=sum(h["scoring/prefetched"] for h in hist))
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the trainer")
    ap.add_argument("--settings", default="in_process_dense,in_process_topk,remote_s0,remote_s1")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "server_omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "student": f"{args.student_layers}x{args.student_hidden} random init", "teacher": "demo_teacher 4x128", "date": datetime.date.today().isoformat()}
    wanted = args.settings.split(",")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("in_process_dense", "in_process_topk"):
            if name in wanted:
                scoring = {"top_k": args.top_k} if name == "in_process_topk" else None
                lines.append({**run_setting(name, args, scoring, Path(tmp)), **meta})
                print(json.dumps(lines[-1]), flush=True)
        remote = [n for n in ("remote_s0", "remote_s1") if n in wanted]
        if remote:
            with served(TEACHER, free_port()) as url:
                for name in remote:
                    teacher = {"backend": "openai", "model": "demo_teacher", "base_urls": [url],
                               "mode": "completions", "max_concurrency": 16}
                    scoring = {"teacher": teacher, "top_k": args.top_k, "staleness": int(name[-1])}
                    lines.append({**run_setting(name, args, scoring, Path(tmp)), **meta})
                    print(json.dumps(lines[-1]), flush=True)
    base = next((x for x in lines if x["setting"] == "in_process_dense"), None)
    if base is not None:
        ratio = {"bench": "on_policy", "ratio": "s_per_step / in_process_dense",
                 **{x["setting"]: round(x["s_per_step"] / base["s_per_step"], 2) for x in lines}, **meta}
        lines.append(ratio)
        print(json.dumps(ratio), flush=True)
    if args.out is not None:
        with args.out.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
