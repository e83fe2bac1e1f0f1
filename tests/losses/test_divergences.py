"""Each divergence against its float64 reference, its closed-form gradient, and its properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.losses import available_divergences, forward_kl, get_divergence
from distillery.losses.divergences import akl_weights

from ._reference import CASES, REFERENCES

NAMES = ["forward_kl", "reverse_kl", "symmetric_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl"]


def test_registry_has_every_named_divergence():
    assert sorted(NAMES) == available_divergences()
    with pytest.raises(ValueError, match="valid names: akl, forward_kl"):
        get_divergence("kl")


def _logits(shape, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_value_matches_float64_reference(name, params):
    zt, zs = _logits((3, 5, 50), 0), _logits((3, 5, 50), 1)
    p, q = zt.softmax(-1), zs.softmax(-1)
    ref = REFERENCES[name](p, q, **params)
    div = get_divergence(name)
    # float32 against the float64 reference
    got = div.value(F.log_softmax(zt.float(), -1), F.log_softmax(zs.float(), -1), **params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    got64 = div.value(F.log_softmax(zt, -1), F.log_softmax(zs, -1), **params)
    torch.testing.assert_close(got64, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_closed_form_gradient_matches_autograd(name, params):
    """``value_and_grad``'s a = ∂D/∂log q gives the same logit gradient as autograd."""
    zt = _logits((4, 30), 2)
    zs = _logits((4, 30), 3).requires_grad_()
    div = get_divergence(name)
    log_p, log_q = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    value = div.value(log_p, log_q, **params)
    (auto,) = torch.autograd.grad(value.sum(), zs)
    v2, a = div.value_and_grad(log_p, log_q.detach(), **params)
    q = log_q.detach().exp()
    closed = a - q * a.sum(-1, keepdim=True)
    torch.testing.assert_close(v2, value.detach())
    torch.testing.assert_close(closed, auto, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_gradcheck(name, params):
    zt = _logits((2, 7), 4)
    zs = _logits((2, 7), 5).requires_grad_()
    div = get_divergence(name)

    def f(z):
        return div.value(F.log_softmax(zt, -1), F.log_softmax(z, -1), **params)

    if name == "akl":
        # AKL's head/tail weights are detached by design (stop-gradient, as in the paper's code),
        # so its gradient is that of w_head·FKL + w_tail·RKL with the weights held fixed.
        wh, wt = akl_weights(F.log_softmax(zt, -1), F.log_softmax(zs, -1), **params)
        fkl, rkl = get_divergence("forward_kl"), get_divergence("reverse_kl")

        def f(z):  # noqa: F811 - the fixed-weight version of the same function
            lp, lq = F.log_softmax(zt, -1), F.log_softmax(z, -1)
            return wh * fkl.value(lp, lq) + wt * rkl.value(lp, lq)

        torch.testing.assert_close(f(zs), div.value(F.log_softmax(zt, -1), F.log_softmax(zs, -1), **params))
        (ours,) = torch.autograd.grad(
            div.value(F.log_softmax(zt, -1), F.log_softmax(zs, -1), **params).sum(), zs
        )
        (fixed,) = torch.autograd.grad(f(zs).sum(), zs)
        torch.testing.assert_close(ours, fixed)

    assert torch.autograd.gradcheck(f, (zs,))


def test_forward_kl_backward_compatible_signature():
    zs, zt = _logits((2, 4, 11), 6), _logits((2, 4, 11), 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ref = REFERENCES["forward_kl"]((zt / 2).softmax(-1), (zs / 2).softmax(-1))
    tok = forward_kl(zs, zt, mask=mask, temperature=2.0)
    torch.testing.assert_close(tok, ref[mask].mean())
    seq = forward_kl(zs, zt, mask, 2.0, "sequence")
    torch.testing.assert_close(seq, (ref[0, :2].mean() + ref[1].mean()) / 2)
    ref1 = REFERENCES["forward_kl"](zt.softmax(-1), zs.softmax(-1))
    torch.testing.assert_close(forward_kl(zs, zt), ref1.mean())


# ---------------------------------------------------------------- properties (hypothesis)

vocab = st.integers(2, 12)


@st.composite
def pair(draw):
    n = draw(vocab)
    floats = st.floats(-6, 6, allow_nan=False, allow_infinity=False)
    zt = torch.tensor(draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float64)
    zs = torch.tensor(draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float64)
    return F.log_softmax(zt, -1), F.log_softmax(zs, -1)


@settings(max_examples=60, deadline=None)
@given(pair(), st.sampled_from(CASES))
def test_non_negative_and_zero_on_equal(lp_lq, case):
    name, params = case
    log_p, log_q = lp_lq
    div = get_divergence(name)
    assert div.value(log_p, log_q, **params) >= -1e-12
    assert abs(float(div.value(log_p, log_p.clone(), **params))) < 1e-12


@settings(max_examples=60, deadline=None)
@given(pair(), st.sampled_from(CASES))
def test_positive_when_distributions_differ(lp_lq, case):
    """Zero *only* when equal: a clearly different pair gives a clearly positive value."""
    name, params = case
    log_p, log_q = lp_lq
    if (log_p.exp() - log_q.exp()).abs().max() < 1e-3:
        return
    if name in ("skew_forward_kl", "skew_reverse_kl") and params.get("alpha") == 1.0:
        return
    if name == "jsd" and 0 < params.get("beta", 0.5) < 1 and params.get("beta") in (0.1, 0.9):
        floor = 1e-10
    else:
        floor = 1e-9
    assert float(get_divergence(name).value(log_p, log_q, **params)) > floor


@settings(max_examples=60, deadline=None)
@given(pair())
def test_jsd_symmetric_at_half(lp_lq):
    log_p, log_q = lp_lq
    jsd = get_divergence("jsd")
    torch.testing.assert_close(jsd.value(log_p, log_q, beta=0.5), jsd.value(log_q, log_p, beta=0.5))


@settings(max_examples=40, deadline=None)
@given(pair())
def test_beta_and_alpha_limits_are_the_named_kls(lp_lq):
    log_p, log_q = lp_lq
    fkl = get_divergence("forward_kl").value(log_p, log_q)
    rkl = get_divergence("reverse_kl").value(log_p, log_q)
    jsd = get_divergence("jsd")
    # the gap to the limit is O(eps·χ²(p‖q)) (χ² reaches ~1e5 on this domain) and float64
    # cancellation adds O(1e-16 / eps)
    eps = 1e-8
    tol = dict(rtol=1e-3, atol=1e-6)
    # normalized JSD: continuous in β, limits are the KLs
    torch.testing.assert_close(jsd.value(log_p, log_q, beta=eps, normalize=True), fkl, **tol)
    torch.testing.assert_close(jsd.value(log_p, log_q, beta=1 - eps, normalize=True), rkl, **tol)
    # TRL-convention JSD: the endpoints are the KLs, the β-formula itself tends to β·KL
    torch.testing.assert_close(jsd.value(log_p, log_q, beta=0.0), fkl)
    torch.testing.assert_close(jsd.value(log_p, log_q, beta=1.0), rkl)
    torch.testing.assert_close(jsd.value(log_p, log_q, beta=eps) / eps, fkl, **tol)
    # skew KLs: α → 0 gives the KLs; α = 1 gives 0
    sf, sr = get_divergence("skew_forward_kl"), get_divergence("skew_reverse_kl")
    torch.testing.assert_close(sf.value(log_p, log_q, alpha=eps), fkl, **tol)
    torch.testing.assert_close(sr.value(log_p, log_q, alpha=eps), rkl, **tol)
    torch.testing.assert_close(sf.value(log_p, log_q, alpha=0.0), fkl)
    torch.testing.assert_close(sr.value(log_p, log_q, alpha=0.0), rkl)
    assert abs(float(sf.value(log_p, log_q, alpha=1.0))) < 1e-12
    # symmetric KL: β = 0 / 1 are the KLs
    sym = get_divergence("symmetric_kl")
    torch.testing.assert_close(sym.value(log_p, log_q, beta=0.0), fkl)
    torch.testing.assert_close(sym.value(log_p, log_q, beta=1.0), rkl)


def test_tvd_bounded_and_akl_between_kls():
    log_p, log_q = F.log_softmax(_logits((64, 20), 8), -1), F.log_softmax(_logits((64, 20), 9), -1)
    tvd = get_divergence("tvd").value(log_p, log_q)
    assert (tvd <= 1).all() and (tvd > 0).all()
    akl = get_divergence("akl").value(log_p, log_q)
    fkl = get_divergence("forward_kl").value(log_p, log_q)
    rkl = get_divergence("reverse_kl").value(log_p, log_q)
    assert (akl <= torch.maximum(fkl, rkl) + 1e-12).all()
    assert (akl >= torch.minimum(fkl, rkl) - 1e-12).all()
