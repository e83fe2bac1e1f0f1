"""Load test: `distillery serve` under many concurrent clients, batched and unbatched.

Starts ``distillery serve MODEL`` as a subprocess on 127.0.0.1 (CPU), waits for ``/health``, warms
it up, then runs ``--clients`` concurrent clients (one ``httpx.AsyncClient``, each client a task
that sends its next request as soon as the last one answers) for ``--seconds``. Each request is a
greedy chat request (``"What is a + b?"``, ``max_tokens`` ``--max-tokens``). The same load runs
twice in one invocation: against ``--max-batch-size`` (default 32) and against
``max_batch_size: 1`` (no batching: the baseline).

Per server it prints one JSON line: requests/s, completion tokens/s, p50 / p99 / max latency (ms),
errors (non-200 answers and client exceptions, timeouts included; each request may take 120 s),
and the server's RSS (``/proc/PID/status`` VmRSS, Linux only) after the warm-up, at the end and at
its peak (sampled every 100 ms), so ``rss_growth_mb`` is memory the load added, not the model.
A last line gives the batched / unbatched ratios.

How it is meant to be run (and how docs/serve.md's figures were made)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_load.py            # 64 clients, 30 s each
    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_load.py --seconds 10 --out bench/results.jsonl

``OMP_NUM_THREADS`` is passed on to the server (one intra-op thread: on a small shared CPU the
tiny model runs fastest that way). The model is the shipped tiny ``assets/demo_teacher``
(context 128 tokens). The clients run in this process, on the same CPUs as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (Linux), else None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def start(model: str, batch: int, port: int, log: Path, extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """``distillery serve`` in a subprocess (``extra_args`` appended to its command line); its log
    (a line per request) goes to ``log``: a pipe nobody reads would fill and block the server."""
    cmd = [sys.executable, "-m", "distillery.cli", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch-size", str(batch), "--device", "cpu", "--model-name", "bench",
           *extra_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server did not answer /health within 120 s")


def body(i: int, max_tokens: int) -> dict:
    a, b = (i * 37) % 90 + 10, (i * 53) % 90 + 10
    return {"model": "bench", "messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "temperature": 0, "max_tokens": max_tokens}


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """``clients`` closed-loop clients for ``seconds``: latencies (s), errors, completion tokens."""
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one_client(c: int) -> None:
            nonlocal tokens
            i = c
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", json=body(i, max_tokens))
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                        tokens += r.json()["usage"]["completion_tokens"]
                    else:
                        errors.append(f"HTTP {r.status_code}")
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors, "tokens": tokens, "wall": wall}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_one(args: argparse.Namespace, batch: int) -> dict:
    port = free_port()
    proc = start(args.model, batch, port, Path(tempfile.gettempdir()) / f"serve_load_{port}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        for i in range(3):  # warm-up: first-call allocations are not load
            httpx.post(url + "/v1/chat/completions", json=body(i, args.max_tokens), timeout=120)
        rss0 = rss_mb(proc.pid)
        peak = [rss0 or 0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], rss_mb(proc.pid) or 0.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        res = asyncio.run(load(url, args.clients, args.seconds, args.max_tokens))
        done.set()
        sampler.join()
        rss1 = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat, n = res["latencies"], len(res["latencies"])
    return {
        "bench": "serve_load", "max_batch_size": batch, "clients": args.clients, "seconds": args.seconds,
        "max_tokens": args.max_tokens, "requests": n, "requests_per_s": round(n / res["wall"], 2),
        "completion_tokens_per_s": round(res["tokens"] / res["wall"], 1),
        "p50_ms": ms(pct(lat, 0.5)), "p99_ms": ms(pct(lat, 0.99)), "max_ms": ms(max(lat, default=None)),
        "errors": len(res["errors"]), "error_kinds": sorted(set(res["errors"])),
        "rss_start_mb": None if rss0 is None else round(rss0, 1),
        "rss_end_mb": None if rss1 is None else round(rss1, 1),
        "rss_peak_mb": round(peak[0], 1) if rss0 is not None else None,
        "rss_growth_mb": None if rss0 is None or rss1 is None else round(rss1 - rss0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="load duration per server (default 30)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default 32)")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the batched server's batch size")
    ap.add_argument("--model", default=str(ROOT / "assets" / "demo_teacher"))
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = ap.parse_args()
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "model": Path(args.model).name,
            "date": datetime.date.today().isoformat()}
    lines = []
    for batch in (args.max_batch_size, 1):
        lines.append({**run_one(args, batch), **meta})
        print(json.dumps(lines[-1]), flush=True)
    fast, base = lines
    ratio = {"bench": "serve_load", "ratio": f"max_batch_size {args.max_batch_size} / 1",
             "requests_per_s": round(fast["requests_per_s"] / max(base["requests_per_s"], 1e-9), 2),
             "p50": round(fast["p50_ms"] / base["p50_ms"], 2) if fast["p50_ms"] and base["p50_ms"] else None,
             **meta}
    lines.append(ratio)
    print(json.dumps(ratio), flush=True)
    if args.out is not None:
        with args.out.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
