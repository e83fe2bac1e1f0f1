"""on_policy (GKD / MiniLLM-style / seq_kd): the teacher scores exactly the text the coin chose.

Teacher: the shipped demo teacher (assets/demo_teacher, 4×128, trained on 3-operand
arithmetic); students: 1×32 Llamas, random init, with the teacher's tokenizer.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.chat import IGNORE
from distillery.config import ModelConfig, TaskConfig, TrainConfig
from distillery.losses import distillation_loss
from distillery.models import build_model, load_model, load_tokenizer
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.train import Collator, SFTDataset, train_loop
from distillery.train.objectives.on_policy import OnPolicyConfig, OnPolicyObjective
from distillery.train.sampling import batch_prompts, continuation_batch, sample_continuations

TEACHER = "assets/demo_teacher"
MAX_LEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TEACHER)


@pytest.fixture(scope="module")
def teacher():
    return load_model(TEACHER, device="cpu").eval().requires_grad_(False)


def _student(tok, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu"), tok)


def _records(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    problems = load_problems(TaskConfig(num_operands=3, digits=(1, 2)), split, n, seed=seed)
    return ground_truth_records(problems, "chain")


def _batch(tok, records: list[dict]) -> dict[str, torch.Tensor]:
    ds = SFTDataset(records, tok, MAX_LEN)
    return Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])


def _objective(tok, seed: int = 0, loss: dict | None = None, max_seq_len: int = MAX_LEN,
               **on_policy) -> OnPolicyObjective:
    cfg = OnPolicyConfig(loss=loss, **on_policy)
    return OnPolicyObjective(cfg, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             max_seq_len=max_seq_len, seed=seed)


def _from_train(cfg: TrainConfig, tok) -> OnPolicyObjective:
    """The objective of a train config's ``objective`` block, with the loop's seed and length."""
    return OnPolicyObjective(cfg.objective, tok.eos_token_id, tok.pad_token_id,
                             max_seq_len=cfg.max_seq_len, seed=cfg.seed)


class Scored:
    """Records the rows the teacher's body reads (a forward pre-hook): the tokens it scores."""

    def __init__(self, teacher) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = teacher.base_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs["input_ids"]
        self.calls.append((ids.clone(), kwargs["attention_mask"].clone()))

    def rows(self) -> list[list[int]]:
        """The last call's rows without padding (the scoring forward comes after any generation)."""
        ids, attn = self.calls[-1]
        return [row[: int(n)].tolist() for row, n in zip(ids, attn.sum(1))]

    def __enter__(self) -> Scored:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _record_rows(batch) -> list[list[int]]:
    return [row[: int(n)].tolist() for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(1))]


def _generate_alone(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy continuation of one prompt, unbatched and unpadded, cut after the first EOS."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


# --------------------------------------------------------------------------- 1. student samples


def test_greedy_on_policy_step_scores_the_students_own_generation(tok, teacher):
    student, batch = _student(tok), _batch(tok, _records(4))
    obj = _objective(tok, lmbda=1.0, temperature=0.0, max_new_tokens=12)
    with Scored(teacher) as scored:
        out = obj.loss(batch, student, teacher)
    metrics = out.metrics
    prompts = batch_prompts(batch)
    expected = [p + _generate_alone(student, p, 12, tok.eos_token_id) for p in prompts]
    assert scored.rows() == expected
    assert scored.rows() != _record_rows(batch)
    assert metrics["on_policy"] == 1.0
    # only the continuation counts: every generated token, no prompt token
    assert out.count == sum(len(e) - len(p) for e, p in zip(expected, prompts))
    assert metrics["gen_tokens"] == out.count / len(prompts)


def test_sampled_on_policy_step_scores_a_student_sample(tok, teacher):
    student, batch = _student(tok), _batch(tok, _records(4))
    obj = _objective(tok, lmbda=1.0, temperature=1.0, max_new_tokens=12)
    torch.manual_seed(123)
    with Scored(teacher) as scored:
        obj.loss(batch, student, teacher)
    prompts = batch_prompts(batch)
    continuations = [row[len(p):] for row, p in zip(scored.rows(), prompts)]
    records = [row[len(p):] for row, p in zip(_record_rows(batch), prompts)]
    assert all(c != r for c, r in zip(continuations, records))

    def resample(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        return sample_continuations(student, prompts, max_new_tokens=12, temperature=1.0,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    assert continuations == resample(123)
    assert continuations != resample(124)  # it is sampling, not a fixed decode


def test_continuations_are_cut_at_max_seq_len(tok, teacher):
    student, batch = _student(tok), _batch(tok, _records(4))
    longest_prompt = max(map(len, batch_prompts(batch)))
    obj = _objective(tok, lmbda=1.0, temperature=0.0, max_new_tokens=32, max_seq_len=longest_prompt + 3)
    with Scored(teacher) as scored:
        obj.loss(batch, student, teacher)
    assert max(map(len, scored.rows())) == longest_prompt + 3


# --------------------------------------------------------------------------- 2. the coin


def test_lambda_zero_scores_the_records_and_lambda_one_always_samples(tok, teacher):
    student, batch = _student(tok), _batch(tok, _records(4))
    off = _objective(tok, lmbda=0.0, max_new_tokens=8)
    on = _objective(tok, lmbda=1.0, max_new_tokens=8)
    for _ in range(3):
        with Scored(teacher) as scored:
            metrics = off.loss(batch, student, teacher).metrics
        assert scored.rows() == _record_rows(batch)
        assert len(scored.calls) == 1  # scored, nothing generated
        assert (metrics["on_policy"], metrics["gen_tokens"]) == (0.0, 0.0)
        with Scored(teacher) as scored:
            metrics = on.loss(batch, student, teacher).metrics
        assert scored.rows() != _record_rows(batch)
        assert metrics["on_policy"] == 1.0 and metrics["gen_tokens"] > 0


def _binomial_interval(n: int, p: float, confidence: float) -> tuple[int, int]:
    """The central ``confidence`` interval of Binomial(n, p): the (1 ± c)/2 quantiles of its CDF."""
    cdf, acc = [], 0.0
    for k in range(n + 1):
        acc += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        cdf.append(acc)
    tail = (1 - confidence) / 2
    return next(k for k, c in enumerate(cdf) if c >= tail), next(k for k, c in enumerate(cdf) if c >= 1 - tail)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coin_share_is_binomial_and_the_same_per_seed(tok, seed):
    a, b, other = _objective(tok, seed, lmbda=0.3), _objective(tok, seed, lmbda=0.3), _objective(tok, seed + 10, lmbda=0.3)
    flips = [a.draw_on_policy() for _ in range(200)]
    lo, hi = _binomial_interval(200, 0.3, 0.99)
    assert lo <= sum(flips) <= hi
    assert [b.draw_on_policy() for _ in range(200)] == flips
    assert [other.draw_on_policy() for _ in range(200)] != flips


def test_loss_follows_the_coin_sequence(tok, teacher):
    student, batch = _student(tok), _batch(tok, _records(2))
    obj, twin = _objective(tok, seed=5, lmbda=0.5, max_new_tokens=4), _objective(tok, seed=5, lmbda=0.5)
    seen = [obj.loss(batch, student, teacher).metrics["on_policy"] for _ in range(8)]
    expected = [float(twin.draw_on_policy()) for _ in range(8)]
    assert seen == expected and 0 < sum(seen) < 8


def test_state_dict_resumes_the_coin_sequence(tok):
    run = _objective(tok, seed=3, lmbda=0.3)
    [run.draw_on_policy() for _ in range(50)]
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
    rest = [run.draw_on_policy() for _ in range(100)]
    resumed = _objective(tok, seed=3, lmbda=0.3)
    resumed.load_state_dict(state)
    assert [resumed.draw_on_policy() for _ in range(100)] == rest
    fresh = _objective(tok, seed=3, lmbda=0.3)
    assert [fresh.draw_on_policy() for _ in range(100)] != rest


def test_a_resumed_train_loop_continues_the_coins_and_the_run(tok, teacher, tmp_path):
    # with seed 4, coins 5-8 differ from coins 1-4: a run that restarted its coin would show it
    cfg = TrainConfig(objective={"name": "on_policy", "lmbda": 0.5, "max_new_tokens": 8}, steps=8,
                      batch_size=4, lr=1e-2, warmup_steps=1, max_seq_len=MAX_LEN, log_every=1, seed=4,
                      checkpoint={"every": 4, "keep_last": 2})
    coins = _from_train(cfg, tok)
    flips = [float(coins.draw_on_policy()) for _ in range(8)]
    assert flips[4:] != flips[:4]
    ds = SFTDataset(_records(32), tok, MAX_LEN)

    def run(directory, resume: bool):
        student = _student(tok)
        obj = _from_train(cfg, tok)
        result = train_loop(student, obj, ds, Collator(tok.pad_token_id), cfg, teacher, None, False,
                            checkpoint_dir=directory, resume=resume)
        return student, [(h["step"], h["on_policy"], h["loss"]) for h in result.history]

    whole, history = run(tmp_path / "whole", False)
    (halfway,) = [p for p in (tmp_path / "whole").iterdir() if p.name.endswith("4")]
    shutil.copytree(halfway, tmp_path / "resumed" / halfway.name)
    # with its marker: a checkpoint directory is replaced and written into only when distillery made it
    shutil.copy(tmp_path / "whole" / ".distillery", tmp_path / "resumed" / ".distillery")
    resumed, rest = run(tmp_path / "resumed", True)
    assert rest == history[4:]
    assert [on for _, on, _ in history] == flips
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))


# --------------------------------------------------------------------------- 3. seq_kd


def test_seq_kd_scores_the_teachers_greedy_generation(tok, teacher):
    # wrong answers in the records, so the teacher's own text cannot coincide with them
    records = _records(4)
    for r in records:
        r["messages"][-1]["content"] = "0;#0"
    student, batch = _student(tok), _batch(tok, records)
    obj = _objective(tok, lmbda=0.0, seq_kd=True, temperature=0.0, max_new_tokens=40,
                     loss={"divergence": "jsd", "beta": 0.5, "kd_ratio": 0.5})
    with Scored(teacher) as scored:
        out = obj.loss(batch, student, teacher)
    metrics = out.metrics
    prompts = batch_prompts(batch)
    expected = [p + _generate_alone(teacher, p, 40, tok.eos_token_id) for p in prompts]
    assert scored.rows() == expected
    assert all(e != r for e, r in zip(expected, _record_rows(batch)))
    assert all(row[-1] == tok.eos_token_id for row in expected)  # the teacher finished its answers
    assert metrics["on_policy"] == 0.0 and metrics["gen_tokens"] > 0
    assert "ce" in metrics  # off-policy: the spec applies as is, CE on the teacher's text included


# --------------------------------------------------------------------------- 5. numerics


def _by_hand(student, teacher, rows: list[list[int]], prompt_lens: list[int], T: float,
             r: float, with_ce: bool) -> float:
    """r·JSD_0.5(teacher, student at T) (+ (1−r)·CE) averaged over continuation tokens, float64."""
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    total, n = 0.0, 0
    with torch.no_grad():
        for row, plen in zip(rows, prompt_lens):
            ids = torch.tensor([row])
            zs, zt = s64(input_ids=ids).logits[0], t64(input_ids=ids).logits[0]
            for t in range(plen - 1, len(row) - 1):  # position t predicts row[t + 1]
                q, p = F.softmax(zs[t] / T, -1), F.softmax(zt[t] / T, -1)
                m = 0.5 * p + 0.5 * q
                jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
                ce = -F.log_softmax(zs[t], -1)[row[t + 1]]
                total += float(r * jsd + ((1 - r) * ce if with_ce else 0.0))
                n += 1
    return total / n


@pytest.mark.parametrize("form", ["dense", "fused"])
@pytest.mark.parametrize("lmbda", [1.0, 0.0])
def test_loss_matches_a_float64_reference(tok, teacher, form, lmbda):
    student, batch = _student(tok, seed=1), _batch(tok, _records(3))
    obj = _objective(tok, lmbda=lmbda, temperature=1.0, max_new_tokens=10,
                     loss={"divergence": "jsd", "beta": 0.5, "kd_ratio": 0.6, "temperature": 2.0, "form": form})
    torch.manual_seed(7)
    with Scored(teacher) as scored:
        out = obj.loss(batch, student, teacher)
    loss, metrics = out.loss, out.metrics
    prompt_lens = [len(p) for p in batch_prompts(batch)]
    # on-policy the CE is dropped and the divergence keeps its weight (0.6); off-policy both count
    want = _by_hand(student, teacher, scored.rows(), prompt_lens, T=2.0, r=0.6, with_ce=lmbda == 0.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert ("ce" in metrics) == (lmbda == 0.0)
    assert out.count == sum(len(row) - n for row, n in zip(scored.rows(), prompt_lens))


# --------------------------------------------------------------------------- 4. training


def _on_policy_divergence(student, teacher, spec, prompts, tok, samples=None) -> tuple[float, list]:
    """``spec``'s divergence on the student's greedy continuations of ``prompts`` (or on ``samples``)."""
    if samples is None:
        samples = sample_continuations(student, prompts, max_new_tokens=16, temperature=0.0,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    batch = continuation_batch(prompts, samples, tok.pad_token_id, MAX_LEN)
    targets = batch["labels"][:, 1:]
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        value, _ = distillation_loss(spec, student_logits=s, teacher_logits=t, mask=targets != IGNORE)
    return value.item(), samples


def _train(tok, teacher, steps: int = 30, **on_policy):
    records, held_out = _records(64), _batch(tok, _records(16, "eval", seed=1))
    cfg = TrainConfig(objective={"name": "on_policy", "max_new_tokens": 16, **on_policy}, steps=steps,
                      batch_size=8, lr=1e-2, warmup_steps=2, max_seq_len=MAX_LEN, log_every=5)
    student, obj = _student(tok), _from_train(cfg, tok)
    prompts = batch_prompts(held_out)
    before, first_samples = _on_policy_divergence(student, teacher, obj.spec, prompts, tok)
    result = train_loop(student, obj, SFTDataset(records, tok, MAX_LEN), Collator(tok.pad_token_id), cfg,
                        teacher=teacher, show_progress=False)
    after, _ = _on_policy_divergence(student, teacher, obj.spec, prompts, tok)
    on_first, _ = _on_policy_divergence(student, teacher, obj.spec, prompts, tok, first_samples)
    off_policy, _ = _on_policy_divergence(student, teacher, obj.spec, prompts, tok,
                                          [row[len(p):] for row, p in zip(_record_rows(held_out), prompts)])
    return {"before": before, "after": after, "on_first_samples": on_first, "on_records": off_policy,
            "history": result.history}


@pytest.mark.parametrize("variant", ["gkd", "minillm"])
def test_training_lowers_the_divergence_on_the_students_own_samples(tok, teacher, variant):
    run = _train(tok, teacher, variant=variant)
    losses = [h["loss"] for h in run["history"]]
    print(variant, {k: v for k, v in run.items() if k != "history"}, "logged losses", losses)
    # measured deterministically (greedy samples of held-out prompts), not on noisy training batches
    assert run["after"] < 0.95 * run["before"]
    assert run["on_first_samples"] < 0.95 * run["before"]  # the same tokens as before, scored again
    assert losses[-1] < losses[0]
    shares = [h["on_policy"] for h in run["history"]]
    assert set(shares) <= {0.0, 1.0} and (variant == "gkd" or min(shares) == 1.0)


def test_on_policy_training_beats_off_policy_on_its_own_samples(tok, teacher):
    # GKD's point (train/inference mismatch): the student that learned on its own samples is
    # closer to the teacher on the text it writes, the one that learned on records on records
    on, off = _train(tok, teacher, lmbda=1.0), _train(tok, teacher, lmbda=0.0)
    print({"lmbda=1": {k: v for k, v in on.items() if k != "history"},
           "lmbda=0": {k: v for k, v in off.items() if k != "history"}})
    assert on["after"] < off["after"] - 0.03
    assert off["on_records"] < on["on_records"]


# --------------------------------------------------------------------------- 6. errors


def test_clear_errors(tok, teacher, tiny_tokenizer):
    with pytest.raises(ValueError, match="form 'sparse'.*live teacher"):
        _objective(tok, loss={"divergence": "jsd", "form": "sparse"})
    batch, obj = _batch(tok, _records(2)), _objective(tok, lmbda=1.0)
    other = len(tiny_tokenizer)  # the conftest tokenizer, trained on other text
    assert other != len(tok)
    with pytest.raises(ValueError, match=rf"teacher vocabulary \({len(tok)}\) differs from the student's \({other}\)"):
        obj.loss(batch, _student(tiny_tokenizer), teacher)
    with pytest.raises(ValueError, match="needs a teacher"):
        obj.loss(batch, _student(tok), None)
    no_prompt = dict(batch, labels=batch["input_ids"].clone())  # every token trained, row 0 included
    with pytest.raises(ValueError, match="batch row 0 has no prompt tokens"):
        obj.loss(no_prompt, _student(tok), teacher)


@settings(max_examples=40, deadline=None)
@given(st.one_of(
    st.fixed_dictionaries({"kd_ratio": st.floats(0, 1)}),
    st.fixed_dictionaries({"ce_weight": st.floats(0, 3), "kd_weight": st.floats(0, 3)}),
    st.fixed_dictionaries({"ce_weight": st.floats(0, 3), "mix": st.just(
        [{"divergence": "forward_kl", "weight": 0.3}, {"divergence": "jsd", "weight": 0.7, "beta": 0.1}])}),
))
def test_on_policy_batches_drop_only_the_ce(tok, weights):
    obj = _objective(tok, loss={"divergence": "jsd", "beta": 0.5, **weights} if "mix" not in weights else weights)
    assert obj.on_policy_spec.resolved_ce_weight == 0.0
    assert [t.weight for t in obj.on_policy_spec.terms()] == [t.weight for t in obj.spec.terms()]
