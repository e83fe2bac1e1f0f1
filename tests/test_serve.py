"""`distillery serve`: a real server on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from distillery.config import ModelConfig
from distillery.models import load_model, load_tokenizer
from distillery.serve import start_server
from distillery.teachers import HFTeacher
from distillery.teachers.base import SamplingParams

KEY = "test-key-not-a-secret"
NAME = "tiny"
DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo_teacher"  # a real trained tiny model
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """Batching on, auth on: the server most tests talk to."""
    with start_server(
        tiny_model_dir, model_name=NAME, max_batch_size=8, batch_wait_ms=20, api_key=KEY, device="cpu"
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def unbatched(tiny_model_dir):
    """The no-batching baseline (max_batch_size=1), no auth."""
    with start_server(tiny_model_dir, model_name=NAME, max_batch_size=1, device="cpu") as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The model and tokenizer loaded plainly, for forward-pass cross-checks."""
    model = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu")).eval()
    return model, load_tokenizer(str(tiny_model_dir))


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of a plain forward pass: row i is the distribution after ids[: i + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return logits.double().log_softmax(-1)


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def test_models_list(client, server):
    assert [m.id for m in client.models.list()] == [NAME]
    assert server.url.startswith("http://127.0.0.1:") and server.base_url == server.url + "/v1"


def test_chat_greedy_matches_hf_teacher(client, tiny_model_dir):
    r = client.chat.completions.create(model=NAME, messages=CONVO, temperature=0, max_tokens=12)
    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    (gen,) = teacher.generate([CONVO], SamplingParams(max_new_tokens=12, temperature=0))[0]
    _same_generation(r, gen, teacher.tokenizer, CONVO)


def test_chat_greedy_matches_hf_teacher_on_a_trained_model():
    """The random tiny model's greedy text is degenerate; the repo's trained demo teacher's is not."""
    convos = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(12, 7), (48, 35), (9, 90)]]
    teacher = HFTeacher.from_pretrained(DEMO, device="cpu")
    gens = teacher.generate(convos, SamplingParams(max_new_tokens=48, temperature=0))
    with start_server(DEMO, device="cpu", max_batch_size=4) as handle:
        client = OpenAI(base_url=handle.base_url, api_key="unused", max_retries=0)
        with ThreadPoolExecutor(3) as pool:
            rs = list(pool.map(lambda c: client.chat.completions.create(
                model="demo_teacher", messages=c, temperature=0, max_tokens=48), convos))
    for r, (gen,), convo in zip(rs, gens, convos):
        assert any(ch.isdigit() for ch in gen.text)
        _same_generation(r, gen, teacher.tokenizer, convo)


def _same_generation(r, gen, tok, convo):
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == gen.text
    assert choice.finish_reason == gen.finish_reason
    assert r.usage.completion_tokens == gen.num_tokens
    prompt = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_length_and_max_completion_tokens(client):
    r = client.chat.completions.create(model=NAME, messages=CONVO, temperature=0, max_tokens=7)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    r2 = client.chat.completions.create(model=NAME, messages=CONVO, temperature=0, max_completion_tokens=5)
    assert r2.usage.completion_tokens == 5
    assert r.choices[0].message.content.startswith(r2.choices[0].message.content)


def test_n_samples_with_temperature_and_seed(client):
    kw = dict(model=NAME, messages=CONVO, temperature=1.0, top_p=0.9, n=3, seed=7, max_tokens=10)
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # a random model at temperature 1: the samples differ
    assert [c.message.content for c in client.chat.completions.create(**kw).choices] == texts  # seeded
    assert 3 <= r.usage.completion_tokens <= 30


def test_stop_strings(client):
    # seeded sampling: varied text (greedy text of a random model repeats one token), reproducible
    kw = dict(model=NAME, prompt="12 + 7 =", temperature=1.0, seed=3, max_tokens=24)
    text = client.completions.create(**kw).choices[0].text
    assert len(set(text[4:])) > 2, text
    stop = text[6:8]
    cut = text[: text.find(stop)]
    assert cut
    for s in (stop, [stop, "\x00never"]):
        r = client.completions.create(**kw, stop=s)
        assert r.choices[0].text == cut
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < 24


def test_completion_logprobs_match_forward_pass(client, reference):
    model, tok = reference
    k = 4
    # sampled (seeded), so the tokens vary; log-probs are the model's, before temperature
    kw = dict(model=NAME, prompt="3 + 4 =", temperature=1.0, seed=11, max_tokens=6, logprobs=k)
    r = client.completions.create(**kw, extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    gen_ids = ids_of(lp.tokens)
    assert len(gen_ids) == r.usage.completion_tokens == 6
    prompt_ids = tok("3 + 4 =")["input_ids"]
    ref = forward_logprobs(model, prompt_ids + gen_ids)[len(prompt_ids) - 1 : -1]
    for i, (tid, got, top) in enumerate(zip(gen_ids, lp.token_logprobs, lp.top_logprobs)):
        assert got <= 0 and abs(got - ref[i, tid].item()) < 1e-4
        assert len(top) == k
        want_vals, want_ids = ref[i].topk(k)
        assert ids_of(list(top)) == want_ids.tolist()
        assert all(abs(v - w) < 1e-4 for v, w in zip(top.values(), want_vals.tolist()))
    assert len(set(gen_ids)) > 1
    # the same request with text tokens: they make up the text, and the offsets add up
    r2 = client.completions.create(**kw)
    lp2 = r2.choices[0].logprobs
    shown = [t for t in lp2.tokens if t not in tok.all_special_tokens]
    assert "".join(shown) == r2.choices[0].text == r.choices[0].text
    assert lp2.text_offset == [sum(len(t) for t in lp2.tokens[:i]) for i in range(len(lp2.tokens))]
    # as text, distinct tokens can share a string (a lone byte of a UTF-8 character shows as
    # U+FFFD), which merges their dict keys: exactly k entries is what token ids guarantee
    assert all(1 <= len(t) <= k for t in lp2.top_logprobs)


def test_echo_prompt_logprobs_match_forward_pass(client, reference):
    model, tok = reference
    prompts = ["12 + 7 = 19", "3 - 8 ="]
    r = client.completions.create(
        model=NAME, prompt=prompts, max_tokens=0, echo=True, logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    assert r.usage.completion_tokens == 0
    for choice, prompt in zip(r.choices, prompts):
        assert choice.text == prompt and choice.finish_reason == "length"
        lp = choice.logprobs
        ids = tok(prompt)["input_ids"]
        assert ids_of(lp.tokens) == ids
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = forward_logprobs(model, ids)
        for j in range(1, len(ids)):
            assert abs(lp.token_logprobs[j] - ref[j - 1, ids[j]].item()) < 1e-4
            assert ids_of(list(lp.top_logprobs[j])) == ref[j - 1].topk(2).indices.tolist()
    assert r.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in prompts)


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=NAME, messages=CONVO, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert all(c.token == "<|assistant|>" for c in content)  # greedy on a random model: one token
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token and abs(c.top_logprobs[0].logprob - c.logprob) < 1e-6
        assert c.bytes == list(c.token.encode())


def test_streaming_equals_non_streaming(client):
    kw = dict(model=NAME, messages=CONVO, temperature=0, max_tokens=10)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    full = client.completions.create(model=NAME, prompt="12 + 7 =", temperature=0, max_tokens=8)
    stream = client.completions.create(model=NAME, prompt="12 + 7 =", temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text


def _one(c: OpenAI, i: int) -> tuple:
    if i % 4 == 3:  # some seeded sampling in the mix: same tokens whatever the batch
        r = c.completions.create(model=NAME, prompt=f"{i} + {i} =", temperature=0.9, seed=i, max_tokens=6)
        return r.choices[0].text, r.usage.completion_tokens
    messages = [{"role": "user", "content": f"What is {i} + {2 * i}?" + " and" * i}]
    r = c.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=4 + i % 5, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    return r.choices[0].message.content, r.usage.completion_tokens, [(t.token, t.logprob) for t in content]


def test_batching_gives_the_unbatched_results(server, client, unbatched):
    alone_client = OpenAI(base_url=unbatched.base_url, api_key="unused", max_retries=0)
    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(lambda i: _one(client, i), range(16)))
        alone = list(pool.map(lambda i: _one(alone_client, i), range(16)))
    for got, want in zip(batched, alone):  # left padding: the same tokens, logprobs within 1e-4
        assert got[:2] == want[:2]
        if len(got) == 3:
            assert [t for t, _ in got[2]] == [t for t, _ in want[2]]
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got[2], want[2]))
    assert max(server.app.state.stats.batch_sizes) > 1  # batches really formed
    assert max(unbatched.app.state.stats.batch_sizes) == 1


def test_auth(server, caplog):
    caplog.set_level(logging.INFO, logger="distillery.serve")
    body = {"model": NAME, "messages": CONVO, "max_tokens": 2}
    url = server.base_url + "/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "POST /v1/chat/completions 200" in logged and "POST /v1/chat/completions 401" in logged
    assert KEY not in logged and "wrong" not in logged and "Bearer" not in logged


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat/completions", {"model": NAME}, "messages"),
        ("chat/completions", {"model": NAME, "messages": CONVO, "n": 0}, "n"),
        ("chat/completions", {"model": NAME, "messages": CONVO, "temperature": -1}, "temperature"),
        ("chat/completions", {"model": NAME, "messages": CONVO, "max_tokens": -3}, "max_tokens"),
        ("chat/completions", {"model": NAME, "messages": CONVO, "top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"messages": CONVO}, "model"),
        ("completions", {"model": NAME, "prompt": "1", "logprobs": 99}, "logprobs"),
        ("completions", {"model": NAME}, "prompt"),
        ("completions", {"model": NAME, "prompt": "1", "max_tokens": 10**6}, "prompt"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, path, body, param):
    r = httpx.post(f"{server.base_url}/{path}", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert err["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_extra_fields_are_ignored(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=CONVO, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    r = client.chat.completions.create(
        model=NAME, messages=CONVO, max_tokens=2, temperature=0,
        extra_body={"frequency_penalty": 0, "user": "x", "some_future_field": {"a": 1}},
    )
    assert r.usage.completion_tokens == 2
