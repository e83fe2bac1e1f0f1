"""Agreement with implementations no one here wrote (skipped where they are not installed)."""

from __future__ import annotations

import os

import pytest
import torch

from distillery.losses import LossSpec, distillation_loss


def _logits(seed, shape=(2, 6, 40), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _labels():
    labels = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(9))
    labels[0, :2] = -100
    labels[1, -1] = -100
    return labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl_generalized_jsd_loss(beta, temperature):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    gkd = pytest.importorskip("trl.experimental.gkd")
    zs = _logits(0).requires_grad_()
    zt = _logits(1)
    labels = _labels()
    theirs = gkd.GKDTrainer.generalized_jsd_loss(zs, zt, labels=labels, beta=beta, temperature=temperature)
    (g_theirs,) = torch.autograd.grad(theirs, zs)
    spec = LossSpec(divergence="jsd", beta=beta, temperature=temperature)
    ours, _ = distillation_loss(spec, student_logits=zs, teacher_logits=zt, labels=labels)
    (g_ours,) = torch.autograd.grad(ours, zs)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    # and the fused form, from hidden states, against TRL's chunked kernel (per token)
    chunked = pytest.importorskip("trl.kernels.chunked_divergence")
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(12, 8, generator=g), torch.randn(40, 8, generator=g)
    th, tw = torch.randn(12, 8, generator=g), torch.randn(40, 8, generator=g)
    per_token, _ = chunked.ChunkedDivergenceFunction.apply(h, w, None, th, tw, None, beta, temperature)
    fused, _ = distillation_loss(
        spec.model_copy(update={"form": "fused"}), student_hidden=h, lm_head_weight=w,
        teacher_hidden=th, teacher_lm_head_weight=tw,
    )
    torch.testing.assert_close(fused, per_token.mean(), rtol=1e-5, atol=1e-6)


def test_forward_kl_equals_torchtune_forward_kl_loss():
    losses = pytest.importorskip("torchtune.modules.loss")
    zs = _logits(4).requires_grad_()
    zt = _logits(5)
    labels = _labels()
    theirs = losses.ForwardKLLoss()(zs, zt, labels)
    # torchtune returns the soft cross-entropy −Σ p log q, i.e. KL(p‖q) + H(p): same gradient,
    # values differ by the teacher's entropy on the counted tokens
    ours, _ = distillation_loss(LossSpec(), student_logits=zs, teacher_logits=zt, labels=labels)
    p = zt.softmax(-1)
    entropy = -(p * p.log()).sum(-1)[labels != -100].mean()
    torch.testing.assert_close(ours + entropy, theirs.double(), rtol=1e-6, atol=1e-6)
    (g_theirs,) = torch.autograd.grad(theirs, zs)
    (g_ours,) = torch.autograd.grad(ours, zs)
    torch.testing.assert_close(g_ours, g_theirs.double(), rtol=1e-6, atol=1e-7)
