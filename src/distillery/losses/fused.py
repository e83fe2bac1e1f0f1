"""Fused linear form: the student's lm_head projection and the loss in one chunked pass.

The student gives hidden states ``[tokens, hidden]`` (or ``[batch, seq, hidden]``) and its
lm_head ``weight [vocab, hidden]`` (+ optional ``bias [vocab]``); the teacher gives full logits,
or top-k (ids, log-probs, log tail), or its own hidden states + lm_head. The loss is computed over
chunks of ``chunk_tokens`` counted tokens inside one ``torch.autograd.Function``:

* per chunk: ``z = h_c @ W.T`` (``[chunk, vocab]``), the log-softmaxes, each divergence's value
  and its closed-form gradient wrt ``log q`` (see :mod:`distillery.losses.divergences`), turned
  into ``g = ∂loss/∂z`` through the softmax Jacobian; then ``grad_h_c = g @ W`` and
  ``grad_W += g.T @ h_c`` in place. The gradients are computed in the forward pass and stashed
  (``grad_W`` is one ``[vocab, hidden]`` tensor, the size of the weight), so backward only scales
  them by the incoming gradient. No ``[tokens, vocab]`` tensor ever exists and there is no
  autograd graph over the logits; peak extra memory ≈ ``grad_W`` + a few ``[chunk, vocab]``
  buffers.
* uncounted positions (prompt, padding) are skipped: they cost nothing and get zero gradient.
* the teacher gets no gradient (it is frozen); its tensors are read under ``no_grad``.

Tied embeddings work as is: the lm_head weight is the embedding Parameter, and autograd adds
this function's ``grad_W`` to the embedding's gradient. Backward can run once per forward (the
stash is handed to autograd to avoid a 1 GB copy at large vocabularies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillery.logits.topk import TeacherTopK
from distillery.losses.divergences import upcast
from distillery.losses.forms import sparse_teacher_log_probs
from distillery.losses.reduce import resolve_mask, token_weights
from distillery.losses.terms import Term


@dataclass
class TeacherLogits:
    """Teacher as full logits ``[batch, seq, vocab]`` or ``[tokens, vocab]``."""

    logits: torch.Tensor


@dataclass
class TeacherHidden:
    """Teacher as hidden states ``[batch, seq, hidden_t]`` (or ``[tokens, hidden_t]``) and its
    lm_head ``weight [vocab, hidden_t]`` (+ ``bias [vocab]``)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


Teacher = TeacherLogits | TeacherTopK | TeacherHidden


@dataclass
class _Plan:
    """Everything the autograd Function needs besides the student's tensors."""

    teacher: Teacher
    terms: list[Term]
    temperature: float
    ce_weight: float
    labels: torch.Tensor | None  # [tokens], only read when ce_weight > 0
    weights: torch.Tensor  # [tokens], reduction weights, 0 for uncounted
    rows: torch.Tensor  # [counted] indices of counted tokens
    chunk_tokens: int
    tail_policy: str
    need_grad: bool
    reusable: bool = False  # keep the stash so backward can run more than once


def _flat(x: torch.Tensor, trailing: int) -> torch.Tensor:
    """Merge the leading dims, keeping ``trailing`` trailing dims."""
    return x.reshape(-1, *x.shape[x.dim() - trailing :]) if trailing else x.reshape(-1)


def _take(x: torch.Tensor, rows: torch.Tensor, trailing: int) -> torch.Tensor:
    """Rows ``rows`` (indices over the merged leading dims) of ``x``, without copying the rest.

    ``reshape`` of a non-contiguous tensor (e.g. ``teacher_logits[:, :-1]``) would copy all of
    it, a full ``[tokens, vocab]`` tensor; indexing by the unravelled positions copies only the
    chunk.
    """
    lead = x.dim() - trailing
    if lead == 1 or x.is_contiguous():
        return _flat(x, trailing).index_select(0, rows)
    return x[torch.unravel_index(rows, tuple(x.shape[:lead]))]


def _teacher_log_p(plan: _Plan, rows: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's log-probabilities for the chunk's rows, over the form's support."""
    t, temp = plan.teacher, plan.temperature
    if isinstance(t, TeacherLogits):
        z = upcast(_take(t.logits, rows, 1)).to(dtype)
    elif isinstance(t, TeacherHidden):
        h = _take(t.hidden, rows, 1)
        z = upcast(F.linear(h, t.weight, t.bias)).to(dtype)
    else:
        ids = _take(t.ids, rows, 1).long()
        lp = _take(t.logprobs, rows, 1)
        tail = None if t.log_tail is None else _take(t.log_tail, rows, 0)
        return sparse_teacher_log_probs(ids, lp, tail, plan.tail_policy, temp, vocab).to(dtype)
    if temp != 1.0:
        z.div_(temp)
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


def _chunk(
    plan: _Plan, h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    rows: torch.Tensor, parts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss contribution of one chunk (scalar) and ``g = ∂loss/∂z`` ``[chunk, vocab]``.

    ``parts`` (``[n_terms + 1]``) accumulates each reduced divergence and the CE, for metrics.
    """
    temp, vocab = plan.temperature, weight.shape[0]
    z = upcast(F.linear(h_c, weight, bias))
    dtype = z.dtype
    w_c = plan.weights.index_select(0, rows).to(dtype)
    # student log q at temperature T over the full vocabulary
    s = z / temp if temp != 1.0 else z
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    log_q_full = s - lse
    if s is not z:
        del s
    log_p = _teacher_log_p(plan, rows, vocab, dtype)

    # the student's log q over the teacher's support, and how it maps back to the vocabulary
    mapping, ids = "full", None
    if isinstance(plan.teacher, TeacherTopK) and plan.tail_policy != "uniform_tail":
        ids = _take(plan.teacher.ids, rows, 1).long()
        k = ids.shape[-1]
        if plan.tail_policy == "renormalize" or k == vocab:
            mapping = "gather"
            log_q = F.log_softmax(log_q_full.gather(-1, ids), dim=-1)
        else:
            mapping = "bucket"
            outside = log_q_full.scatter(-1, ids, float("-inf"))
            log_bucket = torch.logsumexp(outside, dim=-1, keepdim=True)
            del outside
            log_q = torch.cat([log_q_full.gather(-1, ids), log_bucket], dim=-1)
    else:
        log_q = log_q_full

    total = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
    a_sum: torch.Tensor | None = None
    for i, term in enumerate(plan.terms):
        if plan.need_grad:
            value, a = term.divergence.value_and_grad(log_p, log_q, **term.params)
            a_sum = a.mul_(term.weight) if a_sum is None else a_sum.add_(a, alpha=term.weight)
            del a
        else:
            value = term.divergence.value(log_p, log_q, **term.params)
        parts[i] += (w_c * value).sum()
        total += term.weight * value
    del log_p

    ce = None
    if plan.ce_weight:
        labels = plan.labels.index_select(0, rows).long()
        # CE is at T = 1, on the raw logits
        lse1 = lse if temp == 1.0 else torch.logsumexp(z, dim=-1, keepdim=True)
        ce = (lse1 - z.gather(-1, labels.unsqueeze(-1))).squeeze(-1)
        parts[-1] += (w_c * ce).sum()
        total += plan.ce_weight * ce
    loss = (w_c * total).sum()
    if not plan.need_grad:
        return loss, None

    # g over s = z / T through the softmax Jacobian: ∂D/∂s_j = a_j − q_j Σ a (per support type)
    if a_sum is None:
        g = torch.zeros_like(z)
    elif mapping == "full":
        a_tot = a_sum.sum(-1, keepdim=True)
        g = a_sum.sub_(log_q_full.exp_().mul_(a_tot))
    elif mapping == "gather":
        gk = a_sum - log_q.exp() * a_sum.sum(-1, keepdim=True)
        g = torch.zeros_like(z).scatter_(-1, ids, gk)
    else:
        k = ids.shape[-1]
        a_tot = a_sum.sum(-1, keepdim=True)
        a_bucket = a_sum[:, k:]
        q = log_q_full.exp_()
        # off-top-k ids feel the bucket: ∂log q_B/∂s_j = q_j / q_B − q_j
        g = q * (a_bucket * torch.exp(-log_q[:, k:]) - a_tot)
        g.scatter_(-1, ids, a_sum[:, :k] - q.gather(-1, ids) * a_tot)
    del log_q_full, log_q
    if temp != 1.0:
        g.div_(temp)
    if ce is not None:
        # ∂CE/∂z = softmax(z) − onehot(label)
        p1 = torch.softmax(z, dim=-1)
        p1.scatter_add_(-1, labels.unsqueeze(-1), -torch.ones_like(labels, dtype=dtype).unsqueeze(-1))
        g.add_(p1, alpha=plan.ce_weight)
        del p1
    del z
    g.mul_(w_c.unsqueeze(-1))
    return loss, g


# --------------------------------------------------------------------------------------------
# Lean path: forward KL, reverse KL and JSD against a dense teacher, in preallocated buffers.
# Every op is in place or writes into one of 3-4 reused [chunk, vocab] buffers: fresh
# allocations of that size cost page faults on CPU and raise the peak. Same math as
# ``_chunk`` (the tests compare the two); anything else takes ``_chunk``.
# --------------------------------------------------------------------------------------------


def _lean_kind(plan: _Plan, weight: torch.Tensor) -> str | None:
    """Which lean kernel applies to this plan, if any."""
    if (
        not plan.need_grad
        or isinstance(plan.teacher, TeacherTopK)
        or len(plan.terms) != 1
        or weight.dtype not in (torch.float32, torch.float64)
        or (plan.ce_weight and plan.temperature != 1.0)
        # a teacher in another dtype would need a cast copy of its lm_head per chunk
        or (isinstance(plan.teacher, TeacherHidden) and plan.teacher.weight.dtype != weight.dtype)
        or (isinstance(plan.teacher, TeacherLogits) and plan.teacher.logits.dtype != weight.dtype)
    ):
        return None
    term = plan.terms[0]
    if term.name == "forward_kl":
        return "fkl"
    if term.name == "reverse_kl":
        return "rkl"
    if term.name == "jsd" and not term.params.get("normalize", False):
        beta = float(term.params.get("beta", 0.5))
        return "fkl" if beta <= 0.0 else "rkl" if beta >= 1.0 else "jsd"
    return None


def _log_softmax_into(x: torch.Tensor, tmp: torch.Tensor, temperature: float) -> torch.Tensor:
    """In place: ``x <- log_softmax(x / T)``, using ``tmp`` (same shape) as scratch.

    Leaves ``tmp = exp(x/T − max)`` and returns its row sums ``[n, 1]``, so that
    ``tmp / sums`` is the softmax without another exp.
    """
    if temperature != 1.0:
        x.mul_(1.0 / temperature)
    top = x.amax(-1, keepdim=True)
    torch.sub(x, top, out=tmp)
    tmp.exp_()
    sums = tmp.sum(-1, keepdim=True)
    x.sub_(sums.log().add_(top))
    return sums


LEAN_ROW_BLOCK = 16  # rows per elementwise block: [16, vocab] scratch stays small and cache-warm


def _lean_chunk(
    plan: _Plan, kind: str, h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    rows: torch.Tensor, parts: torch.Tensor, bufs: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Like :func:`_chunk` (same returns; ``g`` is a view of ``bufs[0]``) for the lean kinds.

    ``bufs``: two ``[chunk, vocab]`` buffers (student logits, which become ``g``, and teacher
    logits) and two ``[LEAN_ROW_BLOCK, vocab]`` scratch buffers; the elementwise work runs
    block by block of rows, so the big buffers are only the two the matmuls need.

    Returns None (and leaves ``parts`` alone) if a value is not finite, e.g. ``-inf`` teacher
    logits; the caller then redoes the chunk with :func:`_chunk`, which handles them.
    """
    n = h_c.shape[0]
    z, p = bufs[0][:n], bufs[1][:n]
    torch.mm(h_c, weight.t(), out=z)
    if bias is not None:
        z.add_(bias)
    t = plan.teacher
    if isinstance(t, TeacherLogits):
        if t.logits.is_contiguous():
            torch.index_select(_flat(t.logits, 1), 0, rows, out=p)
        else:
            p.copy_(_take(t.logits, rows, 1))
    else:
        th = _take(t.hidden, rows, 1).to(p.dtype)
        torch.mm(th, t.weight.t(), out=p)
        if t.bias is not None:
            p.add_(t.bias)
    labels = None
    if plan.ce_weight:
        labels = plan.labels.index_select(0, rows).long().unsqueeze(-1)
    w_c = plan.weights.index_select(0, rows).to(z.dtype)
    values, ces = [], []
    for b0 in range(0, n, LEAN_ROW_BLOCK):
        b1 = min(b0 + LEAN_ROW_BLOCK, n)
        out = _lean_block(
            plan, kind, z[b0:b1], p[b0:b1], bufs[2][: b1 - b0], bufs[3][: b1 - b0], w_c[b0:b1],
            None if labels is None else labels[b0:b1],
        )
        if out is None:
            return None
        values.append(out[0])
        if out[1] is not None:
            ces.append(out[1])
    value = torch.cat(values)
    parts[0] += (w_c * value).sum()
    total = plan.terms[0].weight * value
    if ces:
        ce = torch.cat(ces)
        parts[-1] += (w_c * ce).sum()
        total = total + plan.ce_weight * ce
    return (w_c * total).sum(), z


def _lean_block(
    plan: _Plan, kind: str, z: torch.Tensor, p: torch.Tensor, x: torch.Tensor, q: torch.Tensor,
    w_c: torch.Tensor, labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One block of rows, in place: logits ``z``/``p`` in, ``z`` = ∂loss/∂z_raw out.

    Returns (per-row divergence, per-row CE or None), or None if a value is not finite.
    """
    temp = plan.temperature
    q_sums = _log_softmax_into(z, q, temp)  # z = log q, q = unnormalized softmax
    q.mul_(q_sums.reciprocal_())  # q
    p_sums = _log_softmax_into(p, x, temp)  # p = log p, x = unnormalized softmax
    ce = None
    if labels is not None:  # T == 1 here, so log q is also the CE's log-softmax
        ce = -z.gather(-1, labels).squeeze(-1)

    # after each branch: z = ∂D/∂s up to the factor in grad_scale (s = z_raw / T)
    if kind == "fkl":
        x.mul_(p_sums.reciprocal_())  # p
        p.sub_(z)  # log p − log q
        value = p.mul_(x).sum(-1)  # Σ p (log p − log q); 0·finite = 0 where p underflows
        torch.sub(q, x, out=z)  # q − p
    elif kind == "rkl":
        p.neg_().add_(z)  # log q − log p
        value = torch.mul(q, p, out=x).sum(-1)  # Σ q (log q − log p)
        torch.sub(p, value.unsqueeze(-1), out=z).mul_(q)  # q (log q − log p − RKL)
    else:  # jsd, 0 < β < 1: m = β p + (1 − β) q
        beta = float(plan.terms[0].params.get("beta", 0.5))
        x.mul_(p_sums.reciprocal_().mul_(beta)).add_(q, alpha=1.0 - beta)  # m
        # m underflows to 0 only where p and q both do; their terms are 0 either way
        x.clamp_min_(torch.finfo(x.dtype).tiny).log_()  # log m
        p.sub_(x)  # log p − log m
        z.sub_(x)  # log q − log m
        x.add_(p).exp_()  # p (= exp(log m + log p − log m))
        kl_t = p.mul_(x).sum(-1)  # KL(p‖m)
        kl_s = z.mul_(q).sum(-1)  # KL(q‖m); z = q (log q − log m)
        value = beta * kl_t + (1.0 - beta) * kl_s
        z.addcmul_(q, kl_s.unsqueeze(-1), value=-1.0)  # ∂D/∂s / (1 − β)
    if not bool(torch.isfinite(value).all()):
        return None
    # one pass for all the scalings: the divergence's weight, 1/T, (1 − β), the token weights
    grad_scale = plan.terms[0].weight / temp
    if kind == "jsd":
        grad_scale *= 1.0 - float(plan.terms[0].params.get("beta", 0.5))
    if ce is None:
        z.mul_((w_c * grad_scale).unsqueeze(-1))
    else:
        z.mul_(grad_scale)
        # ∂CE/∂z = softmax(z) − onehot(label), and softmax(z) = q at T = 1
        z.add_(q, alpha=plan.ce_weight)
        z.scatter_add_(-1, labels, torch.full_like(ce, -plan.ce_weight).unsqueeze(-1))
        z.mul_(w_c.unsqueeze(-1))
    return value, ce


class FusedLinearKD(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, plan) -> (loss [], parts [n_terms + 1])``.

    ``parts`` holds each reduced divergence (unweighted) and the CE last; it has no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):  # noqa: ANN001, ANN205 - autograd signature
        out_dtype = upcast(hidden[:0]).dtype
        parts = torch.zeros(len(plan.terms) + 1, dtype=out_dtype, device=hidden.device)
        loss = torch.zeros((), dtype=out_dtype, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if plan.need_grad else None
        grad_w = torch.zeros_like(weight) if plan.need_grad else None
        grad_b = torch.zeros_like(bias) if plan.need_grad and bias is not None else None
        kind = _lean_kind(plan, weight)
        bufs: list[torch.Tensor] = []
        if kind is not None:
            rows_n = min(plan.chunk_tokens, plan.rows.numel())
            sizes = [rows_n, rows_n, min(LEAN_ROW_BLOCK, rows_n), min(LEAN_ROW_BLOCK, rows_n)]
            bufs = [torch.empty((r, weight.shape[0]), dtype=weight.dtype, device=weight.device) for r in sizes]
        for start in range(0, plan.rows.numel(), plan.chunk_tokens):
            rows = plan.rows[start : start + plan.chunk_tokens]
            h_c = hidden.index_select(0, rows)
            with torch.no_grad():
                out = None
                if kind is not None:
                    out = _lean_chunk(plan, kind, h_c, weight, bias, rows, parts, bufs)
                chunk_loss, g = out if out is not None else _chunk(plan, h_c, weight, bias, rows, parts)
            loss += chunk_loss
            if g is not None:
                g = g.to(weight.dtype)
                grad_h.index_copy_(0, rows, g @ weight)
                grad_w.addmm_(g.t(), h_c)
                if grad_b is not None:
                    grad_b += g.sum(0)
            del g, out
        del bufs
        ctx.stash = (grad_h, grad_w, grad_b)
        ctx.reusable = plan.reusable
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, grad_parts):  # noqa: ANN001, ANN205 - autograd signature
        if ctx.stash is None:
            raise RuntimeError(
                "FusedLinearKD: backward ran twice and the stashed gradients were handed over the "
                "first time; call fused_linear_kd(..., reusable=True) to allow it"
            )
        grad_h, grad_w, grad_b = ctx.stash
        if ctx.reusable:
            grad_h, grad_w = grad_h.clone(), grad_w.clone()
            grad_b = None if grad_b is None else grad_b.clone()
        else:
            ctx.stash = None
        if grad_h is None:
            return None, None, None, None
        scale = grad_loss.to(grad_h.dtype)
        # in place: grad_w is as big as the lm_head; a scaled copy would double the peak
        if not bool(scale == 1):
            grad_h.mul_(scale)
            grad_w.mul_(scale)
            if grad_b is not None:
                grad_b.mul_(scale)
        return (
            grad_h if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None,
            grad_b if ctx.needs_input_grad[2] else None,
            None,
        )


def fused_linear_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: Teacher,
    terms: list[Term],
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    reduction: str = "token",
    chunk_tokens: int = 256,
    tail_policy: str = "tail_bucket",
    reusable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused-linear distillation loss; returns ``(loss, parts)`` (see :class:`FusedLinearKD`).

    hidden: ``[batch, seq, hidden]`` or ``[tokens, hidden]``; weight: ``[vocab, hidden]``;
    mask/labels: ``[batch, seq]`` (or ``[tokens]``), aligned with the hidden states' positions.
    ``loss = Σ_t w_t·(Σ_i weight_i·D_i(t) + ce_weight·CE(t))`` where ``w_t`` are the reduction
    weights of :func:`distillery.losses.reduce.token_weights`.

    Backward hands the stashed gradients to autograd (no copy), so it can run once per forward;
    ``reusable=True`` keeps them (a copy per backward) for ``retain_graph=True`` or gradcheck.
    """
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    positions = hidden.shape[:-1]
    m = resolve_mask(mask, labels, positions, device=hidden.device)
    weights = _flat(token_weights(m, reduction, upcast(hidden[:0]).dtype), 0)
    rows = _flat(m, 0).nonzero().squeeze(-1)
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    need_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    plan = _Plan(
        teacher=teacher, terms=terms, temperature=float(temperature), ce_weight=float(ce_weight),
        labels=None if labels is None else _flat(labels, 0).to(hidden.device),
        weights=weights, rows=rows, chunk_tokens=int(chunk_tokens), tail_policy=tail_policy,
        need_grad=need_grad, reusable=reusable,
    )
    if math.isnan(plan.temperature) or plan.temperature <= 0:
        raise ValueError("temperature must be > 0")
    flat_h = _flat(hidden, 1)
    loss, parts = FusedLinearKD.apply(flat_h, weight, bias, plan)
    return loss, parts
