"""The local HF teacher (batched generation) and labeling (records, provenance, resume)."""

from __future__ import annotations

import json

from conftest import label_plainly
from distillery.records import validate_sft_records
from distillery.tasks import load_problems
from distillery.teachers import HFTeacher, SamplingParams


def _convs(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


def test_batched_greedy_equals_one_at_a_time(tiny_model_dir):
    # left padding must not change what a row generates
    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    prompts = ["1+2", "12+34-5", "7", "99-98+97-96"]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    batched = [g[0].text for g in teacher.generate(_convs(prompts), params, batch_size=4)]
    single = [teacher.generate(_convs([p]), params, batch_size=1)[0][0].text for p in prompts]
    assert batched == single
    assert teacher.stats.tokens > 0 and teacher.stats.tokens_per_s > 0


def test_sampling_returns_n_per_prompt_and_is_seeded(tiny_model_dir):
    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=5)
    a = teacher.generate(_convs(["1+2", "3+4"]), params)
    b = teacher.generate(_convs(["1+2", "3+4"]), params)
    assert [len(x) for x in a] == [3, 3]
    assert [[g.text for g in x] for x in a] == [[g.text for g in x] for x in b]
    assert all(g.finish_reason in ("stop", "length") for x in a for g in x)
    assert all(g.num_tokens <= 8 for x in a for g in x)


def test_several_greedy_samples_are_refused_up_front():
    import pytest

    with pytest.raises(ValueError, match="temperature > 0"):
        SamplingParams(n=2, temperature=0.0)


def test_fixed_length_probe_decodes_past_the_end_token(tiny_model_dir):
    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    gens = teacher.generate(_convs(["1+2", "3"]), SamplingParams(max_new_tokens=7, min_new_tokens=7))
    assert [g[0].num_tokens for g in gens] == [7, 7]


def test_labeling_writes_contract_records_and_resumes(tmp_path, tiny_model_dir, task_cfg):
    problems = load_problems(task_cfg, "train", 12, seed=0)
    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    teacher.batch_size = 4
    params = SamplingParams(max_new_tokens=6)
    out = tmp_path / "labeled.jsonl"
    # a first run that "died" after 5 records: its partial files hold them
    label_plainly(problems[:5], teacher, params, out, show_progress=False)
    for name in ("labeled.jsonl", "labeled.rejects.jsonl"):
        (tmp_path / name).rename(tmp_path / f"{name}.partial")
    before = teacher.stats.requests
    label_plainly(problems, teacher, params, out, show_progress=False)
    assert teacher.stats.requests - before == 7  # only the missing ones were generated
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["meta"]["seed_id"] for r in records] == [p.id for p in problems]
    assert len({r["id"] for r in records}) == 12
    validate_sft_records(records, str(out))
    r = records[0]
    assert r["messages"][0] == {"role": "user", "content": problems[0].prompt}
    # the record keeps the task's reference (for the verify filter); the teacher saw only the prompt
    assert r["reference"] == problems[0].reference and len(r["messages"]) == 2
    assert r["meta"]["method"] == "labeling" and r["meta"]["teacher"] == str(tiny_model_dir)
    assert r["meta"]["sampling"]["max_new_tokens"] == 6
    assert not (tmp_path / "labeled.jsonl.partial").exists()


def test_topk_logprobs_match_a_float64_forward_pass(tiny_model_dir):
    import torch

    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu")
    seqs = [[5, 9, 17, 3, 40], [7, 7], [12, 30, 31]]
    got = teacher.logprobs(seqs, k=4, batch_size=2)  # mixed lengths in one right-padded batch
    model = teacher.model.double()
    try:
        for seq, top in zip(seqs, got):
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([seq])).logits[0], dim=-1)
            assert top.ids.shape == (len(seq), 4) and top.log_tail.shape == (len(seq),)
            torch.testing.assert_close(top.logprobs.double(), ref.gather(-1, top.ids), atol=1e-5, rtol=0)
            assert torch.equal(top.ids, ref.topk(4, dim=-1).indices)
            total = torch.logaddexp(top.logprobs.double().logsumexp(-1), top.log_tail.double())
            torch.testing.assert_close(total, torch.zeros(len(seq), dtype=torch.float64), atol=1e-5, rtol=0)
    finally:
        model.float()


def test_a_prompt_longer_than_the_context_is_rejected_alone(tmp_path, tiny_model_dir):
    """One prompt past the model's context (256 positions) in a batch of three: it is a
    ``too_long`` reject, measured before batching, and the two others are generated in one batch."""
    from distillery.teachers import GenerationRequest
    from distillery.teachers.phases import Outcome, run_phase

    teacher = HFTeacher.from_pretrained(tiny_model_dir, device="cpu", batch_size=3)
    assert teacher.context_length() == 256
    params = SamplingParams(max_new_tokens=4)
    long_prompt = "12+34 " * 200
    assert teacher.prompt_length([{"role": "user", "content": long_prompt}]) > 256
    reqs = [GenerationRequest(f"r{i}", [{"role": "user", "content": p}], params)
            for i, p in enumerate(["1+2", long_prompt, "3+4"])]
    handle = lambda result: Outcome(records=[{"id": result.request.id, "text": result.generations[0].text}])  # noqa: E731
    path, summary = run_phase("labeled", reqs, teacher, handle, tmp_path, show_progress=False)
    assert sorted(r["id"] for r in json.loads(f"[{','.join(path.read_text().splitlines())}]")) == ["r0", "r2"]
    (reject,) = [json.loads(line) for line in (tmp_path / "labeled.rejects.jsonl").read_text().splitlines()]
    assert reject["meta"]["request_id"] == "r1" and reject["reason"].startswith("too_long: the prompt is ")
    assert "retryable" not in reject  # a re-run would fail the same way
    assert summary.reject_reasons == {"too_long": 1} and summary.failed == 1
    assert [b[0] for b in teacher.stats.batches] == [2]  # r0 and r2 together


def test_a_batch_that_raises_is_run_again_one_request_at_a_time(tiny_tokenizer):
    """GPT-2 has absolute positions: a prompt that fits but whose answer would run past them
    raises inside ``generate`` (IndexError). Only that request fails; its batch mates answer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from distillery.teachers import GenerationRequest

    torch.manual_seed(0)
    eos = tiny_tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=24, n_embd=16,
                                       n_layer=1, n_head=2, bos_token_id=eos, eos_token_id=eos))
    teacher = HFTeacher(model, tiny_tokenizer, batch_size=3)
    params = SamplingParams(max_new_tokens=12)
    near_full = "1+2+3+4+5+6+7+8+9+"  # fits in 24 positions, not with 12 new tokens
    n = teacher.prompt_length([{"role": "user", "content": near_full}])
    assert n < 24 < n + 12
    reqs = [GenerationRequest(f"r{i}", [{"role": "user", "content": p}], params)
            for i, p in enumerate(["1+2", near_full, "3+4"])]
    results = {r.request.id: r for r in teacher.stream(reqs)}
    assert results["r0"].ok and results["r2"].ok
    assert not results["r1"].ok and results["r1"].error_kind == "teacher_error"
