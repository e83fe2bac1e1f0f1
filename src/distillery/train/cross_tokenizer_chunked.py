"""``cross_tokenizer.form: chunked``: cross-tokenizer ``logit_kd`` without ``[batch, seq, vocab]`` logits.

The dense form (:class:`~distillery.train.objectives.logit_kd.CrossTokenizerKDObjective` with
``form: dense``) runs both models to logits: at Gemma 3's 262,144 ids the teacher's
``[batch, seq, Vt]`` logits, their log-softmax at every compared row and the mapping of each
row onto student ids hold several GB. Here both models run their body only
(:func:`~distillery.losses.api.lm_head_inputs`: hidden states and the lm_head weight; the
teacher under ``no_grad``), and the positions are taken ``chunk_rows`` at a time:

* the student's positions (label tokens and compared rows) in chunks: ``z = h @ W.T``
  ``[chunk, Vs]``, the CE of the chunk's labels and the divergence of its compared rows,
  whose gradient wrt ``z`` (autograd, on the chunk only) goes to ``grad_h = g @ W`` and
  ``grad_W += g.T @ h`` at once and is stashed for backward, as in
  :mod:`distillery.losses.fused`;
* the compared rows in the chunk get their teacher rows there and then: the teacher's hidden
  states at those rows projected to its full vocabulary ``[chunk, Vt]``, log-softmax, then
  turned into what the method reads and the ``Vt``-wide chunk dropped: for ``vocab_map`` and
  ``hybrid`` the mass summed onto student ids (:func:`map_full_rows_to_student`, one pass, no
  sort), for ``uld`` and ``hybrid``'s unmapped list the largest entries, no more than the
  student's vocabulary, and what the rest weighs (:func:`uld_rows`, :func:`keep_top`);
* the chain members (mass moved over spans that split differently) read only the actual
  token's log-probability, a chunk at a time, before the student's pass.

The loss equals the dense form's (tests: float64, loss and gradients). With
``cross_tokenizer.top_k`` or a logit cache the teacher rows are sparse already and go through
the dense form's own carry (:func:`compare_rows`); only the student side is chunked then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distillery.losses import lm_head_inputs
from distillery.losses.cross_tokenizer import (
    cross_tokenizer_per_position,
    keep_top,
    map_full_rows_to_student,
    map_teacher_to_student,
    move_span_mass,
    student_columns,
    take_span_mass,
    uld_rows,
)
from distillery.losses.divergences import upcast
from distillery.losses.terms import Term
from distillery.models.vocab import VocabMapping

Tensor = torch.Tensor
_NEG_INF = float("-inf")


@dataclass
class XtSettings:
    """What the comparison of one row needs besides tensors (from the objective's spec and config)."""

    method: str
    terms: list[Term]
    temperature: float
    unmapped: str
    uld_weight: float
    mapping: VocabMapping | None
    columns: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # student_columns, once

    def layout(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """:func:`student_columns` of the mapping, computed once (per device)."""
        assert self.mapping is not None
        if self.columns is None or self.columns[0].device != device:
            cols, slot = student_columns(self.mapping.teacher_to_student.to(device))
            self.columns = (cols, slot)
        return self.columns


@dataclass
class TeacherRows:
    """Teacher rows at ``n`` compared positions: ``sparse`` (ids, log-probs ``[n, k]``, log tail
    ``[n]`` in teacher ids: top-k or a cache) or ``full`` (log-probs ``[n, Vt]``, column = id)."""

    lp: Tensor
    ids: Tensor | None = None
    tail: Tensor | None = None

    @property
    def full(self) -> bool:
        return self.ids is None


def compare_rows(st: XtSettings, s_rows: Tensor, teacher: TeacherRows, t1: Tensor, s_tok: Tensor,
                 log_mass: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per compared row ``[n]`` and its parts: the teacher carried to student ids, span mass
    moved, compared by the method (the dense form's ``_divergence`` and this form's, one code).

    s_rows ``[n, Vs]`` student logits; t1 ``[n]`` the teacher's first token of each group,
    s_tok ``[n]`` the student's; log_mass ``[n]`` the chain mass to move (−inf: none).
    """
    device = s_rows.device
    kw = {"terms": st.terms, "temperature": st.temperature}
    # ULD takes the divergences' weight too, T² included (kd_ratio splits CE from distillation,
    # whichever distance measures it); hybrid's uld_weight is relative to it
    uld_scale = sum(term.weight for term in st.terms)
    if teacher.full:
        # the whole distribution: nothing outside it (a None tail would be read as 1 − Σp)
        ids = torch.arange(teacher.lp.shape[-1], device=device).expand_as(teacher.lp)
        tail = torch.full(teacher.lp.shape[:1], _NEG_INF, dtype=teacher.lp.dtype, device=device)
    else:
        ids, tail = teacher.ids, teacher.tail
    if st.method == "uld":
        lp = teacher.lp
        if teacher.full:  # ULD reads no more sorted entries than the student's vocabulary
            lp, tail = uld_rows(lp, tail, s_rows.shape[-1], st.temperature)
        uld, parts = cross_tokenizer_per_position(s_rows, None, lp, tail, method="uld", **kw)
        return uld_scale * uld, parts
    assert st.mapping is not None  # the objective checks it
    mapping = st.mapping.teacher_to_student.to(device)
    if st.method == "hybrid":
        # what move_span_mass gives the student's token below is no longer unmapped mass
        # a full row's column t is teacher id t: the mapped mask is the mapping's, one row for all
        mapped = (mapping >= 0) if teacher.full else (mapping[ids] >= 0)
        unmapped = take_span_mass(ids, teacher.lp, t1, log_mass).masked_fill(mapped, _NEG_INF)
        rest = None
        if teacher.full:  # ULD reads no more sorted entries than the student has free ids
            unmapped, rest = keep_top(unmapped, int((~st.mapping.student_mapped).sum()), st.temperature)
        kw.update(uld_weight=st.uld_weight * uld_scale, student_mapped=st.mapping.student_mapped.to(device),
                  teacher_unmapped_logprobs=unmapped, teacher_unmapped_rest=rest)
    if teacher.full:
        cols, slot = st.layout(device)
        c_ids, c_lp, c_tail = map_full_rows_to_student(teacher.lp, cols, slot, tail)
    else:
        c_ids, c_lp, c_tail = map_teacher_to_student(ids, teacher.lp, mapping, tail)
    c_ids, c_lp, c_tail = move_span_mass(c_ids, c_lp, c_tail, mapping[t1], s_tok, log_mass)
    return cross_tokenizer_per_position(s_rows, c_ids, c_lp, c_tail, method=st.method,
                                        unmapped=st.unmapped, **kw)


# ------------------------------------------------------------------------------ live teacher


@dataclass
class LiveTeacher:
    """A live teacher's final hidden states ``[batch, seq_t, Ht]`` and lm_head, read a chunk of
    positions at a time: only ``[chunk, Vt]`` logits ever exist."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    top_k: int | None
    chunk_rows: int

    @classmethod
    def run(cls, teacher: nn.Module, batch: dict[str, Tensor], top_k: int | None, chunk_rows: int) -> LiveTeacher:
        device = next(teacher.parameters()).device
        with torch.no_grad():
            hidden, weight, bias = lm_head_inputs(teacher, input_ids=batch["teacher_input_ids"].to(device),
                                                  attention_mask=batch["teacher_attention_mask"].to(device))
        return cls(hidden, weight, bias, top_k, chunk_rows)

    def log_probs(self, rows: Tensor, pos: Tensor) -> Tensor:
        """Full log-softmax ``[n, Vt]`` at the positions ``(rows, pos)`` (each ``[n]``)."""
        dev = self.hidden.device
        with torch.no_grad():
            h = self.hidden[rows.to(dev), pos.to(dev)]
            return F.log_softmax(upcast(F.linear(h, self.weight, self.bias)), dim=-1)

    def rows(self, rows: Tensor, pos: Tensor, device: torch.device) -> TeacherRows:
        """The teacher rows at ``(rows, pos)``: full, or its top_k as the dense form takes them."""
        lp = self.log_probs(rows, pos)
        with torch.no_grad():
            if self.top_k is not None and self.top_k < lp.shape[-1]:
                top, ids = lp.topk(self.top_k, dim=-1)
                tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
                return TeacherRows(top.to(device), ids.to(device), tail.to(device))
        return TeacherRows(lp.to(device))

    def chain_log_mass(self, batch: dict[str, Tensor], n: int, device: torch.device) -> Tensor:
        """``[n]``: per compared row, the summed log-probability of its chain members' tokens
        (−inf for a row without a chain), a chunk of members at a time."""
        seg, tok, c = batch["xt_chain_seg"].to(device), batch["xt_chain_token"], self.chunk_rows
        total = torch.zeros(n, dtype=upcast(self.hidden[:0, 0, :0]).dtype, device=device)
        for a in range(0, seg.numel(), c):
            lp = self.log_probs(batch["xt_chain_row"][a : a + c], batch["xt_chain_pos"][a : a + c])
            member = lp.gather(-1, tok[a : a + c].to(lp.device)[:, None])[:, 0]
            total = total.index_add(0, seg[a : a + c], member.to(device, total.dtype))
        has_chain = torch.zeros(n, dtype=torch.bool, device=device)
        has_chain[seg] = True
        return torch.where(has_chain, total, torch.full_like(total, _NEG_INF))


# ------------------------------------------------------------------------------ student side


@dataclass
class _Plan:
    """One batch's chunked pass: the student positions, their CE weights, the compared rows."""

    positions: Tensor  # [P] flat indices into the student's [batch * seq] hidden states
    labels: Tensor  # [P] target ids, -100 where no CE
    ce_weights: Tensor  # [P] weight of each position's CE
    row_pos: Tensor  # [N] index into positions of each compared row
    row_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]  # (z rows, n) -> per row, parts
    chunk: int
    need_grad: bool
    ce_sum: float = 0.0  # metrics: the unweighted CE of the label tokens, summed
    sums: dict[str, float] = field(default_factory=dict)  # and each divergence part over the rows


class _ChunkedXt(torch.autograd.Function):
    """``(hidden [B·T, H], weight [Vs, H], bias [Vs] | None, plan) -> loss sum []``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):  # noqa: ANN001, ANN205 - autograd signature
        loss = torch.zeros((), dtype=upcast(hidden[:0]).dtype, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if plan.need_grad else None
        grad_w = torch.zeros_like(weight) if plan.need_grad else None
        grad_b = torch.zeros_like(bias) if plan.need_grad and bias is not None else None
        for a in range(0, plan.positions.numel(), plan.chunk):
            pos = plan.positions[a : a + plan.chunk]
            h = hidden.index_select(0, pos)
            total, g = _chunk_loss(plan, h, weight, bias, a)
            loss += total
            if g is not None:
                g = g.to(weight.dtype)
                grad_h.index_copy_(0, pos, g @ weight)
                grad_w.addmm_(g.t(), h)
                if grad_b is not None:
                    grad_b += g.sum(0)
            del g
        ctx.stash = (grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205 - autograd signature
        grad_h, grad_w, grad_b = ctx.stash
        ctx.stash = None
        if grad_h is None:
            return None, None, None, None
        scale = grad_loss.to(grad_h.dtype)
        if not bool(scale == 1):  # in place: grad_w is as big as the student's lm_head
            grad_h.mul_(scale)
            grad_w.mul_(scale)
            if grad_b is not None:
                grad_b.mul_(scale)
        return (grad_h if ctx.needs_input_grad[0] else None, grad_w if ctx.needs_input_grad[1] else None,
                grad_b if ctx.needs_input_grad[2] else None, None)


def _chunk_loss(plan: _Plan, h: Tensor, weight: Tensor, bias: Tensor | None, start: int
                ) -> tuple[Tensor, Tensor | None]:
    """Loss of the positions ``[start, start + len(h))`` and its gradient wrt their logits ``[c, Vs]``."""
    end = start + h.shape[0]
    with torch.no_grad():
        z = F.linear(h, weight, bias)
    z.requires_grad_(plan.need_grad)
    with torch.enable_grad():
        zz = upcast(z)
        labels = plan.labels[start:end]
        ce = F.cross_entropy(zz, labels, ignore_index=-100, reduction="none")
        total = (ce * plan.ce_weights[start:end].to(ce.dtype)).sum()
        plan.ce_sum += float(ce.detach()[labels != -100].sum())
        n = torch.nonzero((plan.row_pos >= start) & (plan.row_pos < end)).squeeze(-1)
        if n.numel():
            per_row, parts = plan.row_fn(zz.index_select(0, plan.row_pos[n] - start), n)
            total = total + per_row.sum()
            for k, v in parts.items():
                plan.sums[k] = plan.sums.get(k, 0.0) + float(v.detach().sum())
        g = torch.autograd.grad(total, z)[0] if plan.need_grad else None
    return total.detach(), g


def chunked_loss(student: nn.Module, student_inputs: dict[str, Tensor], targets: Tensor, mask: Tensor,
                 batch: dict[str, Tensor], ce_weight: float, kd_weight: float, chunk_rows: int,
                 row_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]
                 ) -> tuple[Tensor, float, dict[str, float]]:
    """``Σ_label tokens (ce_weight + kd_weight·[not compared])·CE + Σ_rows row_fn`` (not yet
    divided by the token count), with the student's logits built ``chunk_rows`` positions at a time.

    targets/mask ``[B, T − 1]`` (shifted labels); ``row_fn(z_rows [n, Vs], n_idx [n])`` gives the
    divergence of compared rows ``n_idx`` (indices into the batch's ``xt_*`` rows) and its parts.
    Returns the loss sum, the unweighted CE sum and each part summed over the rows.
    """
    hidden, weight, bias = lm_head_inputs(student, **student_inputs)
    b, t = hidden.shape[:2]
    device = hidden.device
    compared = torch.zeros_like(mask)
    row, spos = batch["xt_row"].to(device), batch["xt_student_pos"].to(device)
    compared[row, spos] = True
    grid = torch.nonzero(mask | compared)  # [P, 2] (b, t) in order
    flat = grid[:, 0] * (t - 1) + grid[:, 1]
    where = torch.full((b * (t - 1),), -1, dtype=torch.long, device=device)
    where[flat] = torch.arange(flat.numel(), device=device)
    m = mask[grid[:, 0], grid[:, 1]]
    weights = (ce_weight + kd_weight * (~compared[grid[:, 0], grid[:, 1]]).to(hidden.dtype)) * m
    labels = torch.where(m, targets[grid[:, 0], grid[:, 1]], torch.full_like(flat, -100))
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    plan = _Plan(positions=grid[:, 0] * t + grid[:, 1], labels=labels, ce_weights=weights,
                 row_pos=where[row * (t - 1) + spos], row_fn=row_fn, chunk=chunk_rows, need_grad=need_grad)
    loss = _ChunkedXt.apply(hidden.reshape(b * t, -1), weight, bias, plan)
    return loss, plan.ce_sum, plan.sums
