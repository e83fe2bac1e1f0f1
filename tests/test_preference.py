"""Preference objective: losses against float64 references, log-probs, the reference model
(precomputed, live, LoRA adapters off, reference_path) and training that grows DPO's margin."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.chat import IGNORE, tokenize_messages
from distillery.config import ModelConfig, TaskConfig, TrainConfig
from distillery.models import build_model, load_model
from distillery.records import RecordError
from distillery.tasks import load_problems
from distillery.train import train_loop
from distillery.train.objectives.preference import (
    PreferenceConfig,
    pair_losses,
    prepare_preference_training,
)
from distillery.train.preference import (
    AdapterOffReference,
    ModelReference,
    PreferenceCollator,
    PreferenceDataset,
    sequence_logps,
    validate_preference_records,
)

TASK = TaskConfig(num_operands=2, digits=(1, 2), operations=["+", "-"])


def _pairs(split: str, n: int, seed: int) -> list[dict]:
    """chosen = the correct chain ("12+7=19;#19"), rejected = a wrong bare answer ("#23")."""
    out = []
    for i, p in enumerate(load_problems(TASK, split, n, seed=seed)):
        out.append({"id": p.id, "prompt": [{"role": "user", "content": p.prompt}],
                    "chosen": [{"role": "assistant", "content": p.chain}],
                    "rejected": [{"role": "assistant", "content": f"#{int(p.reference) + 1 + i % 9}"}],
                    "meta": {"method": "hand-written"}})
    return out


def _model(tok, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, device="cpu"), tok)


def _cfg(**pref) -> TrainConfig:
    return TrainConfig(objective=PreferenceConfig(**pref), steps=30, batch_size=16, lr=3e-3, warmup_steps=0,
                       max_seq_len=48, log_every=10)


def _ref_from_items(ds: PreferenceDataset) -> torch.Tensor:
    return torch.tensor([it["ref_chosen_logps"] for it in ds.items] + [it["ref_rejected_logps"] for it in ds.items])


def _scores(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"])[0]


# --------------------------------------------------------------------------- losses


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference_loss(loss: str, pc, pr, rc, rr, nc, nr, beta, eps, gamma) -> tuple[float, float, float]:
    """(loss, reward chosen, reward rejected) of one pair, the plain way, in float64."""
    if loss == "simpo":
        z = beta * (pc / nc - pr / nr) - gamma
        return -(1 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z), beta * pc / nc, beta * pr / nr
    if loss == "ipo":
        h = (pc - rc) / nc - (pr - rr) / nr
        return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)
    h = (pc - rc) - (pr - rr)
    value = -(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h)
    return value, beta * (pc - rc), beta * (pr - rr)


pair_st = st.tuples(*[st.floats(-200, 0)] * 4, st.integers(1, 60), st.integers(1, 60))


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(pair_st, min_size=1, max_size=6), beta=st.floats(0.01, 5.0),
       eps=st.floats(0.0, 0.49), gamma=st.floats(0.0, 3.0))
def test_pair_losses_match_a_float64_reference(loss, pairs, beta, eps, gamma):
    eps = 0.0 if loss == "ipo" else eps
    cfg = PreferenceConfig(loss=loss, beta=beta, label_smoothing=eps, simpo_gamma=gamma)
    pc, pr, rc, rr, nc, nr = (torch.tensor(col, dtype=torch.float64) for col in zip(*pairs))
    losses, chosen, rejected = pair_losses(
        cfg, torch.cat([pc, pr]), torch.cat([nc, nr]).long(), torch.cat([rc, rr]))
    for i, pair in enumerate(pairs):
        want = _reference_loss(loss, *(float(x) for x in pair), beta, eps, gamma)
        got = (losses[i].item(), chosen[i].item(), rejected[i].item())
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_dpo_and_ipo_refuse_to_run_without_a_reference():
    logps, tokens = torch.tensor([-1.0, -2.0]), torch.tensor([3, 4])
    for loss in ("dpo", "ipo"):
        with pytest.raises(ValueError, match="needs reference log-probs"):
            pair_losses(PreferenceConfig(loss=loss), logps, tokens, None)
    losses, _, _ = pair_losses(PreferenceConfig(loss="simpo"), logps, tokens, None)
    assert losses.shape == (1,)


# --------------------------------------------------------------------------- data and log-probs


def test_sequence_logps_match_a_per_token_loop(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    ds = PreferenceDataset(_pairs("train", 5, 0), tiny_tokenizer, max_len=48)
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(ds.items)
    sums, counts = sequence_logps(model.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    for row in range(len(batch["labels"])):
        total, n = 0.0, 0
        for t in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][row, t + 1])
            if target != IGNORE:
                total += torch.log_softmax(logits[row, t], -1)[target].item()
                n += 1
        assert counts[row].item() == n > 0
        assert sums[row].item() == pytest.approx(total, abs=1e-4)


def test_dataset_keeps_the_prompt_and_drops_pairs_without_response(tiny_tokenizer):
    recs = _pairs("train", 4, 0)
    recs[1]["prompt"][0]["content"] = "9+9" * 30  # longer than max_len: no response left
    ds = PreferenceDataset(recs, tiny_tokenizer, max_len=12)
    assert (len(ds), ds.dropped) == (3, 1)
    rec, item = recs[0], ds.items[0]
    for side in ("chosen", "rejected"):
        full = tokenize_messages(rec["prompt"] + rec[side], tiny_tokenizer, max_len=512)
        ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
        assert ids == full["input_ids"][:12] and labels == full["labels"][:12]
        n_prompt = sum(1 for x in full["labels"] if x == IGNORE)
        assert labels[:n_prompt] == [IGNORE] * n_prompt and all(x != IGNORE for x in labels[n_prompt:])
    with pytest.raises(ValueError, match="no preference pair has a response token"):
        PreferenceDataset(recs[1:2], tiny_tokenizer, max_len=12)


def test_collator_stacks_chosen_rows_then_rejected_rows(tiny_tokenizer):
    ds = PreferenceDataset(_pairs("train", 3, 0), tiny_tokenizer, max_len=48)
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(ds.items)
    assert batch["input_ids"].shape[0] == 6 and "ref_chosen_logps" not in batch
    for i, it in enumerate(ds.items):
        for row, side in ((i, "chosen"), (3 + i, "rejected")):
            n = len(it[f"{side}_input_ids"])
            assert batch["input_ids"][row, :n].tolist() == it[f"{side}_input_ids"]
            assert batch["attention_mask"][row].sum().item() == n
            assert (batch["labels"][row, n:] == IGNORE).all()


# --------------------------------------------------------------------------- the reference model


def test_precomputed_reference_equals_the_live_one(tiny_tokenizer):
    student = _model(tiny_tokenizer)
    recs = _pairs("train", 6, 0)
    pre, collate, pre_obj = prepare_preference_training(_cfg(reference="precompute").model_copy(update={"batch_size": 4}),
                                                        recs, tiny_tokenizer, student, show_progress=False)
    _, _, live_obj = prepare_preference_training(_cfg(reference="live"), recs, tiny_tokenizer, student,
                                                 show_progress=False)
    assert pre_obj.reference is None and isinstance(live_obj.reference, ModelReference)
    assert student.training and all(p.requires_grad for p in student.parameters())
    batch = collate(pre.items)
    precomputed = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    with torch.no_grad():  # the student trains on; the live reference is a frozen copy
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(_scores(student, batch), precomputed, atol=1e-3)
    assert torch.allclose(live_obj.reference(batch, student), precomputed, atol=1e-5)


@pytest.fixture
def peft_lora(monkeypatch):
    """peft's LoraConfig/get_peft_model; an installed torchao older than peft accepts (torchtune
    pins 0.10) makes peft refuse every LoRA layer, so it is hidden: plain nn.Linear LoRA needs none."""
    from peft import LoraConfig, get_peft_model
    from peft.import_utils import is_torchao_available

    try:
        is_torchao_available()
    except ImportError:
        monkeypatch.setitem(sys.modules, "torchao", None)
    return LoraConfig, get_peft_model


def test_lora_reference_is_the_base_model_with_adapters_off(tiny_tokenizer, peft_lora):
    LoraConfig, get_peft_model = peft_lora

    base = _model(tiny_tokenizer)
    frozen_base = copy.deepcopy(base).eval()
    torch.manual_seed(1)  # random B matrices: the adapters change the outputs from the start
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False))
    recs = _pairs("train", 6, 0)
    ds, collate, obj = prepare_preference_training(_cfg(reference="live"), recs, tiny_tokenizer, student,
                                                   show_progress=False)
    assert isinstance(obj.reference, AdapterOffReference)
    batch = collate(ds.items)
    with_adapters = _scores(student, batch)
    want = _scores(frozen_base, batch)
    assert not torch.allclose(with_adapters, want, atol=1e-3)
    assert torch.allclose(obj.reference(batch, student), want, atol=1e-5)
    assert torch.equal(_scores(student, batch), with_adapters)  # adapters are back on after
    pre, _, _ = prepare_preference_training(_cfg(reference="precompute"), recs, tiny_tokenizer, student,
                                            show_progress=False)
    assert torch.allclose(_ref_from_items(pre), want, atol=1e-5)


def test_reference_path_model_is_loaded_and_used(tiny_tokenizer, tiny_model_dir):
    student = _model(tiny_tokenizer, seed=5)  # not the saved model: the reference must come from disk
    recs = _pairs("train", 6, 0)
    ds, collate, obj = prepare_preference_training(
        _cfg(reference_path=str(tiny_model_dir)), recs, tiny_tokenizer, student, show_progress=False)
    want = _scores(load_model(str(tiny_model_dir), device="cpu"), collate(ds.items))
    assert torch.allclose(_ref_from_items(ds), want, atol=1e-5)
    assert not torch.allclose(_scores(student, collate(ds.items)), want, atol=1e-3)


def test_sft_weight_adds_the_chosen_nll(tiny_tokenizer):
    student = _model(tiny_tokenizer)
    recs = _pairs("train", 6, 0)
    ds, collate, plain = prepare_preference_training(_cfg(), recs, tiny_tokenizer, student, show_progress=False)
    _, _, rpo = prepare_preference_training(_cfg(sft_weight=0.5), recs, tiny_tokenizer, student,
                                            show_progress=False)
    batch = collate(ds.items)
    with torch.no_grad():
        base_loss = plain.loss(batch, student).loss
        out = rpo.loss(batch, student)
        loss, metrics = out.loss, out.metrics
        logps, tokens = sequence_logps(student, batch["input_ids"], batch["attention_mask"], batch["labels"])
    nll = (-logps[:6] / tokens[:6]).mean().item()
    assert metrics["nll"] == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(base_loss.item() + 0.5 * nll, rel=1e-5)


# --------------------------------------------------------------------------- training


def _held_out_metrics(objective, dataset, collate, student) -> dict[str, float]:
    student.eval()
    with torch.no_grad():
        out = objective.loss(collate(dataset.items), student)
    student.train()
    return {**out.metrics, "loss": out.loss.item(), "count": out.count}


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_training_grows_the_margin_on_held_out_pairs(tiny_tokenizer, loss):
    student = _model(tiny_tokenizer)
    cfg = _cfg(loss=loss)
    ds, collate, obj = prepare_preference_training(cfg, _pairs("train", 128, 1), tiny_tokenizer, student,
                                                   show_progress=False)
    # held-out pairs, scored by the same reference (the student before training)
    held, _, held_obj = prepare_preference_training(cfg, _pairs("eval", 32, 2), tiny_tokenizer, student,
                                                    show_progress=False)
    before = _held_out_metrics(held_obj, held, collate, student)
    train_loop(student, obj, ds, collate, cfg, show_progress=False)
    after = _held_out_metrics(held_obj, held, collate, student)
    print(loss, {k: round(before[k], 4) for k in before}, {k: round(after[k], 4) for k in after})
    if loss != "simpo":  # the policy starts as its reference: every log-ratio is 0
        assert before["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
        assert before["rewards/accuracy"] == 0.0
    assert after["rewards/margin"] > before["rewards/margin"] + 1.0
    assert after["rewards/accuracy"] >= 0.9
    assert after["loss"] < 0.5 * before["loss"]
    assert after["count"] == 32


# --------------------------------------------------------------------------- bad input


def _bad(index: int, **change) -> list[dict]:
    recs = _pairs("train", 3, 0)
    recs[index].update(change)
    return recs


@pytest.mark.parametrize(("records", "message"), [
    (_bad(1, prompt=[]), r'record 2 \(id .*\): needs a non-empty "prompt" list'),
    (_bad(2, chosen="12+7=19"), r'record 3 .*non-empty "chosen" list'),
    (_bad(0, rejected=[{"role": "bot", "content": "#3"}]), r'record 1 .*"rejected" message needs role'),
    (_bad(1, rejected=[{"role": "assistant", "content": 3}]), r'record 2 .*"content" must be a string'),
    (_bad(1, prompt=[{"role": "assistant", "content": "hi"}]), r"record 2 .*last \"prompt\" message must be the user"),
    (_bad(2, chosen=[{"role": "user", "content": "hi"}]), r'record 3 .*"chosen" must start and end with an assistant'),
    ([{"id": "x", "messages": [{"role": "user", "content": "a"}]}], r"record 1 \(id 'x'\): is an SFT"),
])
def test_invalid_records_name_the_file_and_record(records, message):
    with pytest.raises(RecordError, match=r"^prefs\.jsonl: " + message):
        validate_preference_records(records, "prefs.jsonl")


def test_feedback_pairs_are_valid_preference_records(tiny_tokenizer):
    from distillery.elicit.feedback import FeedbackConfig, assemble_preferences

    graded = [{"id": f"p-s{j}", "seed_id": "p", "index": 0, "sample": j, "prompt": "12+7",
               "answer": answer, "reference": "19", "score": score, "rationale": "", "judge": "t"}
              for j, (answer, score) in enumerate([("12+7=19;#19", 9), ("#23", 2)])]
    prefs, _, _ = assemble_preferences(graded, FeedbackConfig())
    validate_preference_records(prefs, "feedback_pairs.jsonl")
    assert len(PreferenceDataset(prefs, tiny_tokenizer, max_len=48)) == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"objective": PreferenceConfig(loss="ipo", label_smoothing=0.1)}, "ipo's squared loss has none"),
    ({"packing": True}, "packing is not supported"),
])
def test_config_combinations_that_make_no_sense_are_refused(tiny_tokenizer, change, message):
    cfg = _cfg().model_copy(update=change)
    with pytest.raises(ValueError, match=message):
        prepare_preference_training(cfg, _pairs("train", 2, 0), tiny_tokenizer, _model(tiny_tokenizer))
