"""OpenAITeacher against real HTTP servers on 127.0.0.1: the fault server and `distillery serve`."""

from __future__ import annotations

import email.utils
import logging
import socket
import threading
import time

import pytest

from distillery.teachers.base import GenerationRequest, SamplingParams
from distillery.teachers.openai import MALFORMED_RETRIES, OpenAITeacher, parse_retry_after
from fault_server import Fault, FaultServer, expected_text

KEY_ENV = "DISTILLERY_TEST_OPENAI_KEY"
SECRET = "sk-test-0123456789abcdef"


def teacher(urls, **kw) -> OpenAITeacher:
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("timeout_s", 5.0)
    return OpenAITeacher("fault-model", urls if isinstance(urls, list) else [urls], **kw)


def reqs(n: int, prefix: str = "q", **params) -> list[GenerationRequest]:
    p = SamplingParams(**params)
    return [GenerationRequest(f"{prefix}{i}", [{"role": "user", "content": f"{prefix}{i}"}], p) for i in range(n)]


def run_all(t: OpenAITeacher, requests) -> dict:
    return {r.request.id: r for r in t.stream(requests)}


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


# -- answers ---------------------------------------------------------------------------------
def test_chat_answers_usage_and_stats(server):
    t = teacher(server.base_url, max_concurrency=4)
    out = run_all(t, reqs(12))
    assert len(out) == 12 and all(r.ok for r in out.values())
    for rid, r in out.items():
        (g,) = r.generations
        assert g.text == expected_text(rid)
        assert g.num_tokens == len(g.text.split()) and g.finish_reason == "stop" and g.prompt_tokens == 1
    assert t.stats.requests == 12 and t.stats.failures == 0 and t.stats.retries == 0
    assert t.stats.tokens == sum(r.generations[0].num_tokens for r in out.values())
    assert t.stats.prompt_tokens == 12 and t.stats.in_flight == 0 and t.stats.seconds > 0
    assert t.name == "openai:fault-model"
    assert all(a.path == "/v1/chat/completions" and a.authorization is None for a in server.arrivals)


def test_generate_in_order_n_samples_length_and_stop(server):
    t = teacher(server.base_url)
    convs = [[{"role": "user", "content": f"p{i} x y z"}] for i in range(5)]
    outs = t.generate(convs, SamplingParams(n=3, temperature=1.0, max_new_tokens=4))
    for i, gens in enumerate(outs):
        assert [g.text for g in gens] == [expected_text(f"p{i} x y z", 4, k) for k in range(3)]
        assert all(g.finish_reason == "length" and g.num_tokens == 4 for g in gens)  # 12 split over 3
    (gens,) = t.generate([[{"role": "user", "content": "cut here STOP rest"}]],
                         SamplingParams(stop=("STOP",), max_new_tokens=20))
    assert gens[0].text == "answer to: cut here " and gens[0].finish_reason == "stop"


def test_completions_mode_sends_joined_contents(server):
    t = teacher(server.base_url, mode="completions")
    conv = [{"role": "user", "content": "<|user|>2+2"}, {"role": "assistant", "content": " so"}]
    (gens,) = t.generate([conv], SamplingParams(max_new_tokens=16))
    assert server.arrivals[0].path == "/v1/completions" and server.arrivals[0].prompt == "<|user|>2+2 so"
    assert gens[0].text == expected_text("<|user|>2+2 so")


# -- retries ---------------------------------------------------------------------------------
def test_429_retry_after_is_honoured():
    with FaultServer(faults=[Fault.http(429, retry_after=1)]) as srv:
        t = teacher(srv.base_url)
        (r,) = list(t.stream(reqs(1)))
    assert r.ok and len(srv.arrivals) == 2 and t.stats.retries == 1
    assert srv.gaps()[0] >= 1.0


def test_retry_after_http_date():
    now = time.time()
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


@pytest.mark.parametrize("fault", [Fault.http(500), Fault.http(503), Fault.drop()], ids=["500", "503", "drop"])
def test_server_error_or_dropped_connection_then_success(fault):
    with FaultServer(faults=[fault, fault]) as srv:
        t = teacher(srv.base_url)
        (r,) = list(t.stream(reqs(1)))
    assert r.ok and r.generations[0].text == expected_text("q0")
    assert len(srv.arrivals) == 3 and t.stats.retries == 2 and t.stats.failures == 0


def test_hang_times_out_and_is_retried():
    with FaultServer(faults=[Fault.hang(10)]) as srv:
        t = teacher(srv.base_url, timeout_s=0.3)
        t0 = time.monotonic()
        (r,) = list(t.stream(reqs(1)))
        elapsed = time.monotonic() - t0
    assert r.ok and len(srv.arrivals) == 2 and 0.3 <= elapsed < 3


def test_gives_up_after_max_retries():
    with FaultServer(faults=[Fault.http(503)] * 10) as srv:
        t = teacher(srv.base_url, max_retries=2)
        (r,) = list(t.stream(reqs(1)))
    assert not r.ok and "HTTP 503" in r.error and "3 attempts" in r.error
    assert len(srv.arrivals) == 3 and t.stats.failures == 1 and t.stats.retries == 2


def test_malformed_json_fails_that_request_only():
    with FaultServer(prompt_faults={"bad": Fault.malformed()}) as srv:
        t = teacher(srv.base_url)
        out = run_all(t, reqs(6) + reqs(1, "bad"))
    assert not out["bad0"].ok and "not valid JSON" in out["bad0"].error
    assert sum(a.prompt == "bad0" for a in srv.arrivals) == 1 + MALFORMED_RETRIES
    assert all(out[f"q{i}"].ok for i in range(6)) and t.stats.failures == 1


@pytest.mark.parametrize("fault,words", [(Fault.no_choices(), "no choices"), (Fault.wrong_n(), "2 choices")])
def test_valid_json_with_bad_choices_is_an_error_result(fault, words):
    with FaultServer(faults=[fault]) as srv:
        t = teacher(srv.base_url)
        out = run_all(t, reqs(3))
    bad = [r for r in out.values() if not r.ok]
    assert len(bad) == 1 and words in bad[0].error and len(srv.arrivals) == 3  # no retry


def test_non_retryable_400_fails_at_once_with_server_message():
    with FaultServer(faults=[Fault.http(400, message="max_tokens is too large")]) as srv:
        t = teacher(srv.base_url)
        (r,) = list(t.stream(reqs(1)))
    assert not r.ok and "HTTP 400" in r.error and "max_tokens is too large" in r.error
    assert len(srv.arrivals) == 1 and t.stats.retries == 0 and t.stats.failures == 1


def test_proxy_from_the_environment(server, monkeypatch):
    for k in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")  # the fault server as the proxy
    t = teacher("http://teacher.invalid:8000/v1")
    (r,) = list(t.stream(reqs(1)))
    assert r.ok and r.generations[0].text == expected_text("q0")
    assert server.arrivals[0].path == "http://teacher.invalid:8000/v1/chat/completions"  # proxy form


# -- concurrency, endpoints, rate limits -----------------------------------------------------
def test_max_concurrency_is_never_exceeded():
    with FaultServer(delay_s=0.05) as srv:
        t = teacher(srv.base_url, max_concurrency=5)
        seen = []
        for _ in t.stream(reqs(40)):
            seen.append(t.stats.in_flight)
    assert srv.max_active == 5 and max(seen) <= 5 and len(srv.arrivals) == 40


def test_several_base_urls_share_the_load_and_a_dead_one_is_skipped():
    with FaultServer(delay_s=0.01) as a, FaultServer(delay_s=0.01) as b:
        t = teacher([a.base_url, b.base_url], max_concurrency=8)
        assert all(r.ok for r in t.stream(reqs(40)))
        assert len(a.arrivals) >= 10 and len(b.arrivals) >= 10
        dead = f"http://127.0.0.1:{closed_port()}/v1"
        t = teacher([dead, a.base_url], max_concurrency=4, max_retries=2)
        out = run_all(t, reqs(30))
    assert all(r.ok for r in out.values()) and len(out) == 30


def test_retry_goes_to_another_url():
    with FaultServer(faults=[Fault.http(500)]) as a, FaultServer(faults=[Fault.http(500)]) as b:
        t = teacher([a.base_url, b.base_url])
        (r,) = list(t.stream(reqs(1)))
    assert r.ok and len(a.arrivals) + len(b.arrivals) == 3
    assert len(a.arrivals) >= 1 and len(b.arrivals) >= 1


def test_requests_per_minute(server):
    t = teacher(server.base_url, max_concurrency=16, requests_per_minute=600)  # 10 per second
    t0 = time.monotonic()
    assert all(r.ok for r in t.stream(reqs(11)))
    assert time.monotonic() - t0 >= 1.0
    ts = sorted(a.t for a in server.arrivals)  # the k-th send waits for its slot: k * 0.1 s after t0
    assert all(t - t0 >= k * 0.1 - 0.005 for k, t in enumerate(ts))


def test_tokens_per_minute(server):
    # each request reserves ceil(2 chars / 4) + 9 new tokens = 10 tokens; 6000/min = 100 tokens/s
    t = teacher(server.base_url, max_concurrency=16, tokens_per_minute=6000)
    t0 = time.monotonic()
    assert all(r.ok for r in t.stream(reqs(6, max_new_tokens=9)))
    assert time.monotonic() - t0 >= 0.5


# -- the API key -----------------------------------------------------------------------------
def test_api_key_from_env_only_as_bearer(monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    faults = [Fault.http(500, message=f"upstream rejected {SECRET}"),
              Fault.http(401, message=f"invalid key {SECRET}")]
    with FaultServer(faults=faults) as srv:
        t = teacher(srv.base_url, api_key_env=KEY_ENV, max_concurrency=1)
        out = list(t.stream(reqs(3)))
    assert all(a.authorization == f"Bearer {SECRET}" for a in srv.arrivals)
    errors = [r.error for r in out if not r.ok]
    assert len(errors) == 1 and "invalid key ***" in errors[0]
    assert SECRET not in repr(t) and SECRET not in str(vars(t))
    assert SECRET not in caplog.text and "retry" in caplog.text
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        teacher(srv.base_url, api_key_env=KEY_ENV)


def test_from_config(monkeypatch):
    from distillery.config import TeacherConfig

    monkeypatch.setenv(KEY_ENV, SECRET)
    cfg = TeacherConfig(backend="openai", model="m", base_urls=["http://h:1/v1/"], api_key_env=KEY_ENV,
                        mode="completions", max_concurrency=3, requests_per_minute=60)
    t = OpenAITeacher.from_config(cfg)
    assert (t.base_urls, t.mode, t.max_concurrency, t.requests_per_minute) == (["http://h:1/v1"], "completions", 3, 60)
    assert t.max_retries == cfg.max_retries and t.timeout_s == cfg.timeout_s


# -- streaming -------------------------------------------------------------------------------
def test_lazy_input_and_early_break_do_not_hang():
    pulled = 0

    def many():
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield GenerationRequest(str(i), [{"role": "user", "content": f"q{i}"}])

    threads = threading.active_count()
    with FaultServer(delay_s=0.01) as srv:
        t = teacher(srv.base_url, max_concurrency=8)
        t0 = time.monotonic()
        got = 0
        for r in t.stream(many()):
            assert r.ok
            got += 1
            if got == 50:
                break
        elapsed = time.monotonic() - t0
        assert got == 50 and elapsed < 10 and pulled <= 50 + 2 * 8
        time.sleep(0.1)
        assert threading.active_count() == threads + 1  # the server's thread; the teacher's is gone
        assert t.stats.in_flight == 0


def test_break_cancels_requests_in_flight():
    with FaultServer(prompt_faults={"slow": Fault.slow(30)}) as srv:
        t = teacher(srv.base_url, max_concurrency=8)
        t0 = time.monotonic()
        gen = t.stream(reqs(1) + reqs(6, "slow"))
        first = next(gen)
        gen.close()  # what `break` does
        assert first.request.id == "q0" and time.monotonic() - t0 < 5
        assert t.stats.in_flight == 0 and len(srv.arrivals) == 7


def test_agenerate_one(server):
    import asyncio

    t = teacher(server.base_url)
    r = asyncio.run(t.agenerate_one(reqs(1)[0]))
    assert r.ok and r.generations[0].text == expected_text("q0")


# -- vLLM backend ------------------------------------------------------------------------------
def test_vllm_teacher_without_vllm_says_what_to_do():
    import importlib.util

    from distillery.teachers.vllm import VLLMTeacher

    assert hasattr(VLLMTeacher, "generate") and hasattr(VLLMTeacher, "stream")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match=r"distillery\[vllm\]") as err:
        VLLMTeacher("some/model")
    assert "CUDA" in str(err.value) and "backend: openai" in str(err.value)


# -- against the real `distillery serve` -----------------------------------------------------------
def test_against_distillery_serve_matches_hf_teacher(tiny_model_dir, monkeypatch):
    from distillery.serve import start_server
    from distillery.teachers import HFTeacher

    convs = [[{"role": "user", "content": p}] for p in ["12 + 7 =", "3 - 9 =", "45 + 45 =", "8 - 1 ="]]
    params = SamplingParams(max_new_tokens=12)
    want = HFTeacher.from_pretrained(tiny_model_dir, device="cpu").generate(convs, params)
    monkeypatch.setenv(KEY_ENV, SECRET)
    with start_server(tiny_model_dir, model_name="tiny", device="cpu", api_key=SECRET) as handle:
        t = OpenAITeacher("tiny", [handle.base_url], api_key_env=KEY_ENV, max_concurrency=4, max_retries=1,
                          timeout_s=60)
        got = t.generate(convs, params)
    assert [[g.text for g in gs] for gs in got] == [[g.text for g in gs] for gs in want]
    assert [[g.finish_reason for g in gs] for gs in got] == [[g.finish_reason for g in gs] for gs in want]
    assert [[g.num_tokens for g in gs] for gs in got] == [[g.num_tokens for g in gs] for gs in want]
