"""Training: assistant-only labels, objectives, and the loop (loss goes down, runs are deterministic)."""

from __future__ import annotations

import copy

import pytest
import torch

from distillery.chat import IGNORE, tokenize_messages
from distillery.config import ModelConfig, TrainConfig, TrainJobConfig
from distillery.losses import LossSpec
from distillery.models import build_model
from distillery.records import sft_record
from distillery.train import (
    Collator,
    LogitKDObjective,
    SFTDataset,
    SFTObjective,
    train_loop,
)
from distillery.train.objectives import BuildContext, build_training_parts


def _records(n: int = 64) -> list[dict]:
    from distillery.config import TaskConfig
    from distillery.tasks import load_problems

    problems = load_problems(TaskConfig(num_operands=2, digits=(1, 2)), "train", n, seed=3)
    return [sft_record(p.id, p.prompt, p.chain, p.reference, method="ground_truth") for p in problems]


def _model(tok, seed: int = 0, hidden: int = 32):
    torch.manual_seed(seed)
    return build_model(ModelConfig(hidden_size=hidden, num_layers=1, num_heads=2, device="cpu"), tok)


def test_labels_cover_exactly_the_assistant_turns(tiny_tokenizer):
    msgs = [
        {"role": "user", "content": "12+7"},
        {"role": "assistant", "content": "12+7=19;#19"},
        {"role": "user", "content": "3-1"},
        {"role": "assistant", "content": "3-1=2;#2"},
    ]
    out = tokenize_messages(msgs, tiny_tokenizer, max_len=512)
    ids, labels = out["input_ids"], out["labels"]
    full = tiny_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tiny_tokenizer.decode(ids) == full
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tiny_tokenizer.decode(trained) == "12+7=19;#19<|end|>3-1=2;#2<|end|>"
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))


def test_truncation_and_empty_records_are_dropped(tiny_tokenizer):
    recs = _records(4)
    ds = SFTDataset(recs, tiny_tokenizer, max_len=12)
    assert all(len(it["input_ids"]) <= 12 for it in ds.items)
    with pytest.raises(ValueError, match="no record has an assistant token"):
        SFTDataset(recs, tiny_tokenizer, max_len=3)


def test_collator_pads_right_and_masks(tiny_tokenizer):
    ds = SFTDataset(_records(8), tiny_tokenizer, max_len=64)
    batch = Collator(tiny_tokenizer.pad_token_id)([ds[0], ds[1], ds[2]])
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def _batch_loss(objective, batch, model, teacher=None) -> float:
    model.eval()
    with torch.no_grad():
        return objective.loss(batch, model, teacher).loss.item()


def _objective(cfg: TrainConfig, tokenizer, student, teacher):
    """The objective ``cfg.objective`` names, built by its registry entry as ``distillery train`` does."""
    job = TrainJobConfig(output_dir="unused", data={"path": "unused.jsonl"}, train=cfg,
                         teacher=ModelConfig() if teacher is not None else None)
    return build_training_parts(BuildContext(job, _records(4), tokenizer, student, teacher))[2]


OBJECTIVES = {
    "sft": TrainConfig(objective="sft"),
    "logit_kd": TrainConfig(objective={"name": "logit_kd", "kd_ratio": 0.5}),
    "logit_kd_jsd_fused": TrainConfig(objective={"name": "logit_kd", "loss": LossSpec(divergence="jsd", beta=0.5, kd_ratio=0.5, form="fused", chunk_tokens=64)}),
    "logit_kd_reverse_kl_t2": TrainConfig(objective={"name": "logit_kd", "loss": LossSpec(divergence="reverse_kl", temperature=2.0, scale_by_t2=True, ce_weight=0.5)}),
    "logit_kd_akl_fused": TrainConfig(objective={"name": "logit_kd", "loss": LossSpec(divergence="akl", kd_ratio=0.7, form="fused", chunk_tokens=32)}),
    "feature_kd": TrainConfig(objective={"name": "feature_kd", "layer_map": {0: 0, -1: -1}, "relation_weight": 0.5}),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_training_reduces_the_loss(tiny_tokenizer, name):
    ds = SFTDataset(_records(64), tiny_tokenizer, max_len=64)
    collate = Collator(tiny_tokenizer.pad_token_id)
    batch = collate([ds[i] for i in range(32)])
    student = _model(tiny_tokenizer, seed=0)
    teacher = _model(tiny_tokenizer, seed=1, hidden=48) if name != "sft" else None
    cfg = OBJECTIVES[name].model_copy(update={"steps": 15, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0, "log_every": 5})
    objective = _objective(cfg, tiny_tokenizer, student, teacher)
    before = _batch_loss(objective, batch, student, teacher)
    result = train_loop(student, objective, ds, collate, cfg, teacher=teacher, show_progress=False)
    after = _batch_loss(objective, batch, student, teacher)
    assert after < 0.8 * before, (before, after)
    assert result.tokens > 0 and len(result.history) == 3
    if name == "feature_kd":
        # the projections are the objective's, not the student's, and they trained too
        proj = objective.trainable[0]
        fresh = _objective(cfg, tiny_tokenizer, student, teacher).trainable[0]
        assert not all(torch.equal(a, b) for a, b in zip(proj.parameters(), fresh.parameters()))


def test_fused_logit_kd_equals_dense_on_a_real_model(tiny_tokenizer):
    ds = SFTDataset(_records(8), tiny_tokenizer, max_len=64)
    batch = Collator(tiny_tokenizer.pad_token_id)([ds[i] for i in range(8)])
    student, teacher = _model(tiny_tokenizer, 0).double(), _model(tiny_tokenizer, 1, hidden=48).double()
    losses, grads = [], []
    for form in ("dense", "fused"):
        student.zero_grad()
        spec = LossSpec(divergence="jsd", beta=0.3, temperature=1.5, kd_ratio=0.6, form=form, chunk_tokens=16)
        loss = LogitKDObjective(spec).loss(batch, student, teacher).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-7, atol=1e-9)


def test_feature_kd_refuses_layers_the_models_do_not_have(tiny_tokenizer):
    student, teacher = _model(tiny_tokenizer, 0), _model(tiny_tokenizer, 1)  # 1 layer: states 0..1
    cfg = TrainConfig(objective={"name": "feature_kd", "layer_map": {1: 2}})
    with pytest.raises(ValueError, match="teacher layer 2"):
        _objective(cfg, tiny_tokenizer, student, teacher)


def test_live_teacher_refuses_the_sparse_form():
    with pytest.raises(ValueError, match="logit cache"):
        LogitKDObjective(LossSpec(form="sparse"))


def test_training_is_deterministic(tiny_tokenizer):
    ds = SFTDataset(_records(32), tiny_tokenizer, max_len=64)
    collate = Collator(tiny_tokenizer.pad_token_id)
    cfg = TrainConfig(steps=6, batch_size=8, lr=5e-3, warmup_steps=1, seed=7)
    weights = []
    for _ in range(2):
        model = _model(tiny_tokenizer, seed=0)
        train_loop(model, SFTObjective(), ds, collate, cfg, show_progress=False)
        weights.append(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # and the seed matters: a different data order gives different weights
    model = _model(tiny_tokenizer, seed=0)
    train_loop(model, SFTObjective(), ds, collate, cfg.model_copy(update={"seed": 8}), show_progress=False)
    assert not all(torch.equal(weights[0][k], model.state_dict()[k]) for k in weights[0])


def test_logit_kd_mixes_ce_and_kl_as_stated(tiny_tokenizer):
    ds = SFTDataset(_records(8), tiny_tokenizer, max_len=64)
    batch = Collator(tiny_tokenizer.pad_token_id)([ds[i] for i in range(8)])
    student, teacher = _model(tiny_tokenizer, 0), _model(tiny_tokenizer, 1)
    ce = _batch_loss(SFTObjective(), batch, student)
    assert _batch_loss(LogitKDObjective(kd_ratio=0.0), batch, student, teacher) == pytest.approx(ce, rel=1e-6)
    # the teacher equal to the student: KL is 0, so kd_ratio=1 gives 0
    assert _batch_loss(LogitKDObjective(kd_ratio=1.0), batch, student, copy.deepcopy(student)) == pytest.approx(0, abs=1e-6)
    metrics = LogitKDObjective(kd_ratio=0.3).loss(batch, student.eval(), teacher).metrics
    mixed = _batch_loss(LogitKDObjective(kd_ratio=0.3), batch, student, teacher)
    assert mixed == pytest.approx(0.7 * metrics["ce"] + 0.3 * metrics["kd/forward_kl"], rel=1e-5)
    assert metrics["kd/forward_kl"] > 0


def test_logit_kd_refuses_a_teacher_with_another_vocabulary(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    ds = SFTDataset(_records(4), tiny_tokenizer, max_len=64)
    batch = Collator(tiny_tokenizer.pad_token_id)([ds[i] for i in range(4)])
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer) + 5, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="shared tokenizer"):
        LogitKDObjective().loss(batch, _model(tiny_tokenizer), other)
