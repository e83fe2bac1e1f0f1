"""Padding-free packing: examples in one row see only themselves, and the loss is unchanged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import find_packed_sequence_indices

from distillery.chat import IGNORE
from distillery.config import TrainJobConfig
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.train.data import Collator, SFTDataset
from distillery.train.objectives.sft import SFTObjective
from distillery.train.packing import (
    PackedCollator,
    model_inputs,
    pack_rows,
    segment_ids,
)
from distillery.train.targets import cross_entropy, shifted_targets

MAX_LEN = 64


@pytest.fixture(scope="module")
def items(task_cfg, tiny_tokenizer):
    problems = load_problems(task_cfg, "train", 24, seed=3)
    return SFTDataset(ground_truth_records(problems, "chain"), tiny_tokenizer, MAX_LEN).items


def _tiny_llama(vocab: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_LEN)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_each_packed_example_has_the_logits_it_has_alone(items, tiny_tokenizer, attn):
    model = _tiny_llama(len(tiny_tokenizer), attn)
    batch = PackedCollator(tiny_tokenizer.pad_token_id, MAX_LEN)(items)
    assert batch["input_ids"].shape[0] < len(items)  # rows really hold several examples
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        worst = 0.0
        for r in range(batch["input_ids"].shape[0]):
            seg = segment_ids(batch["position_ids"][r:r + 1])[0]
            for s in seg[batch["attention_mask"][r].bool()].unique():
                cols = (seg == s).nonzero().flatten()
                alone = model(input_ids=batch["input_ids"][r:r + 1, cols]).logits[0]
                worst = max(worst, (packed[r, cols] - alone).abs().max().item())
    assert worst < 1e-5, worst


def _plain_sft_loss_f64(model: LlamaForCausalLM, items: list[dict]) -> float:
    """Token-mean next-token NLL of every item run alone, in float64."""
    model = model.double()
    total, count = 0.0, 0
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([it["input_ids"]])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            for t in range(1, len(it["input_ids"])):
                if it["labels"][t] != IGNORE:
                    total -= logp[t - 1, it["labels"][t]].item()
                    count += 1
    model.float()
    return total / count


def test_packed_sft_loss_and_gradient_equal_the_padded_batch(items, tiny_tokenizer):
    model = _tiny_llama(len(tiny_tokenizer), "sdpa")
    packed = PackedCollator(tiny_tokenizer.pad_token_id, MAX_LEN)(items)
    padded = Collator(tiny_tokenizer.pad_token_id)(items)

    targets, _ = shifted_targets(packed)
    loss_packed = cross_entropy(model(**model_inputs(packed)).logits[:, :-1], targets)
    grads_packed = torch.autograd.grad(loss_packed, list(model.parameters()))
    loss_padded = SFTObjective().loss(padded, model).loss
    grads_padded = torch.autograd.grad(loss_padded, list(model.parameters()))

    reference = _plain_sft_loss_f64(model, items)
    assert abs(loss_packed.item() - reference) < 1e-5
    assert abs(loss_padded.item() - reference) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads_packed, grads_padded)) < 1e-6
    # the same tokens are trained: nothing across an example boundary
    assert int((targets != IGNORE).sum()) == int((shifted_targets(padded)[0] != IGNORE).sum())


def _padding_report(name: str, lengths: list[int], max_len: int) -> tuple[int, int]:
    """Cells of the padded batch ``[n, longest]`` and of the packed one ``[rows, widest row]``."""
    rows = pack_rows(lengths, max_len)
    padded = len(lengths) * max(lengths)
    packed = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
    real = sum(lengths)
    print(f"\n{name}: {len(lengths)} examples, {real} tokens; padded [{len(lengths)}, {max(lengths)}] "
          f"{real / padded:.0%} real tokens; packed into {len(rows)} rows, {real / packed:.0%} real, "
          f"{real / len(rows):.1f} tokens/row")
    return padded, packed


def test_packing_reduces_padding(task_cfg, tiny_tokenizer):
    problems = load_problems(task_cfg, "train", 64, seed=5)
    items = SFTDataset(ground_truth_records(problems, "chain"), tiny_tokenizer, 128).items
    packed = PackedCollator(tiny_tokenizer.pad_token_id, 128)(items)
    padded = Collator(tiny_tokenizer.pad_token_id)(items)
    real = sum(len(it["input_ids"]) for it in items)
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum()) == real
    assert (padded["input_ids"].numel(), packed["input_ids"].numel()) == _padding_report(
        "arithmetic chains", [len(it["input_ids"]) for it in items], 128)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    # chat data is long-tailed: a few long answers set the padded width of every row
    g = torch.Generator().manual_seed(0)
    lengths = (torch.empty(64).log_normal_(4.5, 0.6, generator=g).clamp(8, 1024)).long().tolist()
    padded_cells, packed_cells = _padding_report("long-tailed lengths", lengths, 1024)
    assert packed_cells < 0.5 * padded_cells


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=12), max_len=st.integers(20, 48))
def test_packing_keeps_every_example_whole(lengths, max_len):
    items = [{"input_ids": [100 * i + t for t in range(n)], "labels": [1000 * i + t for t in range(n)]}
             for i, n in enumerate(lengths)]
    batch = PackedCollator(pad_id=-1, max_len=max_len)(items)
    assert batch["input_ids"].shape[1] <= max_len
    assert len(pack_rows(lengths, max_len)) == batch["input_ids"].shape[0]
    seg = segment_ids(batch["position_ids"])
    # transformers reads the same example boundaries from position_ids
    detected = find_packed_sequence_indices(batch["position_ids"])
    assert detected is None or torch.equal(detected, seg)
    found = []
    for r in range(batch["input_ids"].shape[0]):
        for s in seg[r].unique():
            cols = (seg[r] == s).nonzero().flatten()
            if not batch["attention_mask"][r, cols].any():
                assert (batch["labels"][r, cols] == IGNORE).all()  # the padding segment
                continue
            ids, labels = batch["input_ids"][r, cols].tolist(), batch["labels"][r, cols].tolist()
            assert batch["position_ids"][r, cols].tolist() == list(range(len(cols)))
            i = ids[0] // 100
            assert ids == items[i]["input_ids"]
            assert labels == [IGNORE] + items[i]["labels"][1:]  # never predicted across a boundary
            found.append(i)
    assert sorted(found) == list(range(len(items)))


def test_an_item_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="train.max_seq_len"):
        PackedCollator(0, 4)([{"input_ids": [1] * 5, "labels": [1] * 5}])


def _packed_job(objective, **job):
    return TrainJobConfig(output_dir="unused", data={"path": "unused.jsonl"},
                          train={"objective": objective, "packing": True}, **job)


@pytest.mark.parametrize("objective, job, why", [
    ("on_policy", {"teacher": {}}, "'on_policy' samples its own batches"),
    ("reward", {}, "'reward' samples its own batches"),
    ("preference", {}, "'preference' does not take packed batches"),
    ("logit_kd", {"teacher_cache": "unused"}, "logit cache"),
    ({"name": "logit_kd", "cross_tokenizer": {}}, {"teacher": {}}, "'logit_kd' does not take packed batches"),
    ({"name": "feature_kd", "relation_weight": 0.5}, {"teacher": {}}, "'feature_kd' does not take packed"),
])
def test_packing_is_refused_where_rows_would_mix(objective, job, why):
    """What packs is declared by each objective's needs (and its config), checked with the job."""
    with pytest.raises(ValueError, match=why):
        _packed_job(objective, **job)
    _packed_job("sft")
    _packed_job("logit_kd", teacher={})
    _packed_job("feature_kd", teacher={})
