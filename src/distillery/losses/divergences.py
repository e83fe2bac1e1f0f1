"""Divergences between a teacher distribution p and a student distribution q, per token.

Every divergence here works on **log-probabilities over a shared support** (the last dim):
``log_p`` (teacher) and ``log_q`` (student), both ``[..., n]``, each row normalized. The support
is the vocabulary in the dense form, or the teacher's top-k ids (+ one tail bucket) in the
sparse form; the callers in :mod:`distillery.losses.forms` build it.

Each divergence comes in two halves, registered together by name (see ``REGISTRY``):

* ``value(log_p, log_q, **params) -> [...]``: the formula written with plain torch ops, so
  autograd differentiates it (the dense and sparse forms use this).
* ``value_and_grad(log_p, log_q, **params) -> ([...], a)``: the same value plus the closed form
  ``a = ∂D/∂(log q)`` treating each ``log q_v`` as a free coordinate (``q_v = exp(log q_v)``).
  The fused form turns ``a`` into the gradient wrt the student logits with
  ``∂D/∂z_j = a_j − q_j Σ_v a_v`` (the softmax Jacobian), so it never builds an autograd graph
  over ``[tokens, vocab]``. Tests check that both halves agree.

Terms with zero weight (``0·log 0``) count as 0, as in the math.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def upcast(x: Tensor) -> Tensor:
    """Half-precision logits to float32 (softmax over a big vocabulary needs it); others as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _xlogy_diff(w: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """``w · (log_a − log_b)`` with 0 where ``w == 0`` (so ``0·(−inf − x)`` is 0, not nan)."""
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.where(w > 0, w * (log_a - log_b), zero)


def _mixture_log(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(weight_a·a + (1 − weight_a)·b)`` computed stably from log-probabilities."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


# --------------------------------------------------------------------------------------------
# Values (autograd-friendly formulas)
# --------------------------------------------------------------------------------------------


def forward_kl_value(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v). Shapes: ``[..., n] -> [...]``."""
    return _xlogy_diff(log_p.exp(), log_p, log_q).sum(-1)


def reverse_kl_value(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(q‖p) = Σ_v q_v (log q_v − log p_v). Shapes: ``[..., n] -> [...]``."""
    return _xlogy_diff(log_q.exp(), log_q, log_p).sum(-1)


def symmetric_kl_value(log_p: Tensor, log_q: Tensor, beta: float = 0.5) -> Tensor:
    """(1 − β)·KL(p‖q) + β·KL(q‖p); β = 0.5 is half the Jeffreys divergence."""
    return (1.0 - beta) * forward_kl_value(log_p, log_q) + beta * reverse_kl_value(log_p, log_q)


def jsd_value(log_p: Tensor, log_q: Tensor, beta: float = 0.5, normalize: bool = False) -> Tensor:
    """Generalized Jensen-Shannon divergence, TRL/GKD convention (arXiv 2306.13649 eq. 1).

    With the mixture ``m = β·p + (1 − β)·q``::

        JSD_β(p, q) = β·KL(p‖m) + (1 − β)·KL(q‖m)        for 0 < β < 1
        JSD_0 = KL(p‖q) (forward),  JSD_1 = KL(q‖p) (reverse)   (endpoints special-cased)

    This is exactly ``trl``'s ``GKDTrainer.generalized_jsd_loss`` per token, endpoints included.
    Note the *limits* of the β-formula are not the endpoints: ``JSD_β → 0`` as β → 0 or 1,
    because ``JSD_β ≈ β·KL(p‖q)`` near 0 and ``≈ (1 − β)·KL(q‖p)`` near 1. With
    ``normalize=True`` the value is divided by ``β(1 − β)`` for 0 < β < 1, which makes the
    function continuous in β with ``lim_{β→0} = KL(p‖q)`` and ``lim_{β→1} = KL(q‖p)`` (and
    ``4·JSD`` at β = 0.5).
    """
    if beta <= 0.0:
        return forward_kl_value(log_p, log_q)
    if beta >= 1.0:
        return reverse_kl_value(log_p, log_q)
    log_m = _mixture_log(log_p, log_q, beta)
    value = beta * _xlogy_diff(log_p.exp(), log_p, log_m).sum(-1) + (1.0 - beta) * _xlogy_diff(
        log_q.exp(), log_q, log_m
    ).sum(-1)
    return value / (beta * (1.0 - beta)) if normalize else value


def skew_forward_kl_value(log_p: Tensor, log_q: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew forward KL (DistiLLM): KL(p ‖ α·p + (1 − α)·q). α → 0 gives KL(p‖q), α = 1 gives 0."""
    log_m = _mixture_log(log_p, log_q, alpha)
    return _xlogy_diff(log_p.exp(), log_p, log_m).sum(-1)


def skew_reverse_kl_value(log_p: Tensor, log_q: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ (1 − α)·p + α·q). α → 0 gives KL(q‖p), α = 1 gives 0."""
    log_m = _mixture_log(log_q, log_p, alpha)
    return _xlogy_diff(log_q.exp(), log_q, log_m).sum(-1)


def tvd_value(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Total variation distance ½ Σ_v |p_v − q_v| (in [0, 1])."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def akl_weights(log_p: Tensor, log_q: Tensor, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    """Head/tail weights of AKL (Wu et al. 2024, arXiv 2404.02657), detached, shapes ``[...]``.

    Sort the teacher's probabilities in descending order; the *head* is the smallest prefix whose
    cumulative mass reaches ``mu`` (token i is in the head iff the mass strictly before it is
    < mu, so the argmax always is). With ``g_head = Σ_head |p − q|`` and ``g_tail = Σ_tail |p − q|``
    the weights are ``g_head / (g_head + g_tail)`` (for forward KL, which fits the head) and
    ``g_tail / (g_head + g_tail)`` (for reverse KL, which fits the tail). If p = q both gaps are 0
    and we return (0.5, 0.5). The weights are computed without gradient, as in the paper's code.
    """
    with torch.no_grad():
        p = log_p.exp()
        gap = (p - log_q.exp()).abs()
        p_sorted, order = p.sort(dim=-1, descending=True)
        mass_before = p_sorted.cumsum(-1) - p_sorted
        head_sorted = mass_before < mu
        head = torch.zeros_like(head_sorted).scatter_(-1, order, head_sorted)
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        total = g_head + g_tail
        safe = total > 0
        half = torch.full_like(total, 0.5)
        w_head = torch.where(safe, g_head / torch.where(safe, total, 1.0), half)
        w_tail = torch.where(safe, g_tail / torch.where(safe, total, 1.0), half)
    return w_head, w_tail


def akl_value(log_p: Tensor, log_q: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL: ``w_head·KL(p‖q) + w_tail·KL(q‖p)`` with the detached weights of
    :func:`akl_weights`."""
    w_head, w_tail = akl_weights(log_p, log_q, mu)
    return w_head * forward_kl_value(log_p, log_q) + w_tail * reverse_kl_value(log_p, log_q)


# --------------------------------------------------------------------------------------------
# Values with the closed-form a = ∂D/∂(log q) (for the fused form; no autograd graph)
# --------------------------------------------------------------------------------------------


def forward_kl_grad(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """KL(p‖q) and a = −p."""
    p = log_p.exp()
    return _xlogy_diff(p, log_p, log_q).sum(-1), -p


def reverse_kl_grad(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """KL(q‖p) and a = q·(log q − log p + 1)."""
    q = log_q.exp()
    term = _xlogy_diff(q, log_q, log_p)
    return term.sum(-1), term + q


def symmetric_kl_grad(log_p: Tensor, log_q: Tensor, beta: float = 0.5) -> tuple[Tensor, Tensor]:
    """(1 − β)·KL(p‖q) + β·KL(q‖p) and its a."""
    vf, af = forward_kl_grad(log_p, log_q)
    vr, ar = reverse_kl_grad(log_p, log_q)
    return (1.0 - beta) * vf + beta * vr, (1.0 - beta) * af + beta * ar


def jsd_grad(
    log_p: Tensor, log_q: Tensor, beta: float = 0.5, normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """Generalized JSD and a = (1 − β)·q·(log q − log m) (the p-side terms cancel)."""
    if beta <= 0.0:
        return forward_kl_grad(log_p, log_q)
    if beta >= 1.0:
        return reverse_kl_grad(log_p, log_q)
    log_m = _mixture_log(log_p, log_q, beta)
    q_term = _xlogy_diff(log_q.exp(), log_q, log_m)
    value = beta * _xlogy_diff(log_p.exp(), log_p, log_m).sum(-1) + (1.0 - beta) * q_term.sum(-1)
    a = (1.0 - beta) * q_term
    if normalize:
        scale = 1.0 / (beta * (1.0 - beta))
        return value * scale, a * scale
    return value, a


def skew_forward_kl_grad(
    log_p: Tensor, log_q: Tensor, alpha: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Skew forward KL and a = −(1 − α)·p·q/m with m = α·p + (1 − α)·q."""
    log_m = _mixture_log(log_p, log_q, alpha)
    p = log_p.exp()
    value = _xlogy_diff(p, log_p, log_m).sum(-1)
    return value, -(1.0 - alpha) * p * (log_q - log_m).exp()


def skew_reverse_kl_grad(
    log_p: Tensor, log_q: Tensor, alpha: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Skew reverse KL and a = q·(log q − log m + (1 − α)·p/m) with m = (1 − α)·p + α·q."""
    log_m = _mixture_log(log_q, log_p, alpha)
    q = log_q.exp()
    term = _xlogy_diff(q, log_q, log_m)
    return term.sum(-1), term + (1.0 - alpha) * q * (log_p - log_m).exp()


def tvd_grad(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """TVD and a = ½·q·sign(q − p) (a subgradient where p = q)."""
    diff = log_q.exp() - log_p.exp()
    return 0.5 * diff.abs().sum(-1), 0.5 * log_q.exp() * diff.sign()


def akl_grad(log_p: Tensor, log_q: Tensor, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    """AKL and its a (weights held constant, as they are detached)."""
    w_head, w_tail = akl_weights(log_p, log_q, mu)
    vf, af = forward_kl_grad(log_p, log_q)
    vr, ar = reverse_kl_grad(log_p, log_q)
    wh, wt = w_head.unsqueeze(-1), w_tail.unsqueeze(-1)
    return w_head * vf + w_tail * vr, wh * af + wt * ar


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """A registered divergence: its two halves and the parameter names it takes."""

    name: str
    value: Callable[..., Tensor]
    value_and_grad: Callable[..., tuple[Tensor, Tensor]]
    params: tuple[str, ...] = field(default_factory=tuple)
    doc: str = ""

    def kwargs(self, **available: object) -> dict[str, object]:
        """Pick the parameters this divergence takes from ``available`` (``None`` = default)."""
        return {k: v for k, v in available.items() if k in self.params and v is not None}


REGISTRY: dict[str, Divergence] = {}


def register(div: Divergence) -> Divergence:
    """Add a divergence to the registry under ``div.name`` (configs refer to it by that name)."""
    if div.name in REGISTRY:
        raise ValueError(f"divergence {div.name!r} is already registered")
    REGISTRY[div.name] = div
    return div


def get_divergence(name: str) -> Divergence:
    """Look a divergence up by name; the error lists the valid names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r}; valid names: {', '.join(sorted(REGISTRY))}"
        ) from None


def available_divergences() -> list[str]:
    """Names of all registered divergences, sorted."""
    return sorted(REGISTRY)


for _div in (
    Divergence("forward_kl", forward_kl_value, forward_kl_grad, (), "KL(p‖q)"),
    Divergence("reverse_kl", reverse_kl_value, reverse_kl_grad, (), "KL(q‖p)"),
    Divergence(
        "symmetric_kl", symmetric_kl_value, symmetric_kl_grad, ("beta",), "(1−β)KL(p‖q)+βKL(q‖p)"
    ),
    Divergence("jsd", jsd_value, jsd_grad, ("beta", "normalize"), "generalized JSD (TRL/GKD)"),
    Divergence(
        "skew_forward_kl", skew_forward_kl_value, skew_forward_kl_grad, ("alpha",), "KL(p‖αp+(1−α)q)"
    ),
    Divergence(
        "skew_reverse_kl", skew_reverse_kl_value, skew_reverse_kl_grad, ("alpha",), "KL(q‖(1−α)p+αq)"
    ),
    Divergence("tvd", tvd_value, tvd_grad, (), "½Σ|p−q|"),
    Divergence("akl", akl_value, akl_grad, ("mu",), "adaptive KL (Wu et al. 2024)"),
):
    register(_div)


# --------------------------------------------------------------------------------------------
# Backward-compatible convenience function (used by the training loop)
# --------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "token",
) -> Tensor:
    """KL(p_teacher ‖ q_student) from logits, averaged over counted positions.

    student_logits, teacher_logits: ``[batch, seq, vocab]`` (already aligned: position t of both
    predicts the same target); mask: ``[batch, seq]`` bool, True = counted. Both sides are divided
    by ``temperature`` before the softmax; no T² factor. ``reduction``: ``"token"`` (mean over all
    counted tokens) or ``"sequence"`` (mean within each sequence, then over sequences).
    """
    from distillery.losses.reduce import reduce_per_token

    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    return reduce_per_token(forward_kl_value(log_p, log_q), mask, reduction)
