"""`distillery serve` under hostile clients: per-request caps, disconnects, huge prompts, a public
address without auth, the docs pages, malformed messages. Real servers on 127.0.0.1."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from typer.testing import CliRunner

from distillery.cli import app as cli_app
from distillery.config import ModelConfig
from distillery.errors import DistilleryError
from distillery.models import build_model, save_model
from distillery.serve import ServeError, check_bind, is_loopback, serve_command, start_server

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def limited(tiny_model_dir):
    """Auth on, small caps: 8 rows and 1,000 tokens per request (the context is 256)."""
    with start_server(
        tiny_model_dir, model_name=NAME, api_key=KEY, device="cpu", max_batch_size=8,
        max_rows_per_request=8, max_tokens_per_request=1000,
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model with an 8,192-token context: a request can keep the worker busy for many
    seconds. Greedy from "12 + 7 =" repeats one token that is not the end token (so rows only end
    at max_tokens, or when cancelled)."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu", max_position_embeddings=8192)
    model = build_model(cfg, tiny_tokenizer)
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("long_model"))


def _post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.base_url}/{path}", json=body, headers=AUTH, timeout=60, **kw)


# -- caps on rows and tokens per request ------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "n", "param"),
    [(["1 + 2 ="] * 3, 4, "n"), (["1 + 2 ="] * 9, 1, "prompt"), ("1 + 2 =", 9, "n")],
)
def test_over_the_row_cap_is_a_fast_400_before_any_work(limited, prompt, n, param):
    before = limited.stats.requests
    t0 = time.perf_counter()
    r = _post(limited, "completions", {"model": NAME, "prompt": prompt, "n": n, "max_tokens": 4})
    assert time.perf_counter() - t0 < 1.0
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "request_too_large"
    assert "--max-rows-per-request" in err["message"] and " 8 " in err["message"]
    assert limited.stats.requests == before  # the engine never saw it


def test_at_the_row_cap_is_served(limited):
    r = _post(limited, "completions", {"model": NAME, "prompt": ["1 + 2 ="] * 2, "n": 4, "max_tokens": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_over_the_token_cap_is_a_400_naming_max_tokens(limited):
    # 8 rows x (prompt + 200) > 1,000 tokens; one row fits the context
    body = {"model": NAME, "prompt": "1 + 2 =", "n": 8, "max_tokens": 200}
    r = _post(limited, "completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and err["code"] == "request_too_large"
    assert "--max-tokens-per-request" in err["message"] and "1000" in err["message"]
    chat = _post(limited, "chat/completions", {"model": NAME, "messages": CONVO, "n": 8, "max_completion_tokens": 200})
    assert chat.json()["error"]["param"] == "max_completion_tokens"


def test_a_chat_without_max_tokens_is_fitted_into_the_token_cap(limited):
    """Chat's default max_tokens (the rest of the context) shrinks to the cap instead of a 400."""
    r = _post(limited, "chat/completions", {"model": NAME, "messages": CONVO, "n": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] * 8 + usage["completion_tokens"] <= 1000


# -- a client that disconnects ----------------------------------------------------------------


def test_a_disconnected_non_streaming_request_is_cancelled(long_model_dir):
    with start_server(long_model_dir, model_name=NAME, device="cpu", max_batch_size=4) as server:
        url = server.base_url + "/completions"
        long = {"model": NAME, "prompt": "12 + 7 =", "n": 16, "max_tokens": 8000, "temperature": 0}
        t0 = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=long, timeout=1.0)  # gives up after 1 s: the socket closes
        r = httpx.post(url, json={**long, "n": 1, "max_tokens": 4}, timeout=60)
        waited = time.perf_counter() - t0
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        # the abandoned request alone would take tens of seconds (8,000 steps x 16 rows)
        assert waited < 6.0, waited
        stats = server.stats
        assert stats.cancelled_requests == 1 and stats.cancelled_rows == 16
        assert stats.completion_tokens == 4  # the cancelled rows count nothing


def test_a_request_whose_client_left_while_queued_is_never_decoded(long_model_dir):
    with start_server(long_model_dir, model_name=NAME, device="cpu", max_batch_size=1) as server:
        url = server.base_url + "/completions"
        busy = {"model": NAME, "prompt": "12 + 7 =", "max_tokens": 3000, "temperature": 0}
        first = threading.Thread(target=lambda: httpx.post(url, json=busy, timeout=60))
        first.start()
        time.sleep(0.3)
        with pytest.raises(httpx.ReadTimeout):  # queued behind `first`, then abandoned
            httpx.post(url, json={**busy, "n": 3}, timeout=0.5)
        first.join()
        deadline = time.monotonic() + 10
        while server.stats.cancelled_rows < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats.cancelled_requests == 1 and server.stats.cancelled_rows == 3
        assert server.stats.batch_rows == [1]  # only `first` was decoded


# -- tokenization off the event loop ----------------------------------------------------------


def test_health_answers_while_a_huge_prompt_is_tokenized(limited):
    """Two 1 MB prompts (about 3 s of tokenizing here) in one request; /health keeps answering."""
    big = "What is 12 + 7? " * 65536  # 1 MiB, a token per character for the tiny tokenizer
    result: dict = {}

    def send() -> None:
        result["r"] = _post(limited, "completions", {"model": NAME, "prompt": [big, big], "max_tokens": 1})

    sender = threading.Thread(target=send)
    sender.start()
    latencies = []
    time.sleep(0.2)  # the body is sent and being tokenized
    while sender.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(limited.url + "/health", timeout=30).json() == {"status": "ok"}
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    sender.join()
    r = result["r"]  # tokenized in full: 2 M tokens, over the token cap
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
    assert r.json()["error"]["param"] == "prompt"
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


# -- binding a public address -----------------------------------------------------------------


def test_a_public_host_without_auth_is_refused_before_anything_loads(tmp_path, monkeypatch):
    missing = tmp_path / "not_loaded"  # refused first: the model is never looked for
    with pytest.raises(ServeError, match="--api-key-env") as info:
        serve_command(missing, host="0.0.0.0")
    assert isinstance(info.value, DistilleryError) and "--allow-unauthenticated" in str(info.value)
    res = CliRunner().invoke(cli_app, ["serve", str(missing), "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--allow-unauthenticated" in res.output
    monkeypatch.delenv("DISTILLERY_TEST_NO_SUCH_KEY", raising=False)
    res = CliRunner().invoke(cli_app, ["serve", str(missing), "--api-key-env", "DISTILLERY_TEST_NO_SUCH_KEY"])
    assert res.exit_code == 2 and "DISTILLERY_TEST_NO_SUCH_KEY" in res.output


def test_which_hosts_need_auth():
    for host in ("127.0.0.1", "127.8.0.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.0.2.7", "no-such-host.invalid"):
        assert not is_loopback(host), host
        with pytest.raises(ServeError):
            check_bind(host, None)
        check_bind(host, KEY)  # a key, or saying so explicitly, allows it
        check_bind(host, None, allow_unauthenticated=True)


# -- docs pages, messages, JSON ---------------------------------------------------------------


def test_docs_pages_need_the_key(limited):
    for path in ("/docs", "/redoc", "/openapi.json"):
        r = httpx.get(limited.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(limited.url + path, headers=AUTH).status_code == 200, path
    assert httpx.get(limited.url + "/health").status_code == 200  # the liveness probe stays open


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "bogus", "content": "hi"}], "messages[0].role"),
        ([{"role": "system", "content": "x"}, {"role": "user", "content": None}], "messages[1].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
        ([{"role": "user"}], "messages[0].content"),
    ],
)
def test_bad_messages_are_400_naming_the_message(limited, messages, param):
    r = _post(limited, "chat/completions", {"model": NAME, "messages": messages, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param + ":")
    assert err["type"] == "invalid_request_error"


def test_good_roles_and_text_parts_are_served(limited):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "1 + 2?"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "And 2 + 2?"},
    ]
    r = _post(limited, "chat/completions", {"model": NAME, "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_invalid_json_names_the_body_not_a_byte_offset(limited):
    body = b'{"model": "tiny", "messages": [{"role": "user", '
    r = httpx.post(limited.base_url + "/chat/completions", content=body,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] is None and err["type"] == "invalid_request_error"
    assert "not valid JSON" in err["message"] and f"character {len(body)}" in err["message"]
