"""The ``reward`` objective (GRPO-style policy gradient): estimator, reward sources, learning.

Every numeric check compares against a float64 computation written the plain way: one
sequence at a time, no padding, no masks.
"""

from __future__ import annotations

import copy
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.config import ModelConfig, TeacherConfig, TrainJobConfig
from distillery.models import build_model
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.teachers import SamplingParams
from distillery.train.loop import train_loop
from distillery.train.objectives import objective_needs
from distillery.train.objectives.reward import (
    RewardConfig,
    RewardObjective,
    build_reward_fn,
    prepare_reward_training,
)
from distillery.train.reward import (
    FunctionReward,
    JudgeReward,
    RewardCollator,
    RewardDataset,
    TeacherLogprobReward,
    VerifierReward,
    group_advantages,
    judge_score_to_reward,
    k3,
    policy_gradient_loss,
    token_logprobs,
)
from distillery.train.sampling import batch_prompts, continuation_batch, sample_continuations

TASK = {"name": "arithmetic", "num_operands": 2, "digits": [1, 2], "operations": ["+", "-"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records(task_cfg):
    return ground_truth_records(load_problems(task_cfg, "train", 48, seed=0), "chain")


def tiny(tokenizer, hidden: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=hidden, num_layers=1, num_heads=2, device="cpu")
    return build_model(cfg, tokenizer).to(dtype)


def job(tmp_path, teacher: dict | None = None, **reward) -> TrainJobConfig:
    return TrainJobConfig(output_dir=str(tmp_path / "out"), data={"task": TASK, "num_examples": 48}, teacher=teacher,
                          model={"hidden_size": 16, "num_layers": 1, "num_heads": 2, "device": "cpu"},
                          train={"objective": {"name": "reward", **reward}, "max_seq_len": 64})


def prompts_of(dataset: RewardDataset, n: int) -> tuple[list[list[int]], list[int]]:
    batch = RewardCollator(0)([dataset[i] for i in range(n)])
    return batch_prompts(batch), batch["index"].tolist()


# --------------------------------------------------------------------------- advantages, k3


groups_of_rewards = st.integers(2, 5).flatmap(lambda g: st.tuples(st.just(g), st.lists(
    st.lists(st.sampled_from([0.0, 0.25, 1.0, -3.5]) | st.floats(-10, 10), min_size=g, max_size=g),
    min_size=1, max_size=4)))


@settings(max_examples=60, deadline=None)
@given(groups_of_rewards, st.booleans())
def test_group_advantages_match_a_float64_hand_computation(case, scale):
    g, groups = case
    got = group_advantages(torch.tensor([r for grp in groups for r in grp], dtype=torch.float64), g, scale)
    for k, grp in enumerate(groups):
        r = np.array(grp, dtype=np.float64)
        want = r - r.mean()
        if scale:
            want = want / (r.std(ddof=1) + 1e-4)
        if len(set(grp)) == 1:
            want = np.zeros(g)
        adv = got[k * g:(k + 1) * g].numpy()
        np.testing.assert_allclose(adv, want, rtol=1e-9, atol=1e-9)
        assert abs(adv.sum()) <= 1e-9 * max(1.0, np.abs(adv).max())  # zero mean per group
        if len(set(grp)) == 1:
            assert (adv == 0).all()  # exactly zero, not a rounding residue


def test_group_advantages_refuse_a_ragged_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


@settings(max_examples=100, deadline=None)
@given(st.floats(-20, 5), st.floats(-20, 5))
def test_k3_is_nonnegative_and_zero_iff_the_logprobs_are_equal(logp, ref):
    value = float(k3(torch.tensor(logp, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)))
    x = ref - logp
    assert value >= 0
    assert value == pytest.approx(math.exp(x) - x - 1, rel=1e-9, abs=1e-12)
    assert (value == 0) == (logp == ref) or abs(x) < 1e-7  # below that, e^x − x − 1 underflows


# --------------------------------------------------------------------------- the estimator


def hand_loss(model, ref_model, prompts, conts, adv, temperature, kl_weight):
    """−Σ_i A_i Σ_t log π(o_it) / N + β Σ k3 / N, one unpadded float64 sequence at a time."""
    total, kl, n = 0.0, 0.0, 0
    for p, c, a in zip(prompts, conts, adv):
        ids = torch.tensor([p + c])
        targets = torch.tensor(c)
        steps = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        logp = (model(ids).logits[0].double() / temperature).log_softmax(-1)[steps, targets]
        with torch.no_grad():
            ref = (ref_model(ids).logits[0].double() / temperature).log_softmax(-1)[steps, targets]
        total = total - a * logp.sum()
        kl = kl + (torch.exp(ref - logp) - (ref - logp) - 1).sum()
        n += len(c)
    return (total + kl_weight * kl) / n


def test_loss_gradient_equals_the_reinforce_estimator_by_hand(tiny_tokenizer, records):
    model = tiny(tiny_tokenizer, dtype=torch.float64)
    ref_model = tiny(tiny_tokenizer, seed=1, dtype=torch.float64)  # a policy that differs, so k3 > 0
    ds = RewardDataset(records[:3], tiny_tokenizer, 64)
    prompts, _ = prompts_of(ds, 3)
    eos = tiny_tokenizer.eos_token_id
    conts = [[40, 41, 42, eos], [50], [60, 61], [70, 71, 72, 73, 74], [80, eos], [90, 91, 92]]
    rows = [p for p in prompts for _ in range(2)]
    adv = torch.tensor([0.7, -0.7, 1.3, -1.3, 0.0, 0.0], dtype=torch.float64)
    temperature, beta = 0.8, 0.3

    batch = continuation_batch(rows, conts, tiny_tokenizer.pad_token_id)
    logp, mask = token_logprobs(model, batch, temperature)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(ref_model, batch, temperature)
    loss, kl = policy_gradient_loss(logp, mask, adv, ref_logp, beta)
    got = torch.autograd.grad(loss, list(model.parameters()))

    want_loss = hand_loss(model, ref_model, rows, conts, adv.tolist(), temperature, beta)
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    assert int(mask.sum()) == sum(map(len, conts))
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-10)
    assert kl.item() > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_objective_loss_is_the_estimator_on_its_own_samples(tmp_path, tiny_tokenizer, records):
    """objective.loss samples, scores, and returns the hand loss of exactly those samples."""
    def length_reward(prompt, completion, record):
        return float(len(completion))

    rc = RewardConfig(source="function", function="unused:unused", group_size=3, max_new_tokens=6)
    model = tiny(tiny_tokenizer, dtype=torch.float64)
    ds = RewardDataset(records[:4], tiny_tokenizer, 64)
    objective = RewardObjective(rc, tiny_tokenizer, ds, FunctionReward(length_reward))
    batch = RewardCollator(tiny_tokenizer.pad_token_id)([ds[i] for i in range(4)])
    torch.manual_seed(7)
    out = objective.loss(batch, model, None)
    loss, metrics = out.loss, out.metrics

    torch.manual_seed(7)
    prompts = batch_prompts(batch)
    conts = sample_continuations(model, prompts, max_new_tokens=6, eos_token_id=tiny_tokenizer.eos_token_id,
                                 pad_token_id=tiny_tokenizer.pad_token_id, num_return_sequences=3)
    rewards = [float(len(tiny_tokenizer.decode(c, skip_special_tokens=True))) for c in conts]
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), 3)
    rows = [p for p in prompts for _ in range(3)]
    want = hand_loss(model, model, rows, conts, adv.tolist(), 1.0, 0.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert metrics["reward/mean"] == pytest.approx(np.mean(rewards))
    assert metrics["reward/std"] == pytest.approx(np.std(rewards))
    assert out.count == sum(map(len, conts))
    assert metrics["gen_tokens"] == pytest.approx(np.mean([len(c) for c in conts]))
    flat = [len(set(rewards[k:k + 3])) == 1 for k in range(0, 12, 3)]
    assert metrics["reward/zero_std_groups"] == pytest.approx(np.mean(flat))


def test_groups_with_equal_rewards_give_zero_gradient(tiny_tokenizer, records):
    rc = RewardConfig(source="function", function="unused:unused", group_size=2, max_new_tokens=4)
    model = tiny(tiny_tokenizer)
    ds = RewardDataset(records[:3], tiny_tokenizer, 64)
    objective = RewardObjective(rc, tiny_tokenizer, ds, FunctionReward(lambda p, c, r: 0.5))
    out = objective.loss(RewardCollator(0)([ds[i] for i in range(3)]), model, None)
    loss, metrics = out.loss, out.metrics
    loss.backward()
    assert metrics["reward/zero_std_groups"] == 1.0 and metrics["reward/std"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# --------------------------------------------------------------------------- learning


REWARD_MODULE = '''
def digit_share(prompt, completion, record):
    """Share of the completion's characters that are digits: dense, and easy to raise."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> str:
    """A user's reward module, a real file imported by name: ``my_rewards``."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARD_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards:digit_share"


def mean_reward(model, tokenizer, prompts, fn, seed: int = 123) -> float:
    torch.manual_seed(seed)
    conts = sample_continuations(model, prompts, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, num_return_sequences=4)
    return float(np.mean([fn("", tokenizer.decode(c, skip_special_tokens=True), {}) for c in conts]))


def test_training_raises_a_function_reward(tmp_path, reward_module, tiny_tokenizer, records, task_cfg):
    cfg = job(tmp_path, source="function", function=reward_module, group_size=4, max_new_tokens=8)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "steps": 30, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0, "log_every": 10})})
    student = tiny(tiny_tokenizer, hidden=32)
    dataset, collator, objective = prepare_reward_training(cfg, records, tiny_tokenizer, student, None)
    assert objective_needs(cfg.train.objective).live_teacher == "no"
    fresh = RewardDataset(ground_truth_records(load_problems(task_cfg, "eval", 16, seed=1), "chain"),
                          tiny_tokenizer, 64)
    prompts, _ = prompts_of(fresh, 16)
    fn = objective.reward.fn
    before = mean_reward(student, tiny_tokenizer, prompts, fn)
    result = train_loop(student, objective, dataset, collator, cfg.train, show_progress=False)
    after = mean_reward(student, tiny_tokenizer, prompts, fn)
    print(f"digit_share on 16 fresh prompts x 4 samples: before {before:.3f} after {after:.3f}; "
          f"log: {[(h['step'], round(h['reward/mean'], 3)) for h in result.history]}")
    assert after > before + 0.15
    assert all(k in result.history[-1] for k in ("reward/mean", "reward/std", "reward/zero_std_groups", "gen_tokens"))


# --------------------------------------------------------------------------- reward sources


def test_verifier_reward_on_crafted_completions():
    rec = {"id": "r", "reference": "19"}
    completions = ["12+7=19;#19", "12+7=20;#20", "no answer here", "Final answer: 19.0",
                   "The answer is 19", "\\boxed{38/2}", "12+7=19"]
    verifier = VerifierReward()
    assert verifier.score([""] * 7, completions, [rec] * 7) == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert verifier.metrics["reward/no_answer"] == pytest.approx(2 / 7)


def test_verifier_needs_a_reference_on_every_record(tmp_path, tiny_tokenizer, records):
    bad = [*records[:2], {**records[2], "id": "no-ref", "reference": None}]
    with pytest.raises(ValueError, match=r"record 'no-ref' has no 'reference'.*source"):
        prepare_reward_training(job(tmp_path, source="verifier"), bad, tiny_tokenizer, tiny(tiny_tokenizer))
    anonymous = [{"messages": records[0]["messages"]}]
    with pytest.raises(ValueError, match=r"record #0 has no 'reference'"):
        VerifierReward().score([""], ["#1"], anonymous)
    # the other sources do not need one
    prepare_reward_training(job(tmp_path, source="function", function="math:fabs"), bad, tiny_tokenizer,
                            tiny(tiny_tokenizer))


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "module:callable"),
    ("distillery_no_such_module:f", "cannot import module 'distillery_no_such_module'"),
    ("math:no_such_function", "has no attribute 'no_such_function'"),
    ("math:pi", "is not callable"),
])
def test_function_reward_names_what_is_missing(spec, message):
    with pytest.raises(ValueError, match=message):
        build_reward_fn(RewardConfig(source="function", function=spec))


def test_function_reward_refuses_a_non_number():
    with pytest.raises(TypeError, match="returned 'good', not a number"):
        FunctionReward(lambda p, c, r: "good").score(["p"], ["c"], [{}])


def test_judge_reply_parsing_on_crafted_strings():
    assert judge_score_to_reward("Score: 7\nRationale: fine.") == pytest.approx(6 / 9)
    assert judge_score_to_reward("**Score:** 10/10") == 1.0
    assert judge_score_to_reward("Rationale: wrong sum.\nScore: 1") == 0.0
    assert judge_score_to_reward('{"score": 4, "rationale": "partly"}') == pytest.approx(3 / 9)
    assert judge_score_to_reward("I'd give it 5 out of 10.") == pytest.approx(4 / 9)
    for unparsed in ["Score: 11", "Score: 0", "Score: 4/5", "looks good to me", ""]:
        assert judge_score_to_reward(unparsed) is None, unparsed


def test_judge_over_a_real_distillery_serve(tiny_model_dir, tiny_tokenizer, records):
    """A random tiny model as the judge: mostly unparseable replies; the accounting must hold."""
    from distillery.serve import start_server

    with start_server(tiny_model_dir, model_name="tiny", device="cpu", max_batch_size=8) as server:
        judge = TeacherConfig(backend="openai", model="tiny", base_urls=[server.base_url], max_concurrency=8)
        # the tiny model reads 256 positions: a short rubric of our own (the shipped one is checked below)
        rc = RewardConfig(source="judge", judge=judge, group_size=2, max_new_tokens=4,
                          judge_template="Rate 1-{{ max_score }}: {{ prompt }} = {{ answer }}\nScore:")
        reward = build_reward_fn(rc)
        assert isinstance(reward, JudgeReward)
        reward.params = SamplingParams(max_new_tokens=24)  # keep the test short
        ds = RewardDataset(records[:3], tiny_tokenizer, 64)
        objective = RewardObjective(rc, tiny_tokenizer, ds, reward)
        out = objective.loss(RewardCollator(0)([ds[i] for i in range(3)]), tiny(tiny_tokenizer), None)
        loss, metrics = out.loss, out.metrics
        served = server.stats.requests
        direct = reward.score(["12+7"], ["12+7=19;#19"], [{"reference": "19"}])
    replies = reward.last_replies
    assert served == 6 and len(replies) == 1 and np.isfinite(loss.item())
    parsed = judge_score_to_reward(replies[0])
    assert direct == [0.0 if parsed is None else parsed]
    assert reward.metrics["reward/judge_unparsed"] == float(parsed is None)
    assert 0.0 <= metrics["reward/judge_unparsed"] <= 1.0 and 0.0 <= metrics["reward/mean"] <= 1.0
    if metrics["reward/judge_unparsed"] == 1.0:
        assert metrics["reward/mean"] == 0.0
    assert reward.requests(["1+1"], ["2"], [{}])[0][0]["content"] == "Rate 1-10: 1+1 = 2\nScore:"
    # the shipped rubric holds the problem, the completion and the reference
    (conv,) = build_reward_fn(rc.model_copy(update={"judge_template": None})).requests(
        ["12+7"], ["12+7=19;#19"], [{"reference": "19"}])
    text = conv[0]["content"]
    assert "12+7\n" in text and "12+7=19;#19" in text and ": 19" in text and "Score: <integer from 1 to 10>" in text


def test_teacher_logprob_reward_equals_the_teachers_logprobs(tmp_path, tiny_tokenizer, records):
    teacher = tiny(tiny_tokenizer, seed=3, dtype=torch.float64).eval()
    student = tiny(tiny_tokenizer, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a teacher and none is configured"):
        job(tmp_path, source="teacher_logprob")
    cfg = job(tmp_path, teacher={"hidden_size": 16, "num_layers": 1, "num_heads": 2},
              source="teacher_logprob", group_size=2, max_new_tokens=5)
    with pytest.raises(ValueError, match="no teacher model was given"):
        prepare_reward_training(cfg, records, tiny_tokenizer, student, None)
    _, _, objective = prepare_reward_training(cfg, records[:4], tiny_tokenizer, student, teacher)
    assert objective_needs(cfg.train.objective).live_teacher == "required"
    assert isinstance(objective.reward, TeacherLogprobReward)
    batch = RewardCollator(0)([objective.dataset[i] for i in range(4)])
    cbatch, _ = objective.rollout(batch, student)
    got = objective.rewards(cbatch, [], teacher)
    rows = batch_prompts(cbatch)
    for row, (prompt, labels) in enumerate(zip(rows, cbatch["labels"].tolist())):
        cont = [t for t in labels if t != -100]
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = teacher(ids).logits[0].double().log_softmax(-1)
        want = np.mean([logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(cont)])
        assert got[row] == pytest.approx(want, rel=1e-10)
    out = objective.loss(batch, student, teacher)
    loss, metrics = out.loss, out.metrics
    assert metrics["reward/mean"] < 0 and np.isfinite(loss.item())


# --------------------------------------------------------------------------- the KL anchor


def test_kl_is_zero_against_the_starting_student_then_grows(tmp_path, reward_module, tiny_tokenizer, records):
    cfg = job(tmp_path, source="function", function=reward_module, group_size=2, max_new_tokens=6, kl_weight=0.1)
    student = tiny(tiny_tokenizer)
    dataset, collator, objective = prepare_reward_training(cfg, records, tiny_tokenizer, student)
    assert isinstance(objective.reference, torch.nn.Module)
    assert not any(p.requires_grad for p in objective.reference.parameters())
    batch = collator([dataset[i] for i in range(4)])
    metrics = objective.loss(batch, student, None).metrics
    assert metrics["kl"] == 0.0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    metrics = objective.loss(batch, student, None).metrics
    assert metrics["kl"] > 0


def test_kl_reference_of_a_lora_student_is_its_base_with_adapters_off(tmp_path, reward_module, tiny_tokenizer,
                                                                      records, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from peft.import_utils import is_torchao_available

    try:
        is_torchao_available()
    except ImportError:  # torchtune pins torchao 0.10, which peft refuses; plain LoRA needs none of it
        monkeypatch.setitem(sys.modules, "torchao", None)

    cfg = job(tmp_path, source="function", function=reward_module, group_size=2, max_new_tokens=6, kl_weight=0.1)
    base = tiny(tiny_tokenizer)
    frozen = copy.deepcopy(base)
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    dataset, collator, objective = prepare_reward_training(cfg, records, tiny_tokenizer, student)
    assert objective.reference == "adapters_off"
    batch = collator([dataset[i] for i in range(4)])
    metrics = objective.loss(batch, student, None).metrics
    assert metrics["kl"] == 0.0  # LoRA's B starts at zero: the student is its base
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    cbatch, _ = objective.rollout(batch, student)
    got = objective.reference_logprobs(cbatch, student)
    want, _ = token_logprobs(frozen, cbatch)
    torch.testing.assert_close(got, want)


def test_kl_reference_from_reference_path(tmp_path, reward_module, tiny_model_dir, tiny_tokenizer, records):
    from distillery.models import load_model

    cfg = job(tmp_path, source="function", function=reward_module, group_size=2, max_new_tokens=6, kl_weight=0.1,
              reference_path=str(tiny_model_dir))
    _, collator, objective = prepare_reward_training(cfg, records, tiny_tokenizer, tiny(tiny_tokenizer, hidden=32))
    batch = collator([objective.dataset[i] for i in range(2)])
    cbatch, _ = objective.rollout(batch, tiny(tiny_tokenizer, hidden=32))
    want, _ = token_logprobs(load_model(ModelConfig(path=str(tiny_model_dir), device="cpu")), cbatch)
    torch.testing.assert_close(objective.reference_logprobs(cbatch, None), want)



def test_prepare_refuses_packing(tmp_path, reward_module, tiny_tokenizer, records):
    cfg = job(tmp_path, source="function", function=reward_module)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"packing": True})})
    with pytest.raises(ValueError, match="packing: false"):
        prepare_reward_training(cfg, records, tiny_tokenizer, tiny(tiny_tokenizer))


def test_completions_are_cut_at_max_seq_len_before_scoring(tiny_tokenizer, records):
    """What is scored is what is trained: no row runs past max_seq_len, the reward sees the cut text."""
    seen: list[str] = []

    def record_text(prompt, completion, record):
        seen.append(completion)
        return float(len(completion))

    rc = RewardConfig(source="function", function="unused:unused", group_size=2, max_new_tokens=30)
    ds = RewardDataset(records[:3], tiny_tokenizer, 64)
    objective = RewardObjective(rc, tiny_tokenizer, ds, FunctionReward(record_text), max_seq_len=12)
    batch = RewardCollator(0)([ds[i] for i in range(3)])
    cbatch, _ = objective.rollout(batch, tiny(tiny_tokenizer))
    objective.rewards(cbatch, [0, 0, 1, 1, 2, 2], None)
    lengths = cbatch["attention_mask"].sum(1).tolist()
    assert max(lengths) == 12 and cbatch["input_ids"].shape[1] == 12
    for labels, text in zip(cbatch["labels"].tolist(), seen):
        assert text == tiny_tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True)
