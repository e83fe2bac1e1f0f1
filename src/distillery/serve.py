"""`distillery serve`: an OpenAI-compatible HTTP server over a local Hugging Face causal LM.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (with
legacy ``logprobs``, ``echo`` prompt log-probs as vLLM returns them, and SSE ``stream``).

One worker thread owns the model. Handlers tokenize a request and put it on a queue; the worker
takes up to ``max_batch_size`` waiting requests (waiting at most ``batch_wait_ms`` for more after
the first) and decodes all their rows in one left-padded ``model.generate`` call (KV cache).
Sampling is per row, inside that one call: a logits processor picks each row's token (argmax for
temperature 0, else temperature / top-p sampling with the row's own seeded generator) and records
its log-probs from the raw logits; a stopping criterion ends each row at its own ``max_tokens``,
end token or stop string. So any mix of requests shares a batch, and a seeded request samples the
same tokens whatever it is batched with.

Hardening (docs/serve.md): per-request caps on rows and tokens, checked before any work; a
request whose client disconnects is cancelled (dropped from the queue, or its rows ended at the
next decode step); long prompts are tokenized on a thread pool, off the event loop; with a key,
every path but ``/health`` needs it; a non-loopback host without a key is refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from distillery.config import ModelConfig
from distillery.errors import DistilleryError
from distillery.models import load_model, load_tokenizer

log = logging.getLogger("distillery.serve")

MAX_LOGPROBS = 20
# Per-request caps (``--max-rows-per-request``, ``--max-tokens-per-request``): one request must not
# hold the single worker for minutes or fill memory (40 prompts x n=128 once took 382 s, 3.2 GB).
# 128 rows = OpenAI's largest ``n`` for one prompt; tokens count each row's prompt plus its
# ``max_tokens`` (what the row's KV cache can grow to).
# Prompts longer than this are rendered and tokenized on a thread pool, not the event loop (a
# 1 MB prompt takes seconds). Shorter ones (well under a millisecond) stay inline: the hop to a
# thread and back waits on the GIL the busy worker holds, which delayed every request enough to
# shrink batches and cut throughput by more than half under load (bench/serve_load.py).
INLINE_PROMPT_CHARS = 4096
DEFAULT_MAX_ROWS = 128
DEFAULT_MAX_TOKENS = 131_072


class ServeError(DistilleryError, ValueError):
    """A ``serve`` setting that cannot work or is unsafe (a public address without auth, an
    unset key variable); says which flag fixes it."""


# --------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error returned as an OpenAI-style body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# --------------------------------------------------------------------------------------------
# request bodies (unknown fields are ignored: clients send many)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool | None = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        # a text model renders strings: null or a number would become "None"/"5" in the prompt
        if v is None:
            raise ValueError('must be a string (send "" for an empty message), not null')
        if not isinstance(v, str | list) or (
            isinstance(v, list) and any(not isinstance(p, dict) or p.get("type") != "text"
                                        or not isinstance(p.get("text"), str) for p in v)
        ):
            raise ValueError('must be a string or a list of {"type": "text", "text": str} parts')
        return v


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    # vLLM's extension: render tokens as "token_id:<id>" (what a logit-capture stage wants)
    return_tokens_as_token_ids: bool | None = False


# --------------------------------------------------------------------------------------------
# the engine: one worker thread, a queue, batched generate


@dataclass
class _Row:
    """One sequence to decode: a prompt (token ids) and how to continue it."""

    choice: int
    prompt: int  # index of the prompt in the request
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    n_tokens: int = 0  # completion tokens that count (the end token included)
    streamed_chars: int = 0
    streamed_tokens: int = 0


@dataclass
class _Job:
    """One HTTP request: its rows, and the queue its events go back on."""

    rows: list[_Row]
    prompts: list[list[int]]
    stop: list[str]
    k: int | None  # top-k log-probs per token; None: no log-probs
    echo: bool
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    prompt_logprobs: list[list[tuple[float | None, list[tuple[int, float]] | None]]] | None = None
    cancelled: bool = False

    def send(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody to tell
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class ServeStats:
    """What the worker has done: batch sizes (requests per ``generate``), tokens, requests."""

    batch_sizes: list[int] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    # requests whose client went away, and their rows: dropped from the queue, or ended at the
    # next decode step (a batch whose rows are all cancelled stops there)
    cancelled_requests: int = 0
    cancelled_rows: int = 0


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _topk(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    vals, idx = logp.topk(k)
    return list(zip(idx.tolist(), vals.tolist()))


class _RowSampler(LogitsProcessor):
    """Picks every row's next token from the raw logits and records its log-probs.

    Returns scores that are -inf everywhere but the chosen token, so ``generate``'s argmax takes it.
    """

    def __init__(self, rows: list[_Row], ks: list[int | None]) -> None:
        self.rows, self.ks = rows, ks

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = scores.float().log_softmax(dim=-1)
        chosen = logp.argmax(dim=-1)
        for i, row in enumerate(self.rows):
            if row.finish_reason is not None:
                continue
            if row.temperature > 0:
                chosen[i] = self._sample(scores[i].float(), row)
            tok = int(chosen[i])
            row.ids.append(tok)
            row.logprobs.append(float(logp[i, tok]))
            if self.ks[i] is not None:
                row.tops.append(_topk(logp[i], self.ks[i]))
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> int:
        probs = (logits / row.temperature).softmax(dim=-1)
        if row.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= row.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=row.generator))


class _RowStopper(StoppingCriteria):
    """Ends each row at its own max_tokens, end token or stop string; streams text as it comes."""

    def __init__(self, engine: Engine, jobs: list[_Job], rows: list[tuple[_Job, _Row]]) -> None:
        self.engine, self.jobs, self.rows = engine, jobs, rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = []
        for job, row in self.rows:
            if row.finish_reason is None:
                if job.cancelled:
                    row.finish_reason = "cancelled"
                    self.engine.stats.cancelled_rows += 1
                else:
                    self.engine._check_row(job, row)
            done.append(row.finish_reason is not None)
        for job in self.jobs:
            if job.stream:
                self.engine._stream_deltas(job)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Owns the model on one worker thread; ``submit`` jobs from any thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int = 32,
        batch_wait_ms: float = 5.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in [tokenizer.eos_token_id, *eos] if t is not None}
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.stats = ServeStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="distillery-serve-worker", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)
                self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: _Job) -> None:
        self.start()
        self._queue.put(job)

    # -- the worker ---------------------------------------------------------------------------

    def _next_batch(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:  # shutting down: finish this batch first
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            for job in batch:
                if job.cancelled:  # its client left while it waited: never decoded
                    self.stats.cancelled_requests += 1
                    self.stats.cancelled_rows += len(job.rows)
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            try:
                self._process(batch)
            except Exception as exc:  # a failed batch fails its requests, not the server
                log.exception("batch of %d requests failed", len(batch))
                self.stats.errors += len(batch)
                for job in batch:
                    job.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            for job in batch:
                job.send(("done", None))

    @torch.no_grad()
    def _process(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.echo and job.k is not None:
                job.prompt_logprobs = self._prompt_logprobs(job.prompts, job.k)
        pairs = [(job, row) for job in jobs for row in job.rows]
        live = [(job, row) for job, row in pairs if row.max_tokens > 0]
        for _, row in pairs:
            if row.max_tokens == 0:
                row.finish_reason = "length"
        self.stats.batch_sizes.append(len(jobs))
        self.stats.batch_rows.append(len(live))
        if live:
            rows = [row for _, row in live]
            enc = _left_pad([r.prompt_ids for r in rows], self.pad_id, self.device)
            # only the request decides the sampling: the model's own generation_config defaults
            # (penalties, minimum lengths) are switched off, as an OpenAI-style server does
            gen_cfg = GenerationConfig(
                max_new_tokens=max(r.max_tokens for r in rows),
                do_sample=False,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                min_new_tokens=0,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or None,
            )
            self.model.generate(
                **enc,
                generation_config=gen_cfg,
                logits_processor=LogitsProcessorList([_RowSampler(rows, [job.k for job, _ in live])]),
                stopping_criteria=StoppingCriteriaList([_RowStopper(self, jobs, live)]),
            )
            for job, row in live:  # a row generate ended without our criterion seeing it
                if row.finish_reason is None:
                    self._check_row(job, row, reason="length")
        for job in jobs:
            if job.stream:
                self._stream_deltas(job)
            self.stats.requests += 1
            self.stats.cancelled_requests += any(r.finish_reason == "cancelled" for r in job.rows)
            self.stats.prompt_tokens += sum(len(p) for p in job.prompts)
            self.stats.completion_tokens += sum(r.n_tokens for r in job.rows)

    def _prompt_logprobs(
        self, prompts: list[list[int]], k: int
    ) -> list[list[tuple[float | None, list[tuple[int, float]] | None]]]:
        """Per prompt token: its log-prob given the tokens before it and the top-k there."""
        enc = _left_pad(prompts, self.pad_id, self.device)
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**enc, position_ids=position_ids).logits
        width = enc["input_ids"].shape[1]
        out = []
        for i, ids in enumerate(prompts):
            start = width - len(ids)
            logp = logits[i, start:-1].float().log_softmax(dim=-1)
            entries: list[tuple[float | None, list[tuple[int, float]] | None]] = [(None, None)] if ids else []
            for j, tok in enumerate(ids[1:]):
                entries.append((float(logp[j, tok]), _topk(logp[j], k)))
            out.append(entries)
        return out

    def _check_row(self, job: _Job, row: _Row, reason: str | None = None) -> None:
        """After a new token: has this row finished, and why (``reason`` forces an end)."""
        if row.ids and row.ids[-1] in self.eos_ids:
            reason = "stop"
        elif len(row.ids) >= row.max_tokens:
            reason = "length"
        if job.stop or job.stream or reason is not None:
            row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = min((i for i in (row.text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text, reason = row.text[:cut], "stop"
        if reason is None:
            return
        row.finish_reason = reason
        row.n_tokens = len(row.ids)
        # log-probs cover the tokens that make up the text: the end token is counted, not shown
        shown = len(row.ids) - (1 if row.ids and row.ids[-1] in self.eos_ids else 0)
        row.ids, row.logprobs, row.tops = row.ids[:shown], row.logprobs[:shown], row.tops[:shown]

    def _stream_deltas(self, job: _Job) -> None:
        """Send each row's new text (held back while it could still become a stop string)."""
        hold = max((len(s) for s in job.stop), default=1) - 1
        for row in job.rows:
            if row.streamed_chars < 0:  # already sent its last delta
                continue
            final = row.finish_reason is not None
            end = len(row.text) if final else max(row.streamed_chars, len(row.text) - hold)
            while not final and end > row.streamed_chars and row.text[end - 1] == "\ufffd":
                end -= 1  # an incomplete UTF-8 character: wait for the rest
            n_tok = len(row.ids)
            if end > row.streamed_chars or n_tok > row.streamed_tokens or final:
                delta = row.text[row.streamed_chars : end]
                span = (row.streamed_tokens, n_tok)
                job.send(("delta", row, delta, span, row.finish_reason if final else None))
                row.streamed_chars, row.streamed_tokens = end, n_tok
            if final:
                row.streamed_chars = -1


# --------------------------------------------------------------------------------------------
# token text for log-probs


def _pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int], lo: int = 0, hi: int | None = None) -> list[str]:
    """Tokens ``lo:hi``'s text as each adds to the decoded string (a few tokens of context decide)."""
    out = []
    for i in range(lo, len(ids) if hi is None else hi):
        ctx = ids[max(0, i - 6) : i]
        before = tokenizer.decode(ctx)
        after = tokenizer.decode([*ctx, ids[i]])
        out.append(after[len(before) :] if after.startswith(before) else tokenizer.decode([ids[i]]))
    return out


class _Renderer:
    """Turns token ids into the strings the log-prob formats show."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, as_ids: bool = False) -> None:
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def piece(self, tok: int) -> str:
        return f"token_id:{tok}" if self.as_ids else self.tokenizer.decode([tok])

    def pieces(self, ids: list[int], lo: int = 0, hi: int | None = None) -> list[str]:
        if self.as_ids:
            return [f"token_id:{t}" for t in ids[lo:hi]]
        return _pieces(self.tokenizer, ids, lo, hi)

    def chat_logprobs(self, row: _Row, lo: int, hi: int) -> dict:
        """The chat ``logprobs`` object for tokens ``lo:hi`` of a row."""
        content = []
        for i, piece in enumerate(self.pieces(row.ids, lo, hi), start=lo):
            tops = [(self.piece(t), v) for t, v in row.tops[i]]
            content.append({
                "token": piece, "logprob": row.logprobs[i], "bytes": list(piece.encode("utf-8")),
                "top_logprobs": [{"token": p, "logprob": v, "bytes": list(p.encode("utf-8"))} for p, v in tops],
            })
        return {"content": content}

    def legacy_logprobs(
        self, job: _Job, row: _Row, lo: int, hi: int, with_prompt: bool, offset: int = 0
    ) -> dict:
        """The completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)
        for tokens ``lo:hi`` of a row, after the prompt's tokens when ``with_prompt`` (echo)."""
        tokens: list[str] = []
        lps: list[float | None] = []
        tops: list[list[tuple[int, float]] | None] = []
        if with_prompt:
            assert job.prompt_logprobs is not None
            entries = job.prompt_logprobs[row.prompt]
            tokens, lps, tops = self.pieces(row.prompt_ids), [e[0] for e in entries], [e[1] for e in entries]
        tokens += self.pieces(row.ids, lo, hi)
        lps += row.logprobs[lo:hi]
        tops += row.tops[lo:hi]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": [None if t is None else {self.piece(i): v for i, v in t} for t in tops],
            "text_offset": offsets,
        }


# --------------------------------------------------------------------------------------------
# the app


@dataclass
class _Served:
    name: str
    aliases: set[str]
    engine: Engine
    tokenizer: PreTrainedTokenizerBase
    created: int
    max_rows: int
    max_tokens: int
    # chat templates and tokenizers run here, not on the event loop: a 1 MB prompt takes seconds
    # to tokenize and would stall every other connection (``/health`` included) meanwhile
    pool: ThreadPoolExecutor


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(
    model_dir: str | Path,
    *,
    model_name: str | None = None,
    max_batch_size: int = 32,
    batch_wait_ms: float = 5.0,
    api_key: str | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    max_rows_per_request: int = DEFAULT_MAX_ROWS,
    max_tokens_per_request: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """A FastAPI app serving the causal LM in ``model_dir`` under the OpenAI API.

    ``app.state.stats`` (:class:`ServeStats`) counts batches and tokens; ``app.state.engine`` is
    the worker. ``api_key`` set: every path but ``/health`` (``/v1``, ``/docs``, ``/redoc``,
    ``/openapi.json``) needs ``Authorization: Bearer <api_key>``. A request with more than
    ``max_rows_per_request`` rows (prompts x ``n``) or more than ``max_tokens_per_request`` tokens
    (each row's prompt plus its ``max_tokens``) is a 400.
    """
    if max_rows_per_request < 1 or max_tokens_per_request < 1:
        raise ServeError("--max-rows-per-request and --max-tokens-per-request must be at least 1")
    model = load_model(ModelConfig(path=str(model_dir), device=device, trust_remote_code=trust_remote_code))
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    name = model_name or Path(model_dir).name
    served = _Served(
        name=name,
        aliases={name, str(model_dir), str(Path(model_dir).resolve())},
        engine=engine,
        tokenizer=tokenizer,
        created=int(time.time()),
        max_rows=max_rows_per_request,
        max_tokens=max_tokens_per_request,
        pool=ThreadPoolExecutor(4, thread_name_prefix="distillery-serve-tokenize"),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        served.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="distillery serve", lifespan=lifespan)
    app.state.engine = engine
    app.state.stats = engine.stats
    app.state.model_name = name

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.middleware("http")
    async def _log_and_auth(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        request.state.tokens = None
        # everything but the liveness probe: the API, and /docs, /redoc and /openapi.json too
        # (they list the endpoints and the model to anyone who asks)
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                response = APIError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                ).response()
                _log_request(request, response.status_code, None, t0)
                return response
        response = await call_next(request)
        if not getattr(request.state, "streaming", False):
            _log_request(request, response.status_code, request.state.tokens, t0)
        return response

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        _check_model(served, model_id)
        return _model_card(served)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await _handle(served, request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _handle(served, request, body, chat=False)

    return app


_FIELDS = {*ChatRequest.model_fields, *CompletionRequest.model_fields, *_Message.model_fields}


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first validation error as a 400 whose ``param`` is the field's path
    (``messages[1].content``); pydantic's union-member tags (``str``, ``list[int]``) are left out.
    Unparsable JSON names the body, with the position in the message (``param`` stays null: a
    byte offset is no parameter)."""
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = list(err.get("loc", ()))[1:] if err.get("loc", ("",))[0] == "body" else list(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        at = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        reason = (err.get("ctx") or {}).get("error", err.get("msg"))
        return APIError(400, f"The request body is not valid JSON: {reason}{at}.")
    path = ""
    for part in loc:
        if isinstance(part, int) and path:
            path += f"[{part}]"
        elif isinstance(part, str) and part in _FIELDS:
            path += f".{part}" if path else part
        else:  # a union member's tag or a dict key: the field named so far is the param
            break
    msg = str(err.get("msg"))
    return APIError(400, f"{path}: {msg}" if path else msg, path or None)


def _log_request(request: Request, status: int, tokens: int | None, t0: float) -> None:
    ms = (time.perf_counter() - t0) * 1000
    log.info("%s %s %d tokens=%s %.1fms", request.method, request.url.path, status,
             "-" if tokens is None else tokens, ms)


def _model_card(served: _Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "distillery"}


def _check_model(served: _Served, model: str) -> None:
    if model not in served.aliases:
        raise APIError(
            404, f"The model '{model}' does not exist; this server serves '{served.name}'.",
            param="model", code="model_not_found",
        )


def _chat_prompts(
    tokenizer: PreTrainedTokenizerBase, messages: list[_Message]
) -> tuple[list[list[int]], list[str]]:
    """The chat's one prompt as token ids (and no echo text); runs on the tokenizer pool."""
    convo = []
    for m in messages:  # content parts were checked to be text parts by _Message
        content = m.content if isinstance(m.content, str) else "".join(p["text"] for p in m.content)
        convo.append({"role": m.role, "content": content})
    try:
        # the same rendering as distillery.chat.prompt_text, minus its drop of a final
        # assistant turn (a training detail; a server continues whatever it is sent)
        text = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        raise APIError(400, f"messages: the chat template failed: {exc}", "messages") from exc
    return [tokenizer(text, add_special_tokens=False)["input_ids"]], [""]


def _completion_prompts(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> tuple[list[list[int]], list[str]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    ids, texts = [], []
    vocab = len(tokenizer)
    for p in prompt:
        if isinstance(p, str):
            ids.append(tokenizer(p)["input_ids"])
            texts.append(p)
        else:
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
            ids.append(list(p))
            texts.append(tokenizer.decode(p))
        if not ids[-1]:
            raise APIError(400, "prompt: must not be empty (it encodes to no tokens)", "prompt")
    return ids, texts


def _prompt_size(prompt: Any) -> int:
    """Characters (or token ids) in a request's prompt or messages: what tokenizing it costs."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, _Message):
        return _prompt_size(prompt.content if isinstance(prompt.content, str) else [p["text"] for p in prompt.content])
    if isinstance(prompt, list):
        return sum(_prompt_size(p) if not isinstance(p, int) else 1 for p in prompt)
    return 0


def _count_prompts(prompt: Any) -> int:
    """How many prompts a completions ``prompt`` holds (a string, token ids, or a list of them),
    known before anything is tokenized."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return 1
    return len(prompt)


def _check_rows(served: _Served, n_prompts: int, n: int) -> None:
    """Refuse a request over ``--max-rows-per-request`` before any work is done for it."""
    if n_prompts * n > served.max_rows:
        raise APIError(
            400,
            f"This request asks for {n_prompts} prompt(s) x n={n} = {n_prompts * n} sequences; this "
            f"server decodes at most {served.max_rows} per request (--max-rows-per-request). "
            "Reduce n or send the prompts in several requests.",
            "n" if n > 1 else "prompt", "request_too_large",
        )


def _completion_budget(
    served: _Served, prompts: list[list[int]], n: int, max_tokens: int | None, param: str, where: str
) -> int:
    """The ``max_tokens`` each row may decode, checked against the model's context and against
    ``--max-tokens-per-request`` (each row's prompt plus ``max_tokens``, summed over the rows).

    ``max_tokens`` None (chat without one): the rest of the context, shrunk to fit the token cap,
    so a plain chat request on a long-context model is not refused for a limit it never named.
    """
    rows = len(prompts) * n
    prompt_cost = n * sum(len(p) for p in prompts)
    budget = served.max_tokens
    if prompt_cost > budget:
        raise APIError(
            400,
            f"This request's prompts come to {prompt_cost} tokens over {rows} sequences; this server "
            f"allows {budget} tokens per request (--max-tokens-per-request). Shorten {where} or "
            "reduce n.",
            where, "request_too_large",
        )
    limit = served.engine.max_context
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        room = max(limit - longest, 0) if limit is not None else 256
        max_tokens = min(room, (budget - prompt_cost) // rows)
    if limit is not None and longest + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens; the request asks for "
            f"{longest} prompt + {max_tokens} completion tokens. Reduce the prompt or {param}.",
            where, "context_length_exceeded",
        )
    if prompt_cost + max_tokens * rows > budget:
        raise APIError(
            400,
            f"This request needs up to {prompt_cost + max_tokens * rows} tokens ({prompt_cost} prompt "
            f"+ {param}={max_tokens} x {rows} sequences); this server allows {budget} tokens per "
            f"request (--max-tokens-per-request). Reduce {param} or n.",
            param, "request_too_large",
        )
    return max_tokens


async def _watch_disconnect(request: Request, job: _Job) -> None:
    """Cancel ``job`` when its client goes away. A non-streaming handler is not interrupted when
    that happens, so without this the worker would decode the whole request for nobody; once the
    body is read, the next ASGI message is ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled = True
    job.events.put_nowait(("gone", None))


async def _handle(served: _Served, request: Request, body: ChatRequest | CompletionRequest, chat: bool) -> Any:
    _check_model(served, body.model)
    tok = served.tokenizer
    engine = served.engine
    loop = asyncio.get_running_loop()
    n = body.n or 1
    prepare: Callable[[], tuple[list[list[int]], list[str]]]
    if chat:
        assert isinstance(body, ChatRequest)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        _check_rows(served, 1, n)
        prepare = functools.partial(_chat_prompts, tok, body.messages)
        k = (body.top_logprobs or 0) if body.logprobs else None
        echo = False
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    else:
        assert isinstance(body, CompletionRequest)
        _check_rows(served, _count_prompts(body.prompt), n)
        prepare = functools.partial(_completion_prompts, tok, body.prompt)
        k, echo = body.logprobs, bool(body.echo)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        param = "max_tokens"
    if _prompt_size(body.messages if chat else body.prompt) > INLINE_PROMPT_CHARS:
        prompts, texts = await loop.run_in_executor(served.pool, prepare)
    else:
        prompts, texts = prepare()
    max_tokens = _completion_budget(served, prompts, n, max_tokens, param, "messages" if chat else "prompt")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    seed = body.seed
    rows = []
    for p, ids in enumerate(prompts):
        for j in range(n):
            choice = p * n + j
            rng = None
            if temperature > 0:  # each choice its own generator: the same tokens in any batch
                rng = torch.Generator(device=engine.device)
                rng.manual_seed(random.getrandbits(63) if seed is None else (seed * 1_000_003 + j) % 2**63)
            rows.append(_Row(choice, p, ids, max_tokens, temperature, top_p, rng))
    job = _Job(rows, prompts, body.stop, k, echo, bool(body.stream), loop, asyncio.Queue())
    kind = "chat.completion" if chat else "text_completion"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    render = _Renderer(tok, as_ids=not chat and bool(body.return_tokens_as_token_ids))
    meta = {"id": rid, "created": int(time.time()), "model": served.name}
    engine.submit(job)
    if body.stream:  # StreamingResponse stops the generator when the client leaves: _stream cancels
        request.state.streaming = True
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = _stream(job, request, chat, kind, meta, render, texts, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        while True:
            event = await job.events.get()
            if event[0] == "error":
                raise APIError(500, event[1], type="server_error")
            if event[0] == "gone":  # nobody reads this answer; 499 is what the log shows
                return APIError(499, "The client closed the request.", type="client_closed").response()
            if event[0] == "done":
                break
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    finally:
        watcher.cancel()
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(r.n_tokens for r in rows)
    request.state.tokens = prompt_tokens + completion_tokens
    choices = [
        _chat_choice(render, r, k) if chat else _completion_choice(render, job, r, texts) for r in rows
    ]
    return {**meta, "object": kind, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _chat_choice(render: _Renderer, row: _Row, k: int | None) -> dict:
    return {
        "index": row.choice,
        "message": {"role": "assistant", "content": row.text},
        "logprobs": render.chat_logprobs(row, 0, len(row.ids)) if k is not None else None,
        "finish_reason": row.finish_reason,
    }


def _completion_choice(render: _Renderer, job: _Job, row: _Row, texts: list[str]) -> dict:
    lp = None if job.k is None else render.legacy_logprobs(job, row, 0, len(row.ids), job.echo)
    return {
        "index": row.choice,
        "text": (texts[row.prompt] if job.echo else "") + row.text,
        "logprobs": lp,
        "finish_reason": row.finish_reason,
    }


async def _stream(
    job: _Job,
    request: Request,
    chat: bool,
    kind: str,
    meta: dict,
    render: _Renderer,
    texts: list[str],
    include_usage: bool,
) -> AsyncIterator[str]:
    t0 = time.perf_counter()
    status = 200
    obj = kind + ".chunk" if chat else kind
    usage = None
    try:
        if chat:
            for row in job.rows:
                choice = {"index": row.choice, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}
                yield _sse({**meta, "object": obj, "choices": [choice]})
        first = {row.choice: job.echo for row in job.rows}  # echo: the prompt comes first
        offsets = dict.fromkeys(first, 0)  # legacy text_offset so far, per choice
        while True:
            event = await job.events.get()
            if event[0] == "error":
                status = 500
                err = {"message": event[1], "type": "server_error", "param": None, "code": None}
                yield _sse({"error": err})
                break
            if event[0] == "done":
                prompt_tokens = sum(len(p) for p in job.prompts)
                usage = _usage(prompt_tokens, sum(r.n_tokens for r in job.rows))
                if include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": usage})
                break
            _, row, delta, (lo, hi), finish = event
            if chat:
                lp = render.chat_logprobs(row, lo, hi) if job.k is not None else None
                choice = {"index": row.choice, "delta": {"content": delta} if delta or not finish else {},
                          "logprobs": lp, "finish_reason": finish}
            else:
                lp = None
                if job.k is not None:
                    lp = render.legacy_logprobs(job, row, lo, hi, first[row.choice], offsets[row.choice])
                    offsets[row.choice] += sum(len(t) for t in lp["tokens"])
                if first[row.choice]:
                    delta, first[row.choice] = texts[row.prompt] + delta, False
                choice = {"index": row.choice, "text": delta, "logprobs": lp, "finish_reason": finish}
            yield _sse({**meta, "object": obj, "choices": [choice]})
        yield _sse("[DONE]")
    finally:
        job.cancelled = job.cancelled or usage is None
        _log_request(request, status, usage["total_tokens"] if usage else None, t0)


# --------------------------------------------------------------------------------------------
# running it


class ServerHandle:
    """A uvicorn server on a background thread: ``.url``, ``.base_url`` (with /v1), ``.stop()``."""

    def __init__(self, server: Any, thread: threading.Thread, app: FastAPI, host: str, port: int) -> None:
        self.server, self.thread, self.app = server, thread, app
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.base_url = self.url + "/v1"

    @property
    def stats(self) -> ServeStats:
        return self.app.state.stats

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(
    model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0, **create_app_kwargs: Any
) -> ServerHandle:
    """Serve ``model_dir`` from a background thread; returns once it accepts connections."""
    import uvicorn

    app = create_app(model_dir, **create_app_kwargs)
    port = port or _free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="distillery-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server on {host}:{port} failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server on {host}:{port} did not start within 60 s")
        time.sleep(0.02)
    return ServerHandle(server, thread, app, host, port)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine (``localhost``,
    127.0.0.0/8, ``::1``); a name is resolved, and counts only if every address it has is loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_bind(host: str, api_key: str | None, allow_unauthenticated: bool = False) -> None:
    """Refuse to serve an address other machines can reach without a key, unless asked to:
    anyone on the network could then run the model (and read ``/docs``) at will."""
    if api_key is None and not allow_unauthenticated and not is_loopback(host):
        raise ServeError(
            f"--host {host}: this address is reachable from other machines and no API key is set. "
            "Set one with --api-key-env NAME (the name of an environment variable holding the key), "
            "or pass --allow-unauthenticated if anyone who can reach this address may use the model."
        )


def serve_command(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_batch_size: int = 32,
    batch_wait_ms: float = 5.0,
    api_key_env: str | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_unauthenticated: bool = False,
    max_rows_per_request: int = DEFAULT_MAX_ROWS,
    max_tokens_per_request: int = DEFAULT_MAX_TOKENS,
) -> None:
    """Serve until interrupted (what ``distillery serve`` runs). The key is read from ``api_key_env``.

    Raises :class:`ServeError` (exit 2 from the CLI) before loading anything when the key variable is
    unset, or when ``host`` is not loopback and there is no key (see :func:`check_bind`).
    """
    import uvicorn

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ServeError(
                f"--api-key-env {api_key_env}: that environment variable is not set or empty; "
                f"export {api_key_env}=<key> first"
            )
    check_bind(host, api_key, allow_unauthenticated)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(
        model_dir, model_name=model_name, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
        api_key=api_key, device=device, trust_remote_code=trust_remote_code,
        max_rows_per_request=max_rows_per_request, max_tokens_per_request=max_tokens_per_request,
    )
    url = f"http://{host}:{port}"
    print(f"serving {app.state.model_name!r} at {url}/v1 (batch ≤ {max_batch_size}, wait {batch_wait_ms} ms, "
          f"≤ {max_rows_per_request} rows and {max_tokens_per_request} tokens per request, "
          f"auth {'on' if api_key else 'off'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


__all__ = [
    "APIError", "Engine", "ServeError", "ServeStats", "ServerHandle", "check_bind", "create_app",
    "is_loopback", "serve_command", "start_server",
]
