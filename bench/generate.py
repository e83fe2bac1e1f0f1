"""Benchmark: OpenAITeacher throughput and client overhead; server-side batching of `distillery serve`.

Prints one JSON object per line.

Part 1 (``"part": "client"``): ``tests/fault_server.py`` runs in a subprocess as a plain local
server that answers every request after a fixed ``delay`` with at most ``capacity`` requests served
at once. For each client concurrency ``c`` (1, 8, 32, 128), ``max(20, 10 * c)`` requests go
through ``OpenAITeacher.stream`` (``"client": "OpenAITeacher/aiohttp"``, the product) and, as a
baseline in the same run against the same server, through a plain ``httpx.AsyncClient`` (the same
request bodies POSTed with at most ``c`` in flight, JSON answers parsed; ``"client": "httpx"``).
Each is run ``--repeats`` times (the median run is reported, all ratios listed). We report
requests/s, the ideal (capacity-bound) figure ``min(c, capacity) / delay``, their ratio, the
client's CPU time per request (user + system time of this process, all threads) and the fault
server's CPU time per request and its CPU use (seconds of CPU per second of the run; 1.0 = one
core busy), read from ``/proc`` (Linux only), to tell a client bottleneck from a server one.
Part 2 (``"part": "serve"``): ``distillery serve`` over a tiny Llama built in a temp dir, the same
requests with server-side batching (``max_batch_size=32``) and without (``max_batch_size=1``).

Usage: ``python bench/generate.py`` (full), ``--quick`` (fewer requests), ``--skip-serve``,
``--out FILE`` (also append the lines to FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distillery.teachers.base import GenerationRequest, SamplingParams  # noqa: E402
from distillery.teachers.openai import OpenAITeacher  # noqa: E402

META = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "date": datetime.date.today().isoformat()}


def emit(row: dict, out: Path | None) -> None:
    line = json.dumps({**row, **META})
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def requests(n: int, tag: str, max_new_tokens: int = 16) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return [GenerationRequest(f"{tag}-{i}", [{"role": "user", "content": f"{i + 3} + {i % 7} ="}], params)
            for i in range(n)]


def run(teacher: OpenAITeacher, reqs: list[GenerationRequest]) -> tuple[float, float, int]:
    """Wall seconds, client CPU seconds, failures."""
    failures = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for res in teacher.stream(reqs):
        failures += res.error is not None
    return time.perf_counter() - t0, time.process_time() - cpu0, failures


def run_httpx(url: str, reqs: list[GenerationRequest], concurrency: int) -> tuple[float, float, int]:
    """The baseline: the same POSTs through one httpx.AsyncClient; wall s, client CPU s, failures."""
    import httpx

    async def main() -> int:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            async def one(r: GenerationRequest) -> bool:
                p = r.params
                body = {"model": "bench", "messages": r.messages, "max_tokens": p.max_new_tokens,
                        "temperature": p.temperature, "top_p": p.top_p, "n": p.n, "seed": p.seed}
                async with sem:
                    resp = await client.post(url, json=body)
                return resp.status_code == 200 and bool(resp.json().get("choices"))

            oks = await asyncio.gather(*(one(r) for r in reqs))
        return len(oks) - sum(oks)

    cpu0, t0 = time.process_time(), time.perf_counter()
    failures = asyncio.run(main())
    return time.perf_counter() - t0, time.process_time() - cpu0, failures


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of another process so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def bench_client(args: argparse.Namespace, out: Path | None) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fault_server.py"), "--delay", str(args.delay),
         "--capacity", str(args.capacity)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"fault server did not start: {line!r}")
        base = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        url = base + "/chat/completions"
        for c in args.concurrency:
            n = max(20, (3 if args.quick else 10) * c)
            teacher = OpenAITeacher("bench", [base], max_concurrency=c, max_retries=0, timeout_s=30)
            clients = {"OpenAITeacher/aiohttp": lambda reqs, t=teacher: run(t, reqs),
                       "httpx": lambda reqs, c=c: run_httpx(url, reqs, c)}
            for name, go in clients.items():
                go(requests(min(c, 8), "warm"))  # imports, first connections
                # the median of `repeats` runs: on a shared machine one run can stall behind a neighbour
                runs = []
                for _ in range(args.repeats):
                    s0 = process_cpu(proc.pid)
                    seconds, cpu, failures = go(requests(n, f"c{c}"))
                    s1 = process_cpu(proc.pid)
                    runs.append((seconds, cpu, failures, None if s0 is None or s1 is None else s1 - s0))
                runs.sort(key=lambda r: r[0])
                seconds, cpu, failures, server_cpu = runs[len(runs) // 2]
                rps = n / seconds
                ideal = min(c, args.capacity) / args.delay
                emit({"part": "client", "client": name, "concurrency": c, "capacity": args.capacity,
                      "delay_s": args.delay, "requests": n, "repeats": args.repeats,
                      "seconds": round(seconds, 3), "requests_per_s": round(rps, 1),
                      "ideal_requests_per_s": round(ideal, 1), "ratio": round(rps / ideal, 3),
                      "client_cpu_ms_per_request": round(1000 * cpu / n, 3),
                      "server_cpu_ms_per_request": None if server_cpu is None else round(1000 * server_cpu / n, 3),
                      "server_cpu_use": None if server_cpu is None else round(server_cpu / seconds, 3),
                      "all_ratios": [round(n / r[0] / ideal, 3) for r in runs], "failures": failures,
                      "load_avg_1min": round(os.getloadavg()[0], 2)}, out)
    finally:
        proc.terminate()
        proc.wait(10)


def tiny_model(path: Path) -> Path:
    import torch

    from distillery.config import ModelConfig, TaskConfig
    from distillery.models import build_model, save_model, train_tokenizer
    from distillery.tasks import load_problems

    task = TaskConfig(num_operands=2, digits=(1, 2), operations=["+", "-"])
    problems = load_problems(task, "train", 300, seed=0)
    tok = train_tokenizer((p.prompt + " " + p.chain for p in problems), vocab_size=300)
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, device="cpu"), tok)
    return save_model(model, tok, path)


def bench_serve(args: argparse.Namespace, out: Path | None) -> None:
    try:
        from distillery.serve import start_server
    except ImportError as exc:
        emit({"part": "serve", "skipped": f"distillery.serve not available: {exc}"}, out)
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    n = 32 if args.quick else 128
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model(Path(tmp) / "tiny")
        reqs = requests(n, "serve", max_new_tokens=args.serve_tokens)
        for batch in (32, 1):
            with start_server(model_dir, max_batch_size=batch) as handle:
                teacher = OpenAITeacher("tiny", [handle.base_url], max_concurrency=64, max_retries=0,
                                        timeout_s=300)
                run(teacher, requests(4, "warm", max_new_tokens=args.serve_tokens))
                seconds, cpu, failures = run(teacher, reqs)
            emit({"part": "serve", "max_batch_size": batch, "client_concurrency": 64, "requests": n,
                  "max_new_tokens": args.serve_tokens, "seconds": round(seconds, 3),
                  "requests_per_s": round(n / seconds, 2),
                  "generated_tokens_per_s": round(teacher.stats.tokens / max(teacher.stats.seconds, 1e-9), 1),
                  "failures": failures}, out)


def main() -> None:
    ap = argparse.ArgumentParser(description="OpenAITeacher benchmark")
    ap.add_argument("--quick", action="store_true", help="fewer requests per point")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    ap.add_argument("--repeats", type=int, default=3, help="runs per concurrency (the median is reported)")
    ap.add_argument("--delay", type=float, default=0.2, help="server answer delay (s)")
    ap.add_argument("--capacity", type=int, default=64, help="requests the server serves at once")
    ap.add_argument("--serve-tokens", type=int, default=16, help="max_new_tokens against distillery serve")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-client", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    if not args.skip_client:
        bench_client(args, args.out)
    if not args.skip_serve:
        bench_serve(args, args.out)


if __name__ == "__main__":
    main()
