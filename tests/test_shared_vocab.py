"""logit_kd between models that share a tokenizer but not a vocabulary size (padded rows).

Qwen-style: the teacher's embedding has rows beyond the tokenizer (152064 vs 151936). The loss
over the shared id range must equal the plain float64 KL between the two renormalized
distributions over those ids, in the dense and the fused form.
"""

from __future__ import annotations

import pytest
import torch

from distillery.chat import IGNORE
from distillery.config import ModelConfig
from distillery.losses import LossSpec
from distillery.models import build_model
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.train.data import Collator, SFTDataset
from distillery.train.objectives.logit_kd import LogitKDObjective


def _padded_pair(tokenizer, extra: int):
    torch.manual_seed(0)
    student = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), tokenizer)
    teacher = build_model(ModelConfig(hidden_size=48, num_layers=1, num_heads=2), tokenizer)
    teacher.resize_token_embeddings(len(tokenizer) + extra)  # padded rows, random as in real models
    with torch.no_grad():
        teacher.get_output_embeddings().weight[len(tokenizer):].normal_(0, 1.0)
    return student.eval(), teacher.eval()


@pytest.fixture(scope="module")
def batch(tiny_tokenizer, task_cfg):
    records = ground_truth_records(load_problems(task_cfg, "train", 4, seed=0), "chain")
    ds = SFTDataset(records, tiny_tokenizer, 48)
    return Collator(tiny_tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def _reference(student, teacher, batch, n: int) -> float:
    """KL(teacher ‖ student) over ids [0, n), both renormalized there, mean over label tokens."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    log_q = torch.log_softmax(s[:, :-1, :n], -1)
    log_p = torch.log_softmax(t[:, :-1, :n], -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = batch["labels"][:, 1:] != IGNORE
    return float(kl[mask].mean())


@pytest.mark.parametrize("form", ["dense", "fused"])
def test_padded_teacher_loss_equals_reference(tiny_tokenizer, batch, form):
    n = len(tiny_tokenizer)
    student, teacher = _padded_pair(tiny_tokenizer, extra=13)
    assert teacher.get_output_embeddings().weight.shape[0] == n + 13
    spec = LossSpec(divergence="forward_kl", form=form)
    loss = LogitKDObjective(spec, shared_vocab=n).loss(batch, student, teacher).loss
    ref = _reference(student, teacher, batch, n)
    assert abs(float(loss.detach()) - ref) < 1e-5 * max(1.0, ref)
    # the padded rows carry real mass: ignoring the range (softmax over all teacher rows) differs
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1].double()
    assert float(torch.softmax(t, -1)[..., n:].sum(-1).mean()) > 1e-3


def test_padded_without_shared_range_is_refused(tiny_tokenizer, batch):
    student, teacher = _padded_pair(tiny_tokenizer, extra=5)
    with pytest.raises(ValueError, match="differs from the student's"):
        LogitKDObjective(LossSpec()).loss(batch, student, teacher)


def test_student_label_outside_shared_range_is_refused(tiny_tokenizer, batch):
    n = len(tiny_tokenizer)
    student, teacher = _padded_pair(tiny_tokenizer, extra=5)
    student.resize_token_embeddings(n + 3)  # the student has a token the teacher lacks...
    bad = {**batch, "labels": batch["labels"].clone()}
    bad["labels"][0, -1] = n + 1  # ...and trains on it
    with pytest.raises(ValueError, match="outside the range both tokenizers share"):
        LogitKDObjective(LossSpec(), shared_vocab=n).loss(bad, student, teacher)
