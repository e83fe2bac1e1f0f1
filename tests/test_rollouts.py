"""Rollout engines for on_policy: the default ``hf`` engine is the code path as before, and a
syncing engine gets the student's weights on schedule (merged LoRA weights under plain names).

This machine has no GPU and no vllm: the sync logic is tested against ``CopyEngine``, a stand-in
that implements the engine protocol over its own copy of the student (a plain transformers
model), as vLLM holds one. The ``vllm`` engine itself is only checked to refuse clearly here.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import tiny_train_job
from distillery.config import (
    LoraConfig,
    ModelConfig,
    TaskConfig,
    TrainConfig,
    TrainJobConfig,
    load_config,
)
from distillery.errors import MissingExtraError
from distillery.models import apply_lora, build_model, load_model, load_tokenizer
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.train import Collator, SFTDataset, train_loop
from distillery.train.job import run_train_job
from distillery.train.objectives.on_policy import OnPolicyConfig, OnPolicyObjective
from distillery.train.rollouts import (
    RolloutConfig,
    RolloutEngine,
    RolloutParams,
    engine_weights,
    make_engine,
)
from distillery.train.sampling import sample_continuations, unwrap

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


def _dataset(tok, n: int = 32) -> SFTDataset:
    problems = load_problems(TaskConfig(num_operands=3, digits=(1, 2)), "train", n, seed=0)
    return SFTDataset(ground_truth_records(problems, "chain"), tok, MAX_LEN)


class CopyEngine:
    """The stand-in: its own deep copy of the (plain) student, sampling like the hf engine.

    Records every sync (the step of the objective's schedule, the names and tensors received)
    and, at every rollout, whether its weights are those of the last sync."""

    own_weights = True

    def __init__(self, plain_model, live_student=None) -> None:
        self.model = copy.deepcopy(plain_model).requires_grad_(False)
        self.live = live_student  # the student being trained, to compare with at each rollout
        self.syncs: list[dict[str, torch.Tensor]] = []
        self.rollouts: list[dict] = []

    def load_weights(self, weights) -> None:
        received = {name: t.detach().clone() for name, t in weights}
        params = dict(self.model.named_parameters())
        for name, tensor in received.items():
            params[name].data.copy_(tensor)  # KeyError: a name the engine does not have
        self.syncs.append(received)

    def generate(self, prompts, params: RolloutParams):
        mine = dict(self.model.named_parameters())
        live = {n: p.detach().clone() for n, p in engine_weights(self.live)} if self.live is not None else {}
        self.rollouts.append({
            "as_last_sync": all(torch.equal(mine[n], t) for n, t in self.syncs[-1].items()),
            "as_live": all(torch.equal(mine[n], t) for n, t in live.items()),
        })
        return sample_continuations(self.model, prompts, **vars(params))


def _train(tok, teacher, student, engine=None, *, steps: int = 7, sync_every: int = 1, grad_accum: int = 1,
           lr: float = 1e-2):
    cfg = TrainConfig(objective={"name": "on_policy", "lmbda": 1.0, "max_new_tokens": 8,
                                 "rollout": {"sync_every": sync_every}},
                      steps=steps, batch_size=4, grad_accum_steps=grad_accum, lr=lr, warmup_steps=0,
                      max_seq_len=MAX_LEN, log_every=1, seed=3)
    obj = OnPolicyObjective(cfg.objective, tok.eos_token_id, tok.pad_token_id, max_seq_len=MAX_LEN,
                            seed=cfg.seed, grad_accum_steps=grad_accum, engine=engine)
    result = train_loop(student, obj, _dataset(tok), Collator(tok.pad_token_id), cfg, teacher, None, False)
    return result.history


# --------------------------------------------------------------------------- the hf engine


def test_hf_engine_is_the_default_and_samples_as_sample_continuations(tok):
    assert OnPolicyConfig().rollout == RolloutConfig(engine="hf", sync_every=1, vllm_kwargs={})
    student = _student(tok)
    engine = make_engine(RolloutConfig(), student, MAX_LEN)
    assert isinstance(engine, RolloutEngine) and not engine.own_weights
    prompts = [[1, 5, 7], [1, 9]]
    params = RolloutParams(max_new_tokens=6, temperature=1.0, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(7)
    got = engine.generate(prompts, params)
    torch.manual_seed(7)
    assert got == sample_continuations(student, prompts, max_new_tokens=6, temperature=1.0,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def test_an_engine_synced_every_step_trains_exactly_as_the_hf_engine(tok, teacher):
    """sync_every 1: the copy holds the live weights at every rollout, so the same seeds give
    the same samples, losses and final weights as sampling with the student itself."""
    hf_student = _student(tok)
    hf_history = _train(tok, teacher, hf_student, steps=4)
    student = _student(tok)
    engine = CopyEngine(student, live_student=student)
    history = _train(tok, teacher, student, engine, steps=4, sync_every=1)
    assert [h["loss"] for h in history] == [h["loss"] for h in hf_history]
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), hf_student.state_dict().values()))
    assert len(engine.syncs) == 4 and all(r["as_live"] for r in engine.rollouts)
    assert [h["rollout/synced"] for h in history] == [1.0] * 4
    assert "rollout/synced" not in hf_history[0]  # the hf engine never syncs


# --------------------------------------------------------------------------- the sync schedule


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_syncs_every_n_optimizer_steps_and_rollouts_between_use_the_last_sync(tok, teacher, grad_accum):
    student = _student(tok)
    engine = CopyEngine(student, live_student=student)
    history = _train(tok, teacher, student, engine, steps=7, sync_every=3, grad_accum=grad_accum)
    # one rollout per micro-batch; weights sent at optimizer steps 0, 3 and 6 (1st, 4th, 7th), once each
    assert len(engine.rollouts) == 7 * grad_accum
    assert len(engine.syncs) == 3
    # logged per step (averaged over its micro-batches: only the first one syncs)
    assert [h["rollout/synced"] > 0 for h in history] == [True, False, False] * 2 + [True]
    assert [h["rollout/staleness"] for h in history] == pytest.approx([0, 1, 2, 0, 1, 2, 0])
    assert all(r["as_last_sync"] for r in engine.rollouts)
    # at a step that synced the copy is the live student; at the steps between, it is behind
    per_step = [engine.rollouts[i * grad_accum]["as_live"] for i in range(7)]
    assert per_step == [True, False, False, True, False, False, True]
    # what was sent is the whole student under its own names
    assert set(engine.syncs[0]) == {n for n, _ in student.named_parameters()}


def test_sync_every_is_validated():
    with pytest.raises(ValueError, match="sync_every"):
        RolloutConfig(sync_every=0)
    with pytest.raises(ValueError, match="rollout.vllm_kwargs is set but rollout.engine is 'hf'"):
        OnPolicyConfig(rollout={"vllm_kwargs": {"gpu_memory_utilization": 0.5}})


# --------------------------------------------------------------------------- LoRA students


def _lora_student(tok):
    student = apply_lora(_student(tok), LoraConfig(r=4, alpha=8.0, target_modules="all-linear"), seed=1)
    with torch.no_grad():  # peft starts B at 0 (merged = base); give the adapters something to add
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return student


def test_lora_weights_are_sent_merged_under_the_plain_names_and_the_student_is_untouched(tok):
    student = _lora_student(tok)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    sent = dict(engine_weights(student))
    plain = _student(tok)
    assert set(sent) == {n for n, _ in plain.named_parameters()}
    params = dict(student.named_parameters())
    adapted = 0
    for name, tensor in sent.items():
        module = name.removesuffix(".weight")
        base = params.get(f"base_model.model.{module}.base_layer.weight")
        if base is None:  # not adapted: the parameter itself
            assert torch.equal(tensor, params[f"base_model.model.{name}"])
            continue
        a = params[f"base_model.model.{module}.lora_A.default.weight"].double()
        b = params[f"base_model.model.{module}.lora_B.default.weight"].double()
        expected = base.double() + (8.0 / 4) * b @ a  # W + (alpha / r) · B A, in float64
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
        assert not torch.equal(tensor, base)
        adapted += 1
    assert adapted == 7  # q, k, v, o, gate, up, down of the one layer
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert not any(getattr(m, "merged", False) for m in student.modules())


def test_a_synced_copy_of_a_lora_student_computes_the_students_logits(tok, teacher):
    student = _lora_student(tok)
    engine = CopyEngine(_student(tok, seed=5))  # a plain model: no adapters, another init
    _train(tok, teacher, student, engine, steps=2, sync_every=1)
    assert len(engine.syncs) == 2
    engine.load_weights(engine_weights(student))  # the weights after the last update
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        unwrap(student).eval()
        torch.testing.assert_close(engine.model(input_ids=ids).logits, student(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the vllm engine


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(),
                    reason="vllm and a GPU are here: the engine would start")
def test_vllm_engine_says_what_it_needs(tok):
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("pip install vllm")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    with pytest.raises(MissingExtraError) as err:
        make_engine(RolloutConfig(engine="vllm", sync_every=4), _student(tok), MAX_LEN)
    for need in missing:
        assert need in str(err.value)
    assert "rollout.engine: hf" in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(),
                    reason="vllm and a GPU are here: the engine would start")
def test_a_train_job_with_the_vllm_engine_fails_before_training(tmp_path):
    path = tiny_train_job(tmp_path, tokenizer={"path": TEACHER}, teacher={"path": TEACHER, "device": "cpu"},
                          train={"objective": {"name": "on_policy", "max_new_tokens": 8,
                                               "rollout": {"engine": "vllm", "sync_every": 4}},
                                 "steps": 2, "batch_size": 4, "max_seq_len": 48})
    cfg = load_config(path, TrainJobConfig)
    assert cfg.train.objective.rollout.engine == "vllm"
    with pytest.raises(MissingExtraError, match="rollout.engine 'vllm' needs"):
        run_train_job(cfg, show_progress=False)
    assert not (tmp_path / "out" / "train_log.jsonl").exists()
