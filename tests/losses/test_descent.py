"""A few gradient steps on each divergence, in each form, bring the student toward the teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillery.losses import LossSpec, distillation_loss

from ._reference import CASES


@pytest.mark.parametrize("form", ["dense", "sparse", "fused"])
@pytest.mark.parametrize(("name", "params"), CASES)
def test_gradient_descent_reduces_the_loss(form, name, params):
    g = torch.Generator().manual_seed(0)
    V, H = 24, 8
    hidden = torch.randn(2, 6, H, generator=g)
    weight = torch.nn.Parameter(torch.randn(V, H, generator=g) * 0.3)
    t_logits = torch.randn(2, 6, V, generator=g) * 2
    lps, ids = F.log_softmax(t_logits, -1).topk(V, -1)
    kw = dict(params)
    if "normalize" in kw:
        kw["jsd_normalize"] = kw.pop("normalize")
    spec = LossSpec(divergence=name, form=form, chunk_tokens=5, temperature=1.5, **kw)
    opt = torch.optim.Adam([weight], lr=0.05)

    def loss_fn():
        if form == "fused":
            return distillation_loss(spec, student_hidden=hidden, lm_head_weight=weight, teacher_logits=t_logits)[0]
        logits = hidden @ weight.T
        if form == "dense":
            return distillation_loss(spec, student_logits=logits, teacher_logits=t_logits)[0]
        return distillation_loss(spec, student_logits=logits, teacher_topk_ids=ids, teacher_topk_logprobs=lps)[0]

    first = float(loss_fn().detach())
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    last = float(loss_fn().detach())
    assert last < 0.8 * first, (first, last)
