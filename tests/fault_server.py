"""A real HTTP server speaking enough of the OpenAI API to test clients, with injectable faults.

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` (and ``GET /v1/models``,
``GET /v1/stats``: the counters below)
over HTTP/1.1 with keep-alive, on raw asyncio streams so every fault is a real network event:

* the answer to a prompt ``P`` is, per choice ``i``, ``"answer to: P"`` (plus ``" #i"`` when
  ``n > 1``), cut to ``max_tokens`` words (then ``finish_reason="length"``); ``usage`` counts
  words: ``completion_tokens`` over all choices, ``prompt_tokens`` = words of the prompt.
  The prompt of a chat request is its last user message's content.
* faults (:class:`Fault`) are taken in arrival order from ``faults`` (one per request, until the
  list runs out), or apply to every request whose prompt contains a key of ``prompt_faults``.
* ``delay_s`` before every answer, and at most ``capacity`` requests served at once (the rest
  wait their turn), like a server with a fixed number of batch slots.

What it saw is recorded: ``arrivals`` (monotonic time, path, prompt, Authorization header),
``max_active`` (high-water mark of requests received and not yet answered) and ``max_serving``.

Run in a thread (``with FaultServer() as srv: srv.base_url``) or as a process for benchmarks:
``python tests/fault_server.py --delay 0.2 --capacity 64`` prints ``PORT <n>`` and serves until
killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fault:
    """What to do to one request instead of answering it normally."""

    kind: str  # status | hang | drop | malformed | no_choices | wrong_n | delay
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0
    message: str = "injected fault"

    @classmethod
    def http(cls, status: int, retry_after: float | str | None = None, message: str = "injected fault") -> Fault:
        return cls("status", status=status, retry_after=None if retry_after is None else str(retry_after),
                   message=message)

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Fault:
        """Read the request, then say nothing for ``seconds`` and close."""
        return cls("hang", seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        """Send the headers and half the body, then close the connection."""
        return cls("drop")

    @classmethod
    def malformed(cls) -> Fault:
        """A 200 whose body is not valid JSON (a truncated object)."""
        return cls("malformed")

    @classmethod
    def no_choices(cls) -> Fault:
        return cls("no_choices")

    @classmethod
    def wrong_n(cls) -> Fault:
        """One choice more than asked for."""
        return cls("wrong_n")

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Answer normally after an extra ``seconds``."""
        return cls("delay", seconds=seconds)


@dataclass
class Arrival:
    t: float
    path: str
    prompt: str
    authorization: str | None


@dataclass
class FaultServer:
    delay_s: float = 0.0
    capacity: int | None = None
    faults: list[Fault] = field(default_factory=list)
    prompt_faults: dict[str, Fault] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.active = 0
        self.max_active = 0
        self.serving = 0
        self.max_serving = 0
        self.answered = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._slots: asyncio.Semaphore | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start_async(self) -> None:
        self._slots = asyncio.Semaphore(self.capacity) if self.capacity else None
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> FaultServer:
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start_async())
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=main, name="fault-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.sleep(0)

    def stop(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            fut.result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> dict:
        """Counters so far (also served at ``GET /v1/stats``)."""
        return {"arrivals": len(self.arrivals), "answered": self.answered, "active": self.active,
                "max_active": self.max_active, "serving": self.serving, "max_serving": self.max_serving}

    def gaps(self) -> list[float]:
        """Seconds between consecutive arrivals."""
        ts = [a.t for a in self.arrivals]
        return [b - a for a, b in zip(ts, ts[1:])]

    # -- HTTP --------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._respond(method, path, headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, payload: bytes | str,
                    extra: dict[str, str] | None = None) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()

    async def _respond(self, method: str, path: str, headers: dict, body: bytes,
                       writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path.rstrip("/").endswith("/models"):
            await self._send(writer, 200, json.dumps({"object": "list", "data": [{"id": "fault", "object": "model"}]}))
            return True
        if method == "GET" and path.rstrip("/").endswith("/stats"):  # what it saw, for benchmarks
            await self._send(writer, 200, json.dumps(self.snapshot()))
            return True
        chat = path.endswith("/chat/completions")
        if method != "POST" or not (chat or path.endswith("/completions")):
            await self._send(writer, 404, json.dumps({"error": {"message": f"no route {method} {path}"}}))
            return True
        try:
            req = json.loads(body)
        except ValueError:
            await self._send(writer, 400, json.dumps({"error": {"message": "body is not JSON"}}))
            return True
        if chat:
            users = [m for m in req.get("messages", []) if m.get("role") == "user"]
            prompt = users[-1]["content"] if users else ""
        else:
            prompt = req.get("prompt", "")
        with self._lock:
            self.arrivals.append(Arrival(time.monotonic(), path, prompt, headers.get("authorization")))
            fault = self.faults.pop(0) if self.faults else None
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        if fault is None:
            fault = next((f for k, f in self.prompt_faults.items() if k in prompt), None)
        try:
            return await self._answer(req, chat, prompt, fault, writer)
        finally:
            with self._lock:
                self.active -= 1

    async def _answer(self, req: dict, chat: bool, prompt: str, fault: Fault | None,
                      writer: asyncio.StreamWriter) -> bool:
        kind = fault.kind if fault else None
        if kind == "hang":
            await asyncio.sleep(fault.seconds)
            return False
        if kind == "status":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            await self._send(writer, fault.status, json.dumps({"error": {"message": fault.message}}), extra)
            return True
        if self._slots is not None:
            await self._slots.acquire()
        try:
            with self._lock:
                self.serving += 1
                self.max_serving = max(self.max_serving, self.serving)
            delay = self.delay_s + (fault.seconds if kind == "delay" else 0.0)
            if delay:
                await asyncio.sleep(delay)
            payload = self._completion(req, chat, prompt, extra_choice=kind == "wrong_n")
            if kind == "no_choices":
                payload = {k: v for k, v in payload.items() if k != "choices"}
            data = json.dumps(payload).encode()
            if kind == "malformed":
                await self._send(writer, 200, data[: len(data) // 2])
                return True
            if kind == "drop":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(data)}\r\n\r\n".encode() + data[: len(data) // 2])
                await writer.drain()
                return False
            await self._send(writer, 200, data)
            with self._lock:
                self.answered += 1
            return True
        finally:
            with self._lock:
                self.serving -= 1
            if self._slots is not None:
                self._slots.release()

    @staticmethod
    def _completion(req: dict, chat: bool, prompt: str, extra_choice: bool = False) -> dict:
        n = int(req.get("n") or 1)
        max_tokens = int(req.get("max_tokens") or 16)
        choices = []
        total = 0
        for i in range(n + extra_choice):
            words = f"answer to: {prompt}{f' #{i}' if n > 1 else ''}".split(" ")
            reason = "length" if len(words) > max_tokens else "stop"
            words = words[:max_tokens]
            total += len(words)
            text = " ".join(words)
            c: dict = {"index": i, "finish_reason": reason}
            if chat:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            choices.append(c)
        n_prompt = len(prompt.split())
        return {
            "id": "cmpl-fault", "object": "chat.completion" if chat else "text_completion",
            "model": req.get("model", ""), "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": total, "total_tokens": n_prompt + total},
        }


def expected_text(prompt: str, max_tokens: int = 16, i: int | None = None) -> str:
    """What :class:`FaultServer` answers to ``prompt`` (choice ``i`` when ``n > 1``)."""
    words = f"answer to: {prompt}{f' #{i}' if i is not None else ''}".split(" ")
    return " ".join(words[:max_tokens])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    ap.add_argument("--capacity", type=int, default=None, help="requests served at once")
    args = ap.parse_args()

    async def serve() -> None:
        srv = FaultServer(delay_s=args.delay, capacity=args.capacity, host=args.host, port=args.port)
        await srv.start_async()
        print(f"PORT {srv.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
