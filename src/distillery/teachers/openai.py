"""Any OpenAI-compatible endpoint as a teacher (vLLM, SGLang, TGI, llama.cpp server, hosted APIs).

How one request travels:

1. **Rate limit** (optional): requests and tokens are paced, not burst. Each attempt reserves one
   request slot of ``60 / requests_per_minute`` seconds and a token slot of
   ``tokens * 60 / tokens_per_minute`` seconds, where ``tokens`` = estimated prompt tokens
   (``len(prompt characters) / 4``, rounded up) + ``max_new_tokens * n``. An attempt starts once
   both slots are free, so over any window the limits are never exceeded.
2. **Concurrency**: at most ``max_concurrency`` HTTP attempts are in flight, over all base URLs.
3. **Endpoint**: the base URL with the fewest attempts in flight (ties: round robin) among those
   not cooling down. A URL that failed (connection error, timeout, 5xx, 429) cools down for a
   while (1 s, doubling per consecutive failure, at most 30 s), and the retry of the request goes
   to another URL when there is one.
4. **Attempt**: POST ``{base}/chat/completions`` (``mode="chat"``, the messages as given) or
   ``{base}/completions`` (``mode="completions"``, see :func:`completion_prompt`), with a total
   time limit of ``timeout_s`` per attempt (``aiohttp.ClientTimeout(total=timeout_s)``).
5. **Retry**: 408/409/425/429/5xx, timeouts, connection errors and dropped connections are retried
   up to ``max_retries`` times, after a backoff with full jitter,
   ``uniform(0, min(backoff_max_s, backoff_base_s * 2**retry))``. When the server sends
   ``Retry-After`` (seconds or an HTTP date) the wait is that long instead (plus up to 10 %
   jitter). A connection that could not be opened at all is retried at once on another URL when
   one is healthy. A response that is not valid JSON (truncated?) is retried at most twice.
   Other 4xx (400, 401, 403, 404, 422, ...) fail the request at once with the server's message.
6. **Result**: a valid response without ``choices``, or with a number of choices other than
   ``n``, fails the request (no retry: the server would answer the same). A failed request is a
   :class:`GenerationResult` with ``error`` set; ``stream`` never raises for one. When it failed
   on a retryable error through every retry (server down, timeouts, 5xx, 429) it is marked
   ``retryable``, so that a re-run of the phase sends it again; a 400 stays final.

Token counts: ``usage.completion_tokens`` is a total over the ``n`` choices; it is split evenly
over them (the remainder to the first ones). A server that reports no usage gets an estimate of
``ceil(len(text) / 4)`` per choice.

HTTP: one ``aiohttp.ClientSession`` per event loop (per ``stream`` call, or per
``agenerate_one``), its ``TCPConnector`` allowing ``max_concurrency`` connections (per host and in
all) kept alive between requests, http and https. Proxies come from the environment
(``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY``, as aiohttp's ``trust_env`` reads them), looked up
once per base URL when the session opens. aiohttp's errors map onto the retry rules above:
``ClientConnectorError`` and connect timeouts are "could not connect"; other timeouts are
"no answer within timeout_s"; ``ServerDisconnectedError``, ``ClientPayloadError`` (truncated body)
and other ``ClientError`` exceptions are dropped connections, retried with backoff; an invalid URL
fails at once.

The API key is read from the environment variable named ``api_key_env`` each time a session is
opened; it is not stored on the teacher, not part of its repr, not logged, and scrubbed from every
error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
import torch
import yarl
from aiohttp.helpers import get_env_proxy_for_url

from distillery.config import ConfigError
from distillery.logits.topk import TeacherTopK, teacher_log_tail
from distillery.teachers.base import (
    Generation,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    SamplingParams,
    TeacherError,
    TeacherUnavailableError,
    generate_via_stream,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from distillery.config import TeacherConfig

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
MALFORMED_RETRIES = 2  # a response that is not JSON is retried at most this often
URL_COOLDOWN_S = (1.0, 30.0)  # first and largest cool-down of a failing base URL
RETRY_AFTER_MAX_S = 600.0  # a Retry-After longer than this is capped


def estimate_tokens(text: str) -> int:
    """A rough token count for rate limits: one token per 4 characters, rounded up."""
    return -(-len(text) // 4)


def completion_prompt(messages: Iterable[dict]) -> str:
    """The prompt sent in ``mode="completions"``: the messages' contents concatenated, roles ignored.

    Completions endpoints take raw text, so the caller renders the prompt: pass one message whose
    content is the full prompt (e.g. the output of ``tokenizer.apply_chat_template(...,
    tokenize=False, add_generation_prompt=True)``). Several messages are joined with no separator,
    so a trailing assistant message works as a prefix the model continues.
    """
    return "".join(str(m.get("content") or "") for m in messages)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _RateLimiter:
    """Paces attempts so that neither requests/min nor tokens/min is exceeded (no bursts)."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.req_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.tok_interval = 60.0 / tokens_per_minute if tokens_per_minute else 0.0
        self.next_req = 0.0
        self.next_tok = 0.0

    @property
    def active(self) -> bool:
        return bool(self.req_interval or self.tok_interval)

    async def acquire(self, tokens: int) -> None:
        # no await between reading and writing the schedule: atomic within the event loop
        now = time.monotonic()
        start = max(now, self.next_req, self.next_tok)
        self.next_req = start + self.req_interval
        self.next_tok = start + tokens * self.tok_interval
        if start > now:
            await asyncio.sleep(start - now)


class _Endpoint:
    __slots__ = ("url", "in_flight", "failures", "cool_until")

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.in_flight = 0
        self.failures = 0  # consecutive
        self.cool_until = 0.0

    def healthy(self, now: float) -> bool:
        return self.cool_until <= now

    def failed(self) -> None:
        self.failures += 1
        lo, hi = URL_COOLDOWN_S
        self.cool_until = time.monotonic() + min(hi, lo * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0
        self.cool_until = 0.0


class _Retry(Exception):
    """An attempt failed in a way worth another try."""

    def __init__(self, message: str, wait: float | None = None, url_failed: bool = True,
                 connect: bool = False, malformed: bool = False) -> None:
        super().__init__(message)
        self.wait = wait  # from Retry-After
        self.url_failed = url_failed
        self.connect = connect  # nothing reached the server: try another URL at once
        self.malformed = malformed


class _Fail(Exception):
    """An attempt failed in a way another try would not fix."""


class _Reply(NamedTuple):
    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    content: bytes


# aiohttp >= 3.10 says which timeouts struck while connecting; 3.9 does not
_CONNECT_TIMEOUT: tuple[type[BaseException], ...] = tuple(
    c for c in (getattr(aiohttp, "ConnectionTimeoutError", None),) if c is not None)


class _Http:
    """One ``aiohttp.ClientSession`` on the caller's event loop: keep-alive connections, proxies.

    Proxies come from the environment as with aiohttp's ``trust_env=True`` (``HTTP_PROXY``,
    ``HTTPS_PROXY``, ``NO_PROXY``; proxy credentials in the proxy URL or ``~/.netrc``), but are
    looked up once per endpoint here instead of on every request: ``trust_env`` runs that lookup,
    and a ``~/.netrc`` lookup for the target host, in worker threads on every request (two thread
    hops: about 1 ms of client CPU per request, 1.6 against 0.6 ms at concurrency 32 in
    bench/generate.py's setting), and with a ``~/.netrc`` entry for the endpoint's host every
    request would fail ("Cannot combine AUTHORIZATION header with AUTH argument").
    """

    def __init__(self, headers: dict[str, str], limit: int, urls: Iterable[str]) -> None:
        # built inside a coroutine: the session belongs to the running loop
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
            headers={**headers, "User-Agent": f"distillery aiohttp/{aiohttp.__version__}"},
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self.targets: dict[str, tuple[yarl.URL, yarl.URL | None, aiohttp.BasicAuth | None]] = {}
        for u in urls:
            url = yarl.URL(u)
            try:
                proxy, proxy_auth = get_env_proxy_for_url(url)
            except LookupError:
                proxy, proxy_auth = None, None
            self.targets[u] = (url, proxy, proxy_auth)

    async def post(self, url: str, content: bytes, timeout: aiohttp.ClientTimeout) -> _Reply:
        target, proxy, proxy_auth = self.targets[url]
        async with self.session.post(target, data=content, timeout=timeout, proxy=proxy,
                                     proxy_auth=proxy_auth) as resp:
            return _Reply(resp.status, resp.headers, await resp.read())

    async def aclose(self) -> None:
        await self.session.close()


class _Session:
    """One HTTP session plus the shared scheduling state; lives on one event loop."""

    def __init__(self, teacher: OpenAITeacher) -> None:
        self.t = teacher
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = teacher._read_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._secret = key
        limit = teacher.max_concurrency
        self.sem = asyncio.Semaphore(limit)
        self.limiter = _RateLimiter(teacher.requests_per_minute, teacher.tokens_per_minute)
        self.endpoints = [_Endpoint(u) for u in teacher.base_urls]
        self.rr = 0
        path = "/chat/completions" if teacher.mode == "chat" else "/completions"
        self.urls = {ep.url: ep.url + path for ep in self.endpoints}
        # prompt log-probs (logit capture) always go to /completions
        self.prompt_urls = {ep.url: ep.url + "/completions" for ep in self.endpoints}
        self.http = _Http(headers, limit, {*self.urls.values(), *self.prompt_urls.values()})
        self.timeout = aiohttp.ClientTimeout(total=teacher.timeout_s)

    async def aclose(self) -> None:
        await self.http.aclose()

    def scrub(self, text: str) -> str:
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "***")
        return text

    # -- endpoint choice ---------------------------------------------------------------------
    def pick(self, avoid: _Endpoint | None) -> _Endpoint:
        eps = self.endpoints
        if len(eps) == 1:
            return eps[0]
        now = time.monotonic()
        cands = [e for e in eps if e is not avoid and e.healthy(now)]
        if not cands:
            cands = [e for e in eps if e.healthy(now)] or [min(eps, key=lambda e: e.cool_until)]
        self.rr += 1
        n = len(eps)
        # fewest in flight; ties broken by a rotating preference so traffic spreads evenly
        return min(cands, key=lambda e: (e.in_flight, (eps.index(e) - self.rr) % n))

    def other_healthy(self, ep: _Endpoint) -> bool:
        now = time.monotonic()
        return any(e is not ep and e.healthy(now) for e in self.endpoints)

    # -- one request, all its attempts -------------------------------------------------------
    def body(self, req: GenerationRequest) -> tuple[bytes, int]:
        p = req.params
        t = self.t
        d: dict[str, Any] = {"model": t.model}
        if t.mode == "chat":
            msgs = list(req.messages)
            d["messages"] = msgs
            chars = sum(len(str(m.get("content") or "")) for m in msgs)
        else:
            prompt = completion_prompt(req.messages)
            d["prompt"] = prompt
            chars = len(prompt)
        d["max_tokens"] = p.max_new_tokens
        d["temperature"] = p.temperature
        d["top_p"] = p.top_p
        d["n"] = p.n
        d["seed"] = p.seed
        if p.stop:
            d["stop"] = list(p.stop)
        if p.min_new_tokens:
            d["min_tokens"] = p.min_new_tokens  # vLLM/SGLang extension; only sent when asked for
        tokens = -(-chars // 4) + p.max_new_tokens * p.n  # estimate_tokens without joining the text
        return json.dumps(d, ensure_ascii=False).encode(), tokens

    async def run(self, req: GenerationRequest) -> GenerationResult:
        try:
            return await self._run(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never out of stream: a bug here fails one request
            self.t.stats.requests += 1
            self.t.stats.failures += 1
            return GenerationResult(req, error=self.scrub(f"{type(exc).__name__}: {exc}"))

    async def _run(self, req: GenerationRequest) -> GenerationResult:
        content, tokens = self.body(req)
        gens, error, retryable = await self.call(req.id, content, tokens, self.urls,
                                                 lambda data: self.parse(data, req.params))
        return GenerationResult(req, gens or [], error=error, retryable=retryable)

    async def call(self, name: str, content: bytes, tokens: int, urls: dict[str, str],
                   parse: Callable[[Any], Any]) -> tuple[Any, str | None, bool]:
        """POST ``content`` with the slots, pacing, endpoint choice and retries; parse the reply.

        Returns ``(parsed, None, False)`` or ``(None, error, retryable)``: ``retryable`` when the
        retries ran out on a failure that may pass (server down, timeout, 5xx, 429), not for one
        a new try would repeat (400, a reply without choices); ``urls`` maps a base URL to the
        full URL.
        """
        t = self.t
        stats = t.stats
        attempt = 0
        malformed = 0
        avoid: _Endpoint | None = None
        while True:
            try:
                async with self.sem:
                    if self.limiter.active:  # paced after the slot is ours: no burst on release
                        await self.limiter.acquire(tokens)
                    ep = self.pick(avoid)  # chosen at send time, when in-flight counts are current
                    ep.in_flight += 1
                    stats.in_flight += 1
                    try:
                        parsed = await self._attempt(ep, content, urls, parse)
                    finally:
                        ep.in_flight -= 1
                        stats.in_flight -= 1
                ep.succeeded()
                stats.requests += 1
                return parsed, None, False
            except _Fail as exc:
                stats.requests += 1
                stats.failures += 1
                return None, self.scrub(str(exc)), False
            except _Retry as exc:
                if exc.url_failed:
                    ep.failed()
                if exc.malformed:
                    malformed += 1
                if attempt >= t.max_retries or malformed > MALFORMED_RETRIES:
                    stats.requests += 1
                    stats.failures += 1
                    tries = attempt + 1
                    # a reply that stays malformed is the server's answer, not an outage
                    return (None, self.scrub(f"{exc} (gave up after {tries} attempt{'s' * (tries > 1)})"),
                            not exc.malformed)
                attempt += 1
                stats.retries += 1
                avoid = ep
                if exc.wait is not None:
                    wait = min(exc.wait, RETRY_AFTER_MAX_S)
                    wait += random.uniform(0, 0.1 * wait)
                elif exc.connect and self.other_healthy(ep):
                    wait = 0.0
                else:
                    wait = random.uniform(0, min(t.backoff_max_s, t.backoff_base_s * 2 ** (attempt - 1)))
                log.info("request %s: %s; retry %d/%d in %.2fs", name, self.scrub(str(exc)),
                         attempt, t.max_retries, wait)
                if wait > 0:
                    await asyncio.sleep(wait)

    async def _attempt(self, ep: _Endpoint, content: bytes, urls: dict[str, str],
                       parse: Callable[[Any], Any]) -> Any:
        url = urls[ep.url]
        try:
            resp = await self.http.post(url, content, self.timeout)
        except _CONNECT_TIMEOUT:
            raise _Retry(f"{ep.url}: cannot connect within timeout_s={self.t.timeout_s:g}", connect=True) from None
        except (TimeoutError, asyncio.TimeoutError):  # also aiohttp's ServerTimeoutError
            raise _Retry(f"{ep.url}: no answer within timeout_s={self.t.timeout_s:g}") from None
        except aiohttp.ClientConnectorError as exc:  # refused, unreachable, DNS
            raise _Retry(f"{ep.url}: cannot connect ({exc})", connect=True) from None
        except (aiohttp.InvalidURL, getattr(aiohttp, "NonHttpUrlClientError", aiohttp.InvalidURL)) as exc:
            raise _Fail(f"{ep.url}: bad URL ({type(exc).__name__}: {exc})") from None
        except (aiohttp.ClientError, OSError) as exc:  # dropped connection, truncated body, protocol error
            raise _Retry(f"{ep.url}: {type(exc).__name__}: {exc}") from None
        status = resp.status
        if status != 200:
            msg = f"{ep.url}: HTTP {status}: {_error_message(resp)}"
            if status in RETRY_STATUS or status >= 500:
                raise _Retry(msg, wait=parse_retry_after(resp.headers.get("retry-after")))
            raise _Fail(msg)
        try:
            data = json.loads(resp.content)
        except ValueError:
            snippet = resp.content[:200].decode("utf-8", "replace")
            raise _Retry(f"{ep.url}: response is not valid JSON: {snippet!r}", url_failed=False,
                         malformed=True) from None
        return parse(data)

    def parse(self, data: Any, params: SamplingParams) -> list[Generation]:
        if not isinstance(data, dict):
            raise _Fail(f"malformed response: expected a JSON object, got {type(data).__name__}")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            err = data.get("error")
            extra = f" (error: {err.get('message', err) if isinstance(err, dict) else err})" if err else ""
            raise _Fail(f"malformed response: no choices{extra}")
        if len(choices) != params.n:
            raise _Fail(f"malformed response: {len(choices)} choices, asked for n={params.n}")
        if len(choices) > 1 and all(isinstance(c, dict) and "index" in c for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        texts: list[str] = []
        reasons: list[str] = []
        for c in choices:
            if not isinstance(c, dict):
                raise _Fail("malformed response: a choice is not an object")
            if self.t.mode == "chat":
                msg = c.get("message")
                text = msg.get("content") if isinstance(msg, dict) else None
            else:
                text = c.get("text")
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise _Fail("malformed response: choice text is not a string")
            reason = c.get("finish_reason") or "stop"
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:  # servers apply stop strings; this covers one that does not
                text, reason = text[:cut], "stop"
            texts.append(text)
            reasons.append(str(reason))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        completion = usage.get("completion_tokens")
        prompt_tokens = usage.get("prompt_tokens")
        prompt_tokens = int(prompt_tokens) if isinstance(prompt_tokens, (int, float)) else 0
        if isinstance(completion, (int, float)):
            q, r = divmod(int(completion), len(texts))
            counts = [q + (i < r) for i in range(len(texts))]
        else:
            counts = [estimate_tokens(x) for x in texts]
        stats = self.t.stats
        stats.tokens += sum(counts)
        stats.prompt_tokens += prompt_tokens
        return [Generation(x, k, fr, prompt_tokens) for x, k, fr in zip(texts, counts, reasons)]


def _prompt_logprobs_body(model: str, token_ids: list[int], k: int) -> bytes:
    return json.dumps({"model": model, "prompt": list(token_ids), "max_tokens": 1, "temperature": 0,
                       "echo": True, "logprobs": k, "return_tokens_as_token_ids": True}).encode()


def _parse_prompt_logprobs(data: Any, n_tokens: int, k: int) -> TeacherTopK:
    """``choices[0].logprobs.top_logprobs`` (entry ``t`` scores token ``t``) as rows ``[T, k]``."""
    try:
        entries = data["choices"][0]["logprobs"]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise _Fail("the server returned no prompt log-probs: it needs /v1/completions with echo "
                    "and logprobs (distillery serve, vLLM)") from None
    if not isinstance(entries, list) or len(entries) < n_tokens:
        raise _Fail(f"the server returned {len(entries) if isinstance(entries, list) else 0} "
                    f"log-prob entries for a {n_tokens}-token prompt")
    ids = torch.zeros((n_tokens, k), dtype=torch.long)
    # the last row comes from the generated token's entry; a server that leaves out an end
    # token's log-probs leaves it NaN (capture stores rows 0..T-2 only)
    lps = torch.full((n_tokens, k), float("nan"))
    id_rows, lp_rows = [], []  # filled as lists, one tensor each: per-element writes cost ~10x
    prefix = "token_id:"
    for row, entry in enumerate(entries[1 : n_tokens + 1]):
        if not isinstance(entry, dict) or len(entry) < k:
            raise _Fail(f"position {row}: {len(entry) if isinstance(entry, dict) else 0} top log-probs, "
                        f"asked for {k} (vLLM: raise --max-logprobs)")
        pairs = sorted(((lp, key) for key, lp in entry.items()), reverse=True)[:k]
        if not all(str(key).startswith(prefix) for _, key in pairs):
            raise _Fail("the server returned token strings, not ids: it needs "
                        "return_tokens_as_token_ids (vLLM, distillery serve)")
        id_rows.append([int(str(key)[len(prefix):]) for _, key in pairs])
        lp_rows.append([float(lp) for lp, _ in pairs])
    if id_rows:
        ids[: len(id_rows)] = torch.tensor(id_rows, dtype=torch.long)
        lps[: len(lp_rows)] = torch.tensor(lp_rows, dtype=torch.float32)
    return TeacherTopK(ids, lps, teacher_log_tail(lps.double()).float())


def _parse_scored(data: Any, n_tokens: int, k: int) -> tuple[TeacherTopK, torch.Tensor]:
    """:func:`_parse_prompt_logprobs` plus ``token_logprobs`` ``[T]``: entry ``t`` = log p(token ``t``)
    given the tokens before it (NaN for token 0 and where the server gives none)."""
    top = _parse_prompt_logprobs(data, n_tokens, k)
    entries = data["choices"][0]["logprobs"].get("token_logprobs") or []
    tok = torch.full((n_tokens,), float("nan"), dtype=torch.float64)
    for t, lp in enumerate(entries[:n_tokens]):
        if isinstance(lp, (int, float)):
            tok[t] = float(lp)
    return top, tok


def _parse_continuation(data: Any) -> tuple[list[int], str]:
    """The generated token ids (``choices[0].logprobs.tokens`` as ``token_id:N``) and finish reason."""
    try:
        choice = data["choices"][0]
        tokens = choice["logprobs"]["tokens"]
    except (KeyError, IndexError, TypeError):
        raise _Fail("the server returned no token log-probs: it needs /v1/completions with logprobs "
                    "(distillery serve, vLLM)") from None
    if not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        raise _Fail("the server returned token strings, not ids: it needs return_tokens_as_token_ids "
                    "(vLLM, distillery serve)")
    return [int(t[len("token_id:"):]) for t in tokens], str(choice.get("finish_reason") or "stop")


def _error_message(resp: _Reply) -> str:
    """The server's own words: OpenAI ``{"error": {"message"}}``, FastAPI ``{"detail"}``, or text."""
    try:
        data = json.loads(resp.content)
    except ValueError:
        return resp.content[:500].decode("utf-8", "replace") or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
        if "detail" in data:
            return str(data["detail"])[:500]
        if "message" in data:
            return str(data["message"])[:500]
    return json.dumps(data)[:500]


_DONE = object()


class OpenAITeacher:
    """A teacher behind one or more OpenAI-compatible HTTP endpoints; see the module docstring."""

    def __init__(
        self,
        model: str,
        base_urls: list[str] | str,
        *,
        api_key_env: str | None = None,
        mode: str = "chat",
        max_concurrency: int = 32,
        max_retries: int = 6,
        timeout_s: float = 120.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 60.0,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ) -> None:
        if isinstance(base_urls, str):
            base_urls = [base_urls]
        if not base_urls:
            raise ValueError("OpenAITeacher needs at least one base URL, e.g. http://127.0.0.1:8000/v1")
        if mode not in ("chat", "completions"):
            raise ValueError(f"mode must be 'chat' or 'completions', not {mode!r}")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.model = model
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.api_key_env = api_key_env
        self.mode = mode
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.name = f"openai:{model}"
        self.stats = GenerationStats()
        self._read_key()  # fail early when the named variable is missing

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> OpenAITeacher:
        return cls(
            cfg.model,
            list(cfg.base_urls),
            api_key_env=cfg.api_key_env,
            mode=cfg.mode,
            max_concurrency=cfg.max_concurrency,
            max_retries=cfg.max_retries,
            timeout_s=cfg.timeout_s,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute,
        )

    def __repr__(self) -> str:
        return (f"OpenAITeacher(model={self.model!r}, base_urls={self.base_urls!r}, mode={self.mode!r}, "
                f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})")

    def _read_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"environment variable {self.api_key_env} (teacher.api_key_env) is not set or empty")
        return key

    # -- calls -----------------------------------------------------------------------------
    def logprobs(self, token_ids: list[list[int]], k: int, temperature: float = 1.0,
                 batch_size: int | None = None) -> list[TeacherTopK]:
        """The server's top-k next-token log-probs at every position (see ``HFTeacher.logprobs``).

        One ``/completions`` request per sequence: the token ids as the prompt, ``echo: true``,
        ``logprobs: k``, ``max_tokens: 1`` and ``return_tokens_as_token_ids`` (vLLM and
        ``distillery serve`` answer it; the one generated token gives the last row, NaN when the
        server does not list it). The tail is ``1 − Σ top-k``. Requests run concurrently (``max_concurrency``) with the usual retries;
        a sequence the server cannot score raises ``RuntimeError`` naming it.
        """
        if temperature != 1.0:
            raise ConfigError("servers return log-probs at temperature 1; capture at temperature 1 "
                              "(the loss applies its own temperature)")
        return self._prompt_logprobs(token_ids, k, _parse_prompt_logprobs)

    def score_sequences(self, token_ids: list[list[int]], k: int) -> list[tuple[TeacherTopK, torch.Tensor]]:
        """:meth:`logprobs` and, per sequence, the log-prob of each of its tokens ``[T]`` (NaN at 0).

        Raises :class:`TeacherUnavailableError` when a request failed on errors another try may
        pass (server down through every retry), :class:`TeacherError` for the others.
        """
        return self._prompt_logprobs(token_ids, k, _parse_scored)

    def continue_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], str]]:
        """Continue each token-id prompt; per prompt the generated ids and the finish reason.

        ``/completions`` with the ids as prompt, ``logprobs: 0`` and ``return_tokens_as_token_ids``
        (vLLM, ``distillery serve``): the ids come back exactly, not re-tokenized from text. A
        server may leave out the end token it stopped at (``finish_reason`` "stop"). Errors as
        :meth:`score_sequences`.
        """

        def body(ids: list[int]) -> bytes:
            return json.dumps({"model": self.model, "prompt": list(ids), "max_tokens": params.max_new_tokens,
                               "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
                               "logprobs": 0, "return_tokens_as_token_ids": True}).encode()

        async def run_all() -> list[tuple[Any, str | None, bool]]:
            session = _Session(self)
            try:
                return await asyncio.gather(*(
                    session.call(f"continue[{i}]", body(ids), len(ids) + params.max_new_tokens,
                                 session.prompt_urls, _parse_continuation)
                    for i, ids in enumerate(prompts)))
            finally:
                await session.aclose()

        out = []
        for i, (cont, error, retryable) in enumerate(asyncio.run(run_all())):
            if error is not None:
                kind = TeacherUnavailableError if retryable else TeacherError
                raise kind(f"teacher {self.name}: continuation of prompt {i} failed: {error}")
            out.append(cont)
        return out

    def _prompt_logprobs(self, token_ids: list[list[int]], k: int,
                         parse: Callable[[Any, int, int], Any]) -> list[Any]:
        """One echo request per sequence, concurrently; ``parse(data, n_tokens, k)`` reads each reply."""

        async def run_all() -> list[tuple[Any, str | None, bool]]:
            session = _Session(self)
            try:
                return await asyncio.gather(*(
                    session.call(f"logprobs[{i}]", _prompt_logprobs_body(self.model, ids, k),
                                 len(ids) + 1, session.prompt_urls,
                                 lambda data, n=len(ids): parse(data, n, k))
                    for i, ids in enumerate(token_ids)))
            finally:
                await session.aclose()

        out = []
        for i, (top, error, retryable) in enumerate(asyncio.run(run_all())):
            if error is not None:
                kind = TeacherUnavailableError if retryable else TeacherError
                raise kind(f"teacher {self.name}: log-probs of sequence {i} failed: {error}")
            out.append(top)
        return out

    def generate(self, conversations: list[list[dict]], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` continuations per conversation, in order; a failed request raises."""
        return generate_via_stream(self, conversations, params)

    async def agenerate_one(self, request: GenerationRequest) -> GenerationResult:
        """One request from async code, with its own short-lived HTTP session.

        For many requests use :meth:`stream`, which shares one session and the concurrency bound.
        """
        session = _Session(self)
        t0 = time.perf_counter()
        try:
            return await session.run(request)
        finally:
            self.stats.seconds += time.perf_counter() - t0
            await session.aclose()

    def stream(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResult]:
        """Results in completion order, ``max_concurrency`` requests in flight.

        The input is pulled lazily, in the caller's thread, at most ``2 * max_concurrency``
        requests ahead of the results yielded. HTTP runs on an event loop in a background thread.
        Closing the generator (``break``) cancels the requests in flight and returns promptly.
        """
        it = iter(requests)
        results: queue.SimpleQueue = queue.SimpleQueue()
        runner = _LoopRunner(self, results)
        runner.start()
        window = 2 * self.max_concurrency
        outstanding = 0
        exhausted = False
        stats = self.stats
        t_last = time.perf_counter()
        try:
            while True:
                batch = []
                while not exhausted and outstanding + len(batch) < window:
                    try:
                        batch.append(next(it))
                    except StopIteration:
                        exhausted = True
                if batch:
                    runner.submit(batch)
                    outstanding += len(batch)
                if outstanding == 0:
                    return
                item = runner.get()
                now = time.perf_counter()
                stats.seconds += now - t_last
                t_last = now
                outstanding -= 1
                yield item
                t_last = time.perf_counter()  # time spent by the caller is not the teacher's
        finally:
            runner.close()


class _LoopRunner:
    """An event loop in a daemon thread that runs requests handed over from the caller's thread."""

    def __init__(self, teacher: OpenAITeacher, results: queue.SimpleQueue) -> None:
        self.teacher = teacher
        self.results = results
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="openai-teacher", daemon=True)
        self.ready = threading.Event()
        self.session: _Session | None = None
        self.tasks: set[asyncio.Task] = set()
        self.stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = exc
            self.ready.set()
            self.results.put(_DONE)
        finally:
            try:  # join the resolver's executor threads: nothing of ours outlives the stream
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        self.session = _Session(self.teacher)
        self.ready.set()
        try:
            await self.stop.wait()
        finally:
            for t in list(self.tasks):
                t.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self.teacher.stats.in_flight = 0
            await self.session.aclose()

    def _start(self, batch: list[GenerationRequest]) -> None:
        for req in batch:
            task = self.loop.create_task(self._one(req))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _one(self, req: GenerationRequest) -> None:
        assert self.session is not None
        self.results.put(await self.session.run(req))

    def submit(self, batch: list[GenerationRequest]) -> None:
        self.loop.call_soon_threadsafe(self._start, batch)

    def get(self) -> GenerationResult:
        while True:
            try:
                item = self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the OpenAI teacher's event loop stopped unexpectedly") from self.error
                continue
            if item is _DONE:
                raise RuntimeError("the OpenAI teacher's event loop stopped unexpectedly") from self.error
            return item

    def close(self) -> None:
        if self.thread.is_alive() and self.stop is not None:
            try:
                self.loop.call_soon_threadsafe(self.stop.set)
            except RuntimeError:  # loop already closed
                pass
            self.thread.join(timeout=30)
