"""The fused form with a real (tiny) Hugging Face model, tied embeddings, and its memory bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distillery.losses import (
    LossSpec,
    TeacherLogits,
    TeacherTopK,
    distillation_loss,
    fused_kd_loss_from_model,
    lm_head_inputs,
)

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int, tied: bool = True):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, tie_word_embeddings=tied, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 64, (2, 9), generator=g)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(("divergence", "extra"), [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("akl", {})])
def test_fused_from_model_equals_dense_from_logits(tied, divergence, extra):
    student, teacher = _tiny_llama(0, tied), _tiny_llama(1)
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tied
    input_ids, attention_mask, labels = _batch()
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    spec = LossSpec(divergence=divergence, temperature=1.5, ce_weight=0.0, chunk_tokens=5, **extra)

    # dense reference: the training loop's way (shift, then the dense form)
    student.zero_grad()
    logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
    dense, dense_m = distillation_loss(
        spec, student_logits=logits[:, :-1], teacher_logits=t_logits[:, :-1], labels=labels[:, 1:],
        mask=attention_mask[:, 1:].bool(),
    )
    dense.backward()
    ref_grads = {n: p.grad.clone() for n, p in student.named_parameters()}

    student.zero_grad()
    fused, fused_m = fused_kd_loss_from_model(
        student, input_ids, attention_mask, labels, teacher=TeacherLogits(t_logits), spec=spec
    )
    fused.backward()
    torch.testing.assert_close(fused.detach(), dense.detach(), rtol=1e-10, atol=1e-12)
    assert fused_m == pytest.approx(dense_m, rel=1e-9)
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-8, atol=1e-12, msg=n)
    # with tied weights the embedding gets both the lookup's and the lm_head's gradient
    emb = student.get_input_embeddings().weight.grad
    assert emb is not None and emb.abs().sum() > 0


def test_fused_with_topk_teacher_and_ce_from_model():
    student, teacher = _tiny_llama(2), _tiny_llama(3)
    input_ids, attention_mask, labels = _batch()
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids).logits
    lps, ids = F.log_softmax(t_logits, -1).topk(8, -1)
    spec = LossSpec(divergence="reverse_kl", kd_ratio=0.5, tail_policy="tail_bucket")
    loss, m = fused_kd_loss_from_model(
        student, input_ids, attention_mask, labels, teacher=TeacherTopK(ids, lps), spec=spec
    )
    logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
    ref, _ = distillation_loss(
        spec.model_copy(update={"form": "sparse"}), student_logits=logits[:, :-1],
        teacher_topk_ids=ids[:, :-1], teacher_topk_logprobs=lps[:, :-1], labels=labels[:, 1:],
        mask=attention_mask[:, 1:].bool(),
    )
    torch.testing.assert_close(loss, ref)
    assert m["ce"] > 0 and m["kd/reverse_kl"] > 0


def test_lm_head_inputs_returns_the_tied_parameter():
    student = _tiny_llama(4)
    input_ids, attention_mask, _ = _batch()
    hidden, weight, bias = lm_head_inputs(student, input_ids, attention_mask)
    assert weight is student.model.embed_tokens.weight and bias is None
    torch.testing.assert_close(
        hidden @ weight.T, student(input_ids=input_ids, attention_mask=attention_mask).logits
    )


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op newly allocates (views and
    other aliases of an op's inputs, e.g. ``detach``/``reshape`` of the teacher logits, are
    not allocations and are skipped)."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        in_ptrs = {a.untyped_storage().data_ptr() for a in flat_in}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in in_ptrs:
                continue
            if t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


@pytest.mark.parametrize(
    ("spec_kw", "teacher_kind"),
    [({"divergence": "forward_kl"}, "hidden"), ({"divergence": "jsd"}, "hidden"),
     ({"divergence": "skew_reverse_kl", "ce_weight": 0.5, "temperature": 2.0}, "logits"),
     ({"divergence": "akl", "tail_policy": "tail_bucket"}, "topk"),
     ({"divergence": "tvd", "tail_policy": "uniform_tail"}, "topk")],
)
def test_fused_never_materializes_tokens_by_vocab(spec_kw, teacher_kind):
    """No op output (forward or backward) is as big as [tokens, vocab]; the dense form's is."""
    N, H, V, chunk = 64, 16, 512, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    if teacher_kind == "hidden":
        teacher = {"teacher_hidden": t_hidden, "teacher_lm_head_weight": t_weight}
    elif teacher_kind == "logits":
        teacher = {"teacher_logits": t_hidden @ t_weight.T}  # an input: held before the loss
    else:
        lps, ids = F.log_softmax(t_hidden @ t_weight.T, -1).topk(16, -1)
        teacher = {"teacher_topk_ids": ids, "teacher_topk_logprobs": lps}
    spec = LossSpec(form="fused", chunk_tokens=chunk, **spec_kw)
    with LargestTensor() as mode:
        loss, _ = distillation_loss(spec, student_hidden=hidden, lm_head_weight=weight, labels=labels, **teacher)
        loss.backward()
    # the lm_head gradient [V, H] is the largest legitimate tensor; [chunk, V] buffers are next
    assert mode.largest <= max(V * H, 4 * chunk * V), mode.shape
    assert mode.largest < N * V
    # the check can fail: the dense form does build [tokens, vocab]
    with LargestTensor() as dense_mode:
        logits = hidden @ weight.T
        dense, _ = distillation_loss(LossSpec(**spec_kw) if teacher_kind != "topk" else LossSpec(form="sparse", **spec_kw),
                                     student_logits=logits, labels=labels,
                                     **({"teacher_logits": t_hidden @ t_weight.T} if teacher_kind != "topk" else teacher))
        dense.backward()
    assert dense_mode.largest >= N * V


def test_fused_runs_in_bfloat16_close_to_float32_dense():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 16, generator=g)
    weight = torch.randn(100, 16, generator=g) * 0.3
    t_logits = torch.randn(3, 7, 100, generator=g)
    spec = LossSpec(divergence="jsd", beta=0.5)
    ref, _ = distillation_loss(spec, student_logits=hidden @ weight.T, teacher_logits=t_logits)
    h16 = hidden.bfloat16().requires_grad_()
    w16 = weight.bfloat16().requires_grad_()
    loss, _ = distillation_loss(
        spec.model_copy(update={"form": "fused", "chunk_tokens": 4}), student_hidden=h16,
        lm_head_weight=w16, teacher_logits=t_logits.bfloat16(),
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-3)
    loss.backward()
    assert w16.grad.dtype == torch.bfloat16 and torch.isfinite(w16.grad).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd"])  # lean path and generic path
def test_fused_with_sliced_teacher_logits_copies_no_full_tensor(divergence):
    """teacher_logits[:, :-1] is not contiguous: flattening it would copy [tokens, vocab]."""
    B, S, H, V = 4, 16, 8, 256
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S + 1, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    t_full = torch.randn(B, S + 1, V, generator=g)
    spec = LossSpec(divergence=divergence, form="fused", chunk_tokens=8)
    with LargestTensor() as mode:
        loss, _ = distillation_loss(spec, student_hidden=hidden[:, :-1], lm_head_weight=weight,
                                    teacher_logits=t_full[:, :-1])
        loss.backward()
    assert mode.largest < B * S * V, mode.shape
    ref, _ = distillation_loss(LossSpec(divergence=divergence), student_logits=hidden[:, :-1] @ weight.T,
                               teacher_logits=t_full[:, :-1])
    torch.testing.assert_close(loss, ref)
