"""Dense, sparse (top-k teacher) and fused-linear forms: same numbers, same gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.losses import (
    LossSpec,
    TeacherLogits,
    TeacherTopK,
    distillation_loss,
    fused_linear_kd,
)

from ._reference import CASES, REFERENCES, kl

B, S, H, V = 2, 5, 6, 13


def _setup(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).requires_grad_() if bias else None
    t_hidden = torch.randn(B, S, 4, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, 4, generator=g, dtype=torch.float64) * 1.5
    t_logits = t_hidden @ t_weight.T
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :2] = -100  # a prompt
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, -1] = False  # padding
    return hidden, weight, b, t_hidden, t_weight, t_logits, labels, mask


def _full_topk(t_logits):
    """Top-k with k = V, in a scrambled order, with a (zero) tail."""
    lp = F.log_softmax(t_logits, -1)
    vals, ids = lp.sort(-1, descending=True)
    return ids, vals, torch.full(t_logits.shape[:-1], float("-inf"), dtype=t_logits.dtype)


def _params(name, params):
    spec_kw = {"divergence": name}
    if "normalize" in params:
        spec_kw["jsd_normalize"] = params["normalize"]
    spec_kw.update({k: v for k, v in params.items() if k != "normalize"})
    return spec_kw


def _all_forms(spec_kw, seed=0):
    """(loss, grads) for every form and teacher input; grads wrt (hidden, weight, bias)."""
    hidden, weight, b, t_hidden, t_weight, t_logits, labels, mask = _setup(seed)
    ids, lps, tail = _full_topk(t_logits)
    out = {}

    def run(key, form, **kw):
        spec = LossSpec(form=form, chunk_tokens=3, **spec_kw)
        if form != "fused":
            kw["student_logits"] = F.linear(hidden, weight, b)
        else:
            kw.update(student_hidden=hidden, lm_head_weight=weight, lm_head_bias=b)
        loss, metrics = distillation_loss(spec, labels=labels, mask=mask, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
        out[key] = (loss.detach(), grads, metrics)

    run("dense", "dense", teacher_logits=t_logits)
    for pol in ("renormalize", "tail_bucket", "uniform_tail"):
        topk = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lps, teacher_log_tail=tail)
        spec_pol = dict(spec_kw, tail_policy=pol)
        for form in ("sparse", "fused"):
            spec = LossSpec(form=form, chunk_tokens=3, **spec_pol)
            kw = dict(topk)
            if form == "sparse":
                kw["student_logits"] = F.linear(hidden, weight, b)
            else:
                kw.update(student_hidden=hidden, lm_head_weight=weight, lm_head_bias=b)
            loss, metrics = distillation_loss(spec, labels=labels, mask=mask, **kw)
            out[f"{form}/{pol}"] = (loss.detach(), torch.autograd.grad(loss, (hidden, weight, b)), metrics)
    run("fused/logits", "fused", teacher_logits=t_logits)
    run("fused/hidden", "fused", teacher_hidden=t_hidden, teacher_lm_head_weight=t_weight)
    return out


FORM_CASES = CASES + [("forward_kl", {"temperature": 2.0, "ce_weight": 0.3}),
                      ("forward_kl", {"ce_weight": 0.3, "kd_weight": 0.6}),
                      ("reverse_kl", {"ce_weight": 0.4, "temperature": 1.0}),
                      ("jsd", {"beta": 0.4, "ce_weight": 0.2, "kd_weight": 0.7}),
                      ("jsd", {"beta": 0.3, "temperature": 0.7, "reduction": "sequence"})]


@pytest.mark.parametrize(("name", "params"), FORM_CASES)
def test_every_form_gives_the_same_value_and_gradients(name, params):
    out = _all_forms(_params(name, params))
    ref_loss, ref_grads, ref_metrics = out.pop("dense")
    assert ref_loss > 0
    for key, (loss, grads, metrics) in out.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-9, msg=key)
        for g, rg in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-9, msg=key)
        assert metrics.keys() == ref_metrics.keys()
        for k in metrics:
            assert math.isclose(metrics[k], ref_metrics[k], rel_tol=1e-6, abs_tol=1e-9), (key, k)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd"])
def test_dense_loss_matches_reference_with_mask_temperature_and_ce(name):
    hidden, weight, b, _, _, t_logits, labels, mask = _setup(1)
    zs = F.linear(hidden, weight, b).detach()
    T, ce_w = 2.0, 0.25
    spec = LossSpec(divergence=name, temperature=T, ce_weight=ce_w, kd_weight=0.5, scale_by_t2=True)
    loss, metrics = distillation_loss(spec, student_logits=zs, teacher_logits=t_logits, labels=labels, mask=mask)
    per = REFERENCES[name]((t_logits / T).softmax(-1), (zs / T).softmax(-1))
    ce = -torch.log_softmax(zs, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    counted = mask & (labels != -100)
    expected = (0.5 * T**2 * per + ce_w * ce)[counted].mean()
    torch.testing.assert_close(loss, expected)
    assert metrics["tokens"] == counted.sum()
    assert math.isclose(metrics[f"kd/{name}"], float(per[counted].mean()), rel_tol=1e-9)
    assert math.isclose(metrics["ce"], float(ce[counted].mean()), rel_tol=1e-9)
    # per-sequence reduction: mean within each sequence, then over sequences
    seq_spec = spec.model_copy(update={"reduction": "sequence"})
    loss_seq, _ = distillation_loss(seq_spec, student_logits=zs, teacher_logits=t_logits, labels=labels, mask=mask)
    per_tok = 0.5 * T**2 * per + ce_w * ce
    expected_seq = torch.stack([per_tok[i][counted[i]].mean() for i in range(B)]).mean()
    torch.testing.assert_close(loss_seq, expected_seq)


def test_kd_ratio_is_torchtunes_mix():
    hidden, weight, b, _, _, t_logits, labels, mask = _setup(2)
    zs = F.linear(hidden, weight, b).detach()
    a, _ = distillation_loss(LossSpec(kd_ratio=0.4), student_logits=zs, teacher_logits=t_logits, labels=labels)
    c, _ = distillation_loss(LossSpec(ce_weight=0.6, kd_weight=0.4), student_logits=zs, teacher_logits=t_logits, labels=labels)
    ce = F.cross_entropy(zs.reshape(-1, V), labels.reshape(-1))
    kd, _ = distillation_loss(LossSpec(), student_logits=zs, teacher_logits=t_logits, labels=labels)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, 0.6 * ce + 0.4 * kd)


def test_mix_of_divergences_is_the_weighted_sum():
    hidden, weight, b, _, _, t_logits, labels, mask = _setup(3)
    zs = F.linear(hidden, weight, b).detach()
    mix = LossSpec(mix=[{"divergence": "forward_kl", "weight": 0.7}, {"divergence": "jsd", "weight": 0.3, "beta": 0.2}])
    got, metrics = distillation_loss(mix, student_logits=zs, teacher_logits=t_logits, mask=mask)
    f, _ = distillation_loss(LossSpec(), student_logits=zs, teacher_logits=t_logits, mask=mask)
    j, _ = distillation_loss(LossSpec(divergence="jsd", beta=0.2), student_logits=zs, teacher_logits=t_logits, mask=mask)
    torch.testing.assert_close(got, 0.7 * f + 0.3 * j)
    assert {"kd/forward_kl", "kd/jsd", "loss", "tokens"} == set(metrics)


def test_tail_policies_with_a_real_tail_match_their_definitions():
    """k < V: each policy against its definition written out on probabilities."""
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(3, V, generator=g, dtype=torch.float64)
    zt = torch.randn(3, V, generator=g, dtype=torch.float64) * 2
    k = 4
    p = zt.softmax(-1)
    top_p, ids = p.topk(k, dim=-1)
    tail = 1 - top_p.sum(-1)
    q = zs.softmax(-1)
    q_k = q.gather(-1, ids)
    expected = {
        "renormalize": kl(top_p / top_p.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)),
        "tail_bucket": kl(torch.cat([top_p, tail[:, None]], -1), torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)),
        "uniform_tail": kl(
            torch.full_like(p, 0).add(tail[:, None] / (V - k)).scatter(-1, ids, top_p), q
        ),
    }
    for pol, exp in expected.items():
        for with_tail in (True, False):
            spec = LossSpec(form="sparse", tail_policy=pol)
            loss, _ = distillation_loss(
                spec, student_logits=zs[None], teacher_topk_ids=ids[None],
                teacher_topk_logprobs=top_p.log()[None],
                teacher_log_tail=tail.log()[None] if with_tail else None,
            )
            torch.testing.assert_close(loss, exp.mean(), msg=pol)


@pytest.mark.parametrize("pol", ["renormalize", "tail_bucket", "uniform_tail"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "akl", "tvd", "skew_reverse_kl"])
def test_fused_topk_with_small_k_matches_sparse(pol, name):
    hidden, weight, b, _, _, t_logits, labels, mask = _setup(5)
    lp = F.log_softmax(t_logits, -1)
    lps, ids = lp.topk(4, -1)
    spec = dict(divergence=name, tail_policy=pol, temperature=1.5)
    topk = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    a, _ = distillation_loss(LossSpec(form="sparse", **spec), student_logits=F.linear(hidden, weight, b), mask=mask, **topk)
    ga = torch.autograd.grad(a, (hidden, weight, b))
    c, _ = distillation_loss(LossSpec(form="fused", chunk_tokens=4, **spec), student_hidden=hidden, lm_head_weight=weight, lm_head_bias=b, mask=mask, **topk)
    gc = torch.autograd.grad(c, (hidden, weight, b))
    torch.testing.assert_close(c, a)
    for x, y in zip(gc, ga, strict=True):
        torch.testing.assert_close(x, y)


ONE_PER_DIVERGENCE = [c for i, c in enumerate(CASES) if c[0] != "akl" and c[0] not in [x[0] for x in CASES[:i]]]
ONE_PER_DIVERGENCE.append(("jsd", {"beta": 0.9, "normalize": True}))


@pytest.mark.parametrize(("name", "params"), ONE_PER_DIVERGENCE)
def test_gradcheck_dense_sparse_fused(name, params):
    """gradcheck in float64 for the three forms (AKL: weights are stop-gradient, see
    test_divergences; its fused gradient is compared with autograd in the form tests)."""
    hidden, weight, b, t_hidden, t_weight, t_logits, labels, mask = _setup(6)
    hidden, weight, b = hidden[:1, :3].detach()[..., :4], weight.detach()[:7, :4], b.detach()[:7]
    t_logits = t_logits[:1, :3, :7]
    lps, ids = F.log_softmax(t_logits, -1).topk(3, -1)
    kw = _params(name, params)
    dense = LossSpec(**kw)
    sparse = LossSpec(form="sparse", **kw)
    fused = LossSpec(form="fused", chunk_tokens=2, **kw)
    args = (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), b.clone().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda h, w, bb: distillation_loss(dense, student_logits=F.linear(h, w, bb), teacher_logits=t_logits)[0], args, fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda h, w, bb: distillation_loss(
            sparse, student_logits=F.linear(h, w, bb), teacher_topk_ids=ids, teacher_topk_logprobs=lps
        )[0], args, fast_mode=True,
    )
    # gradcheck runs several backwards on one graph: reusable=True keeps the stashed grads
    terms = fused.terms()
    for teacher in (TeacherLogits(t_logits), TeacherTopK(ids, lps)):
        assert torch.autograd.gradcheck(
            lambda h, w, bb, teacher=teacher: fused_linear_kd(
                h, w, teacher, terms, bias=bb, chunk_tokens=2, reusable=True
            )[0], args, fast_mode=True,
        )


def test_no_counted_token_gives_zero_loss_and_zero_grads():
    hidden, weight, b, _, _, t_logits, _, _ = _setup(7)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for form, kw in (("dense", dict(student_logits=F.linear(hidden, weight, b))),
                     ("fused", dict(student_hidden=hidden, lm_head_weight=weight, lm_head_bias=b))):
        loss, m = distillation_loss(LossSpec(form=form), teacher_logits=t_logits, mask=mask, **kw)
        assert float(loss.detach()) == 0.0 and m["tokens"] == 0
        g = torch.autograd.grad(loss, (hidden, weight), allow_unused=True)
        assert all(x is None or not x.any() for x in g)


@pytest.mark.parametrize(("name", "params"), [
    ("forward_kl", {"temperature": 2.0}), ("reverse_kl", {"ce_weight": 0.5}),
    ("jsd", {"beta": 0.3, "ce_weight": 0.2}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
])
def test_lean_fused_path_runs_alone_and_agrees(monkeypatch, name, params):
    """The in-place kernels handle these specs without the generic chunk (which we break)."""
    from distillery.losses import fused

    expected = _all_forms(_params(name, params))["dense"]

    def broken(*a, **k):
        raise AssertionError("generic path used")

    monkeypatch.setattr(fused, "_chunk", broken)
    monkeypatch.setattr(fused, "LEAN_ROW_BLOCK", 2)  # several row blocks per chunk, one ragged
    hidden, weight, b, t_hidden, t_weight, t_logits, labels, mask = _setup(0)
    spec = LossSpec(form="fused", chunk_tokens=5, **_params(name, params))
    for teacher in (dict(teacher_logits=t_logits), dict(teacher_hidden=t_hidden, teacher_lm_head_weight=t_weight)):
        loss, _ = distillation_loss(spec, student_hidden=hidden, lm_head_weight=weight, lm_head_bias=b,
                                    labels=labels, mask=mask, **teacher)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
        torch.testing.assert_close(loss.detach(), expected[0])
        for g, e in zip(grads, expected[1], strict=True):
            torch.testing.assert_close(g, e)


def test_lean_path_falls_back_on_minus_inf_teacher_logits():
    hidden, weight, b, _, _, t_logits, labels, mask = _setup(0)
    t_logits = t_logits.clone()
    t_logits[..., 3] = float("-inf")  # a banned token
    dense, _ = distillation_loss(LossSpec(), student_logits=F.linear(hidden, weight, b), teacher_logits=t_logits, mask=mask)
    fused_loss, _ = distillation_loss(LossSpec(form="fused"), student_hidden=hidden, lm_head_weight=weight,
                                      lm_head_bias=b, teacher_logits=t_logits, mask=mask)
    assert torch.isfinite(dense)
    torch.testing.assert_close(fused_loss, dense)
