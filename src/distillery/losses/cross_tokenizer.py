"""Losses between a teacher and a student whose tokenizers differ (issue 8), pure tensor code.

Every function works on the **compared positions already gathered**: ``N`` rows, one per
position where both tokenizations start a token at the same character (the caller gathers them
from ``[batch, seq, vocab]`` logits by alignment). Student logits are ``[N, Vs]``; a teacher row
is sparse, as in a logit cache: ids ``[N, k]``, log-probabilities ``[N, k]`` and the log of the
mass outside them ``[N]`` (``k = Vt`` with a −inf tail is the full distribution).

Three ways to compare the two next-token distributions:

* ``vocab_map``: carry the teacher to student ids (:func:`map_teacher_to_student`, then
  :func:`move_span_mass` for student tokens the teacher spells as several tokens) and use the
  sparse form of :mod:`distillery.losses.forms` with a tail policy for the unmapped mass;
* ``uld``: Universal Logit Distillation (arXiv 2402.12030), :func:`uld_distance` between the
  probability vectors sorted in decreasing order; needs no mapping;
* ``hybrid``: ``vocab_map`` with a tail bucket plus a weighted ULD between the teacher's
  unmapped entries and the student's probabilities on ids that no teacher token maps to.

**Absent entries.** A mapped teacher row has fewer distinct student ids than ``k`` when teacher
ids are unmapped or merge into one student id. The freed slots hold logprob −inf and the id of
another entry of the same row (a duplicate), so every id is a valid index. Fed straight to
:func:`~distillery.losses.forms.sparse_per_token` this is exact for ``tail_bucket`` with
divergences that read the student only where the teacher has mass (forward KL, skew forward
KL); :func:`cross_tokenizer_per_position` drops such slots from both sides, which is exact for
every divergence and both tail policies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distillery.logits.topk import teacher_log_tail as _floored_log_tail
from distillery.losses.divergences import upcast
from distillery.losses.forms import (
    mix_per_token,
    sparse_student_log_probs,
    sparse_teacher_log_probs,
)
from distillery.losses.terms import Term

__all__ = [
    "CROSS_TOKENIZER_METHODS",
    "UNMAPPED_POLICIES",
    "cross_tokenizer_per_position",
    "keep_top",
    "map_full_rows_to_student",
    "map_teacher_to_student",
    "student_columns",
    "uld_rows",
    "move_span_mass",
    "take_span_mass",
    "uld_distance",
]

Tensor = torch.Tensor
CROSS_TOKENIZER_METHODS = ("vocab_map", "uld", "hybrid")
UNMAPPED_POLICIES = ("tail_bucket", "renormalize")
_NEG_INF = float("-inf")
# log-probability of a dropped slot on both sides: exp gives exactly 0 like −inf, but it stays
# finite, so the divergences' ``0·(log a − log b)`` has a finite gradient (−inf − −inf is nan)
_ABSENT = -1e30


# --------------------------------------------------------------------------------------------
# ULD: optimal transport between sorted probability vectors
# --------------------------------------------------------------------------------------------


def _pad_to(x: Tensor, width: int) -> Tensor:
    """Zero-pad the last dim of ``[N, n]`` to ``[N, width]`` (an absent token has probability 0)."""
    return F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x


def _l1_sorted(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_i |a_i − b_i|`` over ``[N, n]`` rows of equal width, accumulated in float64 (a big
    vocabulary sums many tiny terms), returned in the inputs' dtype, ``[N]``."""
    return (a - b).abs().sum(-1, dtype=torch.float64).to(a.dtype)


def uld_distance(
    student_probs: Tensor,
    teacher_probs: Tensor | None = None,
    *,
    teacher_sorted_topk: Tensor | None = None,
    teacher_tail: Tensor | None = None,
) -> Tensor:
    """ULD per row, ``[N]``: ``Σ_i |sort↓(q)_i − sort↓(p)_i|``, the shorter vector zero-padded.

    ULD (arXiv 2402.12030) derives it as a Wasserstein-1 distance between the two next-token
    distributions under a uniform token cost. Concretely it is the smallest L1 distance over
    all one-to-one pairings of student tokens with teacher tokens (the vocabularies zero-padded
    to one size): pairing by rank, as sorting does, is optimal. No vocabulary mapping needed.

    Give the teacher either in full, ``teacher_probs [N, Vt]`` (any order), or as a top-k from a
    logit cache: ``teacher_sorted_topk [N, k]``, its k largest probabilities (sorted or not), and
    ``teacher_tail [N]``, the mass outside them (``1 − Σ top-k`` when omitted). The top-k form
    compares the student's k largest with them and adds ``|tail_p − tail_q|`` with ``tail_q``
    the student's mass outside its k largest. By the triangle inequality
    ``Σ_{i>k} |q↓_i − p↓_i| ≥ |Σ_{i>k} q↓_i − Σ_{i>k} p↓_i|``, so this is a **lower bound** of
    the full ULD, equal to it when the teacher is exactly k-sparse (every ``p↓_i = 0`` past k).

    ``student_probs [N, Vs]``: differentiable (the gradient flows through the sort's values to
    the entries they came from). Probabilities of unnormalised sub-vectors are fine in the full
    form; the top-k form's ``tail_q`` is the rest of the student's row.
    """
    if (teacher_probs is None) == (teacher_sorted_topk is None):
        raise ValueError("uld_distance: give exactly one of teacher_probs (the full row) and "
                         "teacher_sorted_topk (a top-k row)")
    if teacher_probs is None and teacher_sorted_topk is not None:
        return _uld_topk(student_probs, teacher_sorted_topk, teacher_tail)
    assert teacher_probs is not None
    if teacher_tail is not None:
        raise ValueError("uld_distance: teacher_tail goes with teacher_sorted_topk, not with full teacher_probs")
    _check_rows(student_probs, teacher_probs, "teacher_probs")
    q = upcast(student_probs).sort(dim=-1, descending=True).values
    p = upcast(teacher_probs).sort(dim=-1, descending=True).values.to(q.dtype)
    width = max(q.shape[-1], p.shape[-1])
    return _l1_sorted(_pad_to(q, width), _pad_to(p, width))


def _uld_topk(student_probs: Tensor, top: Tensor, tail: Tensor | None) -> Tensor:
    """The top-k lower bound of :func:`uld_distance` (see there)."""
    _check_rows(student_probs, top, "teacher_sorted_topk")
    q = upcast(student_probs)
    p = upcast(top).to(q.dtype).sort(dim=-1, descending=True).values
    k = p.shape[-1]
    if tail is None:
        tail_p = (1.0 - p.sum(-1, dtype=torch.float64)).clamp_min(0.0)
    else:
        if tail.shape != p.shape[:-1]:
            raise ValueError(f"teacher_tail {tuple(tail.shape)} must be [N] = {tuple(p.shape[:-1])}")
        tail_p = upcast(tail).double()
    # topk, not a full sort: k is small next to the vocabulary
    head_q = q.topk(min(k, q.shape[-1]), dim=-1).values
    # the student's rest in float64, so a tiny tail does not drown in rounding
    tail_q = (q.sum(-1, dtype=torch.float64) - head_q.sum(-1, dtype=torch.float64)).clamp_min(0.0)
    head = _l1_sorted(_pad_to(head_q, k), p)
    return head + (tail_q - tail_p).abs().to(q.dtype)


def _check_rows(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student_probs {tuple(student.shape)} and {name} {tuple(teacher.shape)} must be "
            "[N, V] rows of the same N (gather the compared positions first)"
        )


# --------------------------------------------------------------------------------------------
# Carrying a teacher row to student ids
# --------------------------------------------------------------------------------------------


def _check_sparse(ids: Tensor, logprobs: Tensor, log_tail: Tensor | None, who: str) -> None:
    if ids.dim() != 2 or ids.shape != logprobs.shape:
        raise ValueError(f"{who}: ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must both be [N, k]")
    if log_tail is not None and log_tail.shape != ids.shape[:1]:
        raise ValueError(f"{who}: log_tail {tuple(log_tail.shape)} must be [N] = {tuple(ids.shape[:1])}")


def _segment_logsumexp(keys: Tensor, values: Tensor, fill_key: int) -> tuple[Tensor, Tensor]:
    """Merge equal keys per row: ``[N, k]`` keys and log-values -> ``[N, k]`` unique keys (sorted,
    then ``fill_key``) and the log-sum-exp of each key's values (−inf in the unused slots)."""
    keys_sorted, order = keys.sort(dim=-1)
    vals = values.gather(-1, order)
    starts = torch.ones_like(keys_sorted, dtype=torch.bool)
    starts[:, 1:] = keys_sorted[:, 1:] != keys_sorted[:, :-1]
    slot = starts.long().cumsum(-1) - 1  # the group each sorted entry belongs to
    top = torch.full_like(vals, _NEG_INF).scatter_reduce(-1, slot, vals, "amax", include_self=True)
    # shift by the group max so exp does not overflow; empty groups (max −inf) shift by 0
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.zeros_like(vals).scatter_add(-1, slot, (vals - shift.gather(-1, slot)).exp())
    out_keys = torch.full_like(keys_sorted, fill_key).scatter(-1, slot, keys_sorted)
    return out_keys, sums.log() + shift


def _fill_absent(ids: Tensor, absent: Tensor) -> Tensor:
    """Give absent slots the row's first present id (a harmless duplicate; 0 if none)."""
    first = torch.where(absent, torch.iinfo(ids.dtype).max, torch.arange(ids.shape[-1], device=ids.device))
    slot0 = first.argmin(-1, keepdim=True)
    pad = torch.where(absent.gather(-1, slot0), torch.zeros_like(slot0), ids.gather(-1, slot0))
    return torch.where(absent, pad, ids)


def map_teacher_to_student(
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    mapping: Tensor,
    teacher_log_tail: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Carry the teacher's sparse rows to student ids, conserving mass exactly.

    teacher_ids ``[N, k]`` (int64, teacher vocabulary), teacher_logprobs ``[N, k]``, mapping
    ``[Vt]`` (the student id of each teacher id, −1 where none), teacher_log_tail ``[N]`` (the log
    mass outside the k ids; ``log(1 − Σ p)`` when omitted, floored as in the sparse forms).

    Returns ``(ids [N, k], logprobs [N, k], log_tail [N])`` in student ids: the mass of unmapped
    teacher ids joins the tail; teacher ids that map to one student id are merged (log-sum-exp),
    so each student id appears once with mass. Slots left free hold logprob −inf and a duplicate
    id (see the module doc). Entries come sorted by student id, not by probability.
    ``Σ exp(logprobs) + exp(log_tail)`` equals the teacher's ``Σ exp(teacher_logprobs) + tail``.
    """
    _check_sparse(teacher_ids, teacher_logprobs, teacher_log_tail, "map_teacher_to_student")
    if mapping.dim() != 1:
        raise ValueError(f"mapping must be [Vt] (student id per teacher id), got {tuple(mapping.shape)}")
    ids = teacher_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= mapping.shape[0]):
        raise ValueError(
            f"teacher_ids must lie in [0, {mapping.shape[0]}) (the mapping's teacher vocabulary), "
            f"got [{int(ids.min())}, {int(ids.max())}]: is the mapping built from this teacher's tokenizer?"
        )
    if mapping.numel() and int(mapping.min()) < -1:
        raise ValueError("mapping holds a student id or -1 per teacher id; found values below -1")
    lp = upcast(teacher_logprobs)
    student = mapping.to(ids.device).long()[ids]
    mapped = (student >= 0) & (lp > _NEG_INF)
    tail = _floored_log_tail(lp, None if teacher_log_tail is None else upcast(teacher_log_tail))
    unmapped_mass = torch.logsumexp(lp.masked_fill(mapped, _NEG_INF), dim=-1)
    log_tail = torch.logaddexp(tail, unmapped_mass)
    # unmapped entries sort last under a key above every student id and merge into one dead slot
    dead = int(mapping.max()) + 1 if mapping.numel() else 0
    keys = torch.where(mapped, student, torch.full_like(student, dead))
    out_ids, out_lp = _segment_logsumexp(keys, lp.masked_fill(~mapped, _NEG_INF), dead)
    absent = (out_ids == dead) | (out_lp == _NEG_INF)
    return _fill_absent(out_ids, absent), out_lp.masked_fill(absent, _NEG_INF), log_tail


def student_columns(mapping: Tensor) -> tuple[Tensor, Tensor]:
    """The student ids some teacher id maps to, ``columns [m]`` (sorted), and each teacher id's
    column, ``slot [Vt]`` (``m`` where the teacher id is unmapped): the layout of
    :func:`map_full_rows_to_student`. Depends on the mapping only: compute it once."""
    columns = torch.unique(mapping[mapping >= 0].long())
    slot = torch.searchsorted(columns, mapping.long().clamp_min(0))
    return columns, torch.where(mapping >= 0, slot, torch.full_like(slot, columns.numel()))


def map_full_rows_to_student(
    teacher_logprobs: Tensor, columns: Tensor, slot: Tensor, teacher_log_tail: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`map_teacher_to_student` for rows over the **whole** teacher vocabulary, without a sort.

    teacher_logprobs ``[N, Vt]`` (column t is teacher id t), ``(columns, slot)`` from
    :func:`student_columns`. Returns ``(ids [N, m], logprobs [N, m], log_tail [N])``: column j
    is student id ``columns[j]`` with the log-sum-exp of the mass of the teacher ids mapped to
    it (−inf where none has mass: an absent slot, its id a harmless duplicate), the tail as in
    :func:`map_teacher_to_student`. The same entries as there, in another slot order: every
    loss here reads a row as a set of (id, mass) entries, so the two are interchangeable. The
    slots are static (one index for every row), so this costs one pass over ``Vt`` per row
    instead of a sort: the form for a live teacher's full rows.
    """
    if teacher_logprobs.dim() != 2 or teacher_logprobs.shape[-1] != slot.shape[0]:
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)} must be [N, Vt] with Vt = "
                         f"{slot.shape[0]} (the mapping's teacher vocabulary)")
    lp = upcast(teacher_logprobs)
    m = columns.numel()
    slot = slot.to(lp.device)
    mapped = (slot < m) & (lp > _NEG_INF)
    tail = _floored_log_tail(lp, None if teacher_log_tail is None else upcast(teacher_log_tail))
    log_tail = torch.logaddexp(tail, torch.logsumexp(lp.masked_fill(mapped, _NEG_INF), dim=-1))
    vals = lp.masked_fill(~mapped, _NEG_INF)
    index = slot.expand_as(vals)
    top = torch.full((lp.shape[0], m + 1), _NEG_INF, dtype=lp.dtype, device=lp.device)
    top = top.scatter_reduce(-1, index, vals, "amax", include_self=True)
    # shift by the column's max so exp does not overflow; empty columns (max −inf) shift by 0
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.zeros_like(top).scatter_add(-1, index, (vals - shift.gather(-1, index)).exp())
    out = (sums.log() + shift)[:, :m]
    return columns.to(lp.device).expand(lp.shape[0], m), out, log_tail


def keep_top(logprobs: Tensor, width: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The ``width`` largest entries of each row and what the rest weighs at temperature T.

    logprobs ``[N, k]``. Returns ``(top [N, min(width, k)]`` sorted in decreasing order,
    ``rest [N])`` with ``rest = T·log Σ_rest exp(lp / T)`` (−inf when nothing is left): raised
    to 1/T as the losses temper a teacher row, it weighs what the dropped entries weighed
    together, so a tempered normaliser over ``top`` and ``rest`` is the full row's. ULD reads
    only sorted values and no vector longer than the student's, so a row kept this wide loses
    nothing (see :func:`cross_tokenizer_per_position`).
    """
    lp = upcast(logprobs)
    if width >= lp.shape[-1]:
        top = lp.sort(dim=-1, descending=True).values
        return top, torch.full(lp.shape[:-1], _NEG_INF, dtype=lp.dtype, device=lp.device)
    top, where = lp.topk(width, dim=-1)
    rest = torch.logsumexp(lp.scatter(-1, where, _NEG_INF) / temperature, dim=-1) * temperature
    return top, rest


def uld_rows(
    logprobs: Tensor, log_tail: Tensor | None, width: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """A teacher row for ``method="uld"`` cut to ``width`` entries (the student's vocabulary)
    with the rest folded into the tail: ``(logprobs [N, min(width, k)], log_tail [N])``.

    :func:`cross_tokenizer_per_position` gives the same ULD for the cut row as for the whole
    one: the tempered entries kept are unchanged (:func:`keep_top` keeps the normaliser), and
    past the student's last sorted entry the student side is 0, so ``Σ |0 − p↓_i|`` there is
    the folded mass, which the top-k form counts as ``|tail_q − tail_p|`` with ``tail_q = 0``.
    """
    lp = upcast(logprobs)
    if width >= lp.shape[-1]:
        return lp, _floored_log_tail(lp, None if log_tail is None else upcast(log_tail))
    top, rest = keep_top(lp, width, temperature)
    tail = _floored_log_tail(lp, None if log_tail is None else upcast(log_tail))
    return top, torch.logaddexp(rest / temperature, tail / temperature) * temperature


def _locate(ids: Tensor, logprobs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Slot ``[N]`` of ``target``'s entry in each row and whether it is present (id ≥ 0 and
    finite mass; duplicates of absent slots carry −inf so the max picks the real one)."""
    score = torch.where(ids == target.unsqueeze(-1), logprobs, torch.full_like(logprobs, _NEG_INF))
    best, slot = score.max(dim=-1)
    return slot, (target >= 0) & (best > _NEG_INF)


def _log_sub(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``log(a − b)`` for ``b ≤ a``, stably; ``log_a`` where ``b = 0``; −inf where ``b = a``."""
    diff = log_a + torch.log(-torch.expm1((log_b - log_a).clamp_max(0.0)))
    return torch.where(log_b == _NEG_INF, log_a, diff)


def move_span_mass(
    ids: Tensor,
    logprobs: Tensor,
    log_tail: Tensor,
    from_ids: Tensor,
    to_ids: Tensor,
    log_mass: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Move ``exp(log_mass)`` per row from one student entry to another, conserving mass.

    ids / logprobs ``[N, k]`` and log_tail ``[N]``: a teacher row in student ids (the output of
    :func:`map_teacher_to_student`). from_ids, to_ids ``[N]``: student ids, −1 = the tail;
    a ``from`` id absent from the row takes from the tail (that is where its mass is).
    log_mass ``[N]``: −inf = nothing to move. The amount is clamped to what ``from`` holds, so
    no entry goes negative.

    Use: the teacher spells student token w as t1 t2 …; its chain probability
    ``P(t1)·P(t2|t1)·…`` is the probability of w, so it moves from t1's student entry
    (``mapping[t1]``, −1 if t1 has none) to w's.

    Returns ``(ids [N, k + 1], logprobs [N, k + 1], log_tail [N])``: the extra column holds w's
    entry when w was absent, else an absent slot (logprob −inf, a duplicate id).
    """
    _check_sparse(ids, logprobs, log_tail, "move_span_mass")
    for name, t in (("from_ids", from_ids), ("to_ids", to_ids), ("log_mass", log_mass)):
        if t.shape != ids.shape[:1]:
            raise ValueError(f"move_span_mass: {name} {tuple(t.shape)} must be [N] = {tuple(ids.shape[:1])}")
    lp, tail = upcast(logprobs), upcast(log_tail)
    from_ids, to_ids = from_ids.long(), to_ids.long()
    src_slot, src_here = _locate(ids, lp, from_ids)
    dst_slot, dst_here = _locate(ids, lp, to_ids)
    dst_tail = to_ids < 0
    # tail -> tail, or an entry onto itself, moves nothing
    noop = (~src_here & dst_tail) | (src_here & dst_here & (src_slot == dst_slot))
    src_lp = torch.where(src_here, lp.gather(-1, src_slot[:, None]).squeeze(-1), tail)
    moved = torch.minimum(upcast(log_mass).to(lp.dtype), src_lp).masked_fill(noop, _NEG_INF)
    left = _log_sub(src_lp, moved)

    cols = torch.arange(ids.shape[-1], device=ids.device)
    at_src = (cols == src_slot[:, None]) & src_here[:, None]
    at_dst = (cols == dst_slot[:, None]) & dst_here[:, None]
    new_lp = torch.where(at_src, left[:, None], lp)
    new_lp = torch.where(at_dst, torch.logaddexp(new_lp, moved[:, None]), new_lp)
    new_tail = torch.where(src_here, tail, left)
    new_tail = torch.where(dst_tail, torch.logaddexp(new_tail, moved), new_tail)
    # the extra column: w's new entry, or an absent slot duplicating an id already in the row
    create = ~dst_here & ~dst_tail
    extra_id = torch.where(dst_tail, ids[:, 0], to_ids)
    extra_lp = torch.where(create, moved, torch.full_like(moved, _NEG_INF))
    return (
        torch.cat([ids, extra_id[:, None]], dim=-1),
        torch.cat([new_lp, extra_lp[:, None]], dim=-1),
        new_tail,
    )


def take_span_mass(ids: Tensor, logprobs: Tensor, token: Tensor, log_mass: Tensor) -> Tensor:
    """``logprobs [N, k]`` with ``exp(log_mass) [N]`` taken out of the entry of ``token [N]``
    (clamped to what it holds; a row without that entry, or with ``log_mass`` −inf, is kept).

    Use: in the teacher's own ids, the mass :func:`move_span_mass` gave to the student's token
    came out of the teacher's first token t1. ``hybrid`` compares the teacher's *unmapped*
    entries with ULD; when t1 is unmapped (teacher ``=-``, student ``=`` ``-``) its moved mass
    is already on the student's token and must leave the unmapped list, else it counts twice
    (the whole row's mass, at every such position).
    """
    _check_sparse(ids, logprobs, None, "take_span_mass")
    lp = upcast(logprobs)
    slot, here = _locate(ids.long(), lp, token.long())
    have = lp.gather(-1, slot[:, None]).squeeze(-1)
    left = _log_sub(have, torch.minimum(upcast(log_mass).to(lp.dtype), have))
    at = (torch.arange(ids.shape[-1], device=ids.device) == slot[:, None]) & here[:, None]
    return torch.where(at, left[:, None], lp)


# --------------------------------------------------------------------------------------------
# Per-position loss
# --------------------------------------------------------------------------------------------


def _phantom_student(scaled: Tensor, ids: Tensor, absent: Tensor) -> tuple[Tensor, Tensor]:
    """Student logits ``[N, Vs]`` with ``_ABSENT`` columns appended and ids whose absent slots
    point at one: the sparse forms then see probability 0 there. Enough columns are added that
    ``k`` stays below the width (the forms read ``k == V`` as "the whole vocabulary, no tail")."""
    vs, k = scaled.shape[-1], ids.shape[-1]
    extra = max(1, k + 1 - vs)
    phantom = torch.full((scaled.shape[0], extra), _ABSENT, dtype=scaled.dtype, device=scaled.device)
    return torch.cat([scaled, phantom], dim=-1), ids.masked_fill(absent, vs)


def _vocab_map_support(
    student_logits: Tensor, ids: Tensor, lp: Tensor, log_tail: Tensor | None, temperature: float, policy: str
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probabilities ``[N, k (+1)]`` over the tail policy's support,
    built by the sparse forms' own functions, with absent slots dropped from both sides.

    Two rows need care: under ``renormalize`` a row with nothing mapped has no support (it gets
    one certain outcome on both sides: loss 0, gradient 0); under ``tail_bucket`` a row whose
    ids cover the whole student vocabulary leaves the student no mass for the bucket, so the
    bucket is dropped there (the teacher renormalized over its ids, as the forms do for k = V)."""
    absent = lp == _NEG_INF
    lp = lp.masked_fill(absent, _ABSENT)
    if policy == "renormalize":
        empty = absent.all(-1, keepdim=True)
        first = torch.zeros_like(absent)
        first[:, 0] = True
        lp = lp.masked_fill(empty & first, 0.0)
        absent = absent & ~(empty & first)
    scaled, ids_ext = _phantom_student(upcast(student_logits) / temperature, ids, absent)
    log_q = sparse_student_log_probs(scaled, ids_ext, policy)
    vocab = scaled.shape[-1]
    log_p = sparse_teacher_log_probs(ids_ext, lp, log_tail, policy, temperature, vocab)
    if policy == "tail_bucket":
        covered = (~absent).sum(-1, keepdim=True) >= student_logits.shape[-1]
        renorm = sparse_teacher_log_probs(ids_ext, lp, None, "renormalize", temperature, vocab)
        renorm = F.pad(renorm, (0, 1), value=_ABSENT)
        log_p = torch.where(covered, renorm, log_p)
    return log_p, log_q


def _tempered_unmapped(
    unmapped_lp: Tensor, lp: Tensor, log_tail: Tensor | None, temperature: float
) -> Tensor:
    """The teacher's unmapped entries at T, ``[N, u]`` probabilities: ``p_u^(1/T) / Z`` with ``Z``
    the normaliser of the tail-bucket teacher at T (its mapped entries and tail as outcomes);
    exactly ``p_u`` at T = 1."""
    outcomes = torch.cat([lp, _floored_log_tail(lp, log_tail).unsqueeze(-1)], dim=-1)
    log_z = torch.logsumexp(outcomes / temperature, dim=-1, keepdim=True)
    return (upcast(unmapped_lp) / temperature - log_z).exp()


def _check_call(method: str, unmapped: str, temperature: float, terms: Sequence[Term]) -> None:
    if method not in CROSS_TOKENIZER_METHODS:
        raise ValueError(f"cross_tokenizer method must be one of {CROSS_TOKENIZER_METHODS}, got {method!r}")
    if unmapped not in UNMAPPED_POLICIES:
        raise ValueError(f"cross_tokenizer unmapped must be one of {UNMAPPED_POLICIES}, got {unmapped!r}")
    if method == "hybrid" and unmapped != "tail_bucket":
        raise ValueError("cross_tokenizer method 'hybrid' compares unmapped mass with ULD and needs "
                         "unmapped='tail_bucket'; use method 'vocab_map' for 'renormalize'")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if method != "uld" and not terms:
        raise ValueError(f"cross_tokenizer method {method!r} needs at least one divergence term")


def cross_tokenizer_per_position(
    student_logits: Tensor,
    teacher_ids: Tensor | None,
    teacher_logprobs: Tensor,
    teacher_log_tail: Tensor | None = None,
    *,
    method: str,
    terms: Sequence[Term] = (),
    temperature: float = 1.0,
    unmapped: str = "tail_bucket",
    uld_weight: float = 1.0,
    student_mapped: Tensor | None = None,
    teacher_unmapped_logprobs: Tensor | None = None,
    teacher_unmapped_rest: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss per compared position ``[N]`` and its unweighted parts by name (each ``[N]``).

    student_logits ``[N, Vs]``. The teacher row, ids / logprobs ``[N, k]`` and log tail ``[N]``
    (``log(1 − Σ p)`` when None; pass −inf for a full distribution), is:

    * ``vocab_map`` / ``hybrid``: already in student ids (:func:`map_teacher_to_student`,
      :func:`move_span_mass`), each student id present (finite logprob) at most once per row;
      absent slots (logprob −inf) are dropped from both sides. The
      divergence mix ``terms`` over the sparse support with tail policy ``unmapped``
      (``tail_bucket`` or ``renormalize``, see :mod:`distillery.losses.forms`); parts are the
      terms' names. ``hybrid`` (tail bucket only) adds ``uld_weight`` × ULD (part ``uld``)
      between ``teacher_unmapped_logprobs [N, u]`` (the log-probs of the row's teacher entries
      with no student token, taken before mapping, −inf padding) and the student's
      probabilities on the ids where ``student_mapped [Vs]`` (bool: some teacher id maps here)
      is False. The listed unmapped entries only: how the teacher's own top-k tail splits is
      unknown. A list cut to its largest entries (:func:`keep_top`, as wide as the student's
      free ids at least) gives the same ULD when ``teacher_unmapped_rest [N]`` carries the rest
      (keep_top's ``rest``).
    * ``uld``: in the teacher's own ids (which are not read; None is fine), sorted or not; the
      loss is the top-k ULD of :func:`uld_distance` (part ``uld``; ``terms`` and
      ``uld_weight`` unused).

    Temperature divides the student logits; the teacher's k + 1 outcomes (entries and tail) are
    raised to 1/T and renormalized as :func:`~distillery.losses.forms.sparse_teacher_log_probs`
    does (exact for a full teacher captured at T = 1). The teacher side gets no gradient.
    """
    _check_call(method, unmapped, temperature, terms)
    if student_logits.dim() != 2 or teacher_logprobs.dim() != 2 or student_logits.shape[0] != teacher_logprobs.shape[0]:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must be [N, V] and [N, k] rows of the same N")
    lp = upcast(teacher_logprobs).detach()
    tail = None if teacher_log_tail is None else upcast(teacher_log_tail).detach()
    if method == "uld":
        return _uld_per_position(student_logits, lp, tail, temperature)
    if teacher_ids is None:
        raise ValueError(f"cross_tokenizer method {method!r} needs teacher_ids in student id space")
    _check_sparse(teacher_ids, lp, tail, "cross_tokenizer_per_position")
    ids = teacher_ids.long()
    vs = student_logits.shape[-1]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vs):
        raise ValueError(f"teacher_ids must be student ids in [0, {vs}) for method {method!r}; "
                         "map the teacher with map_teacher_to_student first")
    log_p, log_q = _vocab_map_support(student_logits, ids, lp, tail, temperature, unmapped)
    total, parts = mix_per_token(log_p, log_q, list(terms))
    if method == "hybrid":
        uld = _hybrid_uld(student_logits, lp, tail, temperature, student_mapped, teacher_unmapped_logprobs,
                          teacher_unmapped_rest)
        parts["uld"] = uld
        total = total + uld_weight * uld
    return total, parts


def _uld_per_position(
    student_logits: Tensor, lp: Tensor, tail: Tensor | None, temperature: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """ULD (top-k form) between the tempered student softmax and the teacher's tempered rows."""
    dummy_ids = torch.zeros_like(lp, dtype=torch.long)  # the tail-bucket teacher reads no ids
    log_p = sparse_teacher_log_probs(dummy_ids, lp, tail, "tail_bucket", temperature, lp.shape[-1] + 1)
    p = log_p.exp()
    q = F.softmax(upcast(student_logits) / temperature, dim=-1)
    uld = uld_distance(q, teacher_sorted_topk=p[:, :-1].to(q.dtype), teacher_tail=p[:, -1])
    return uld, {"uld": uld}


def _hybrid_uld(
    student_logits: Tensor,
    lp: Tensor,
    tail: Tensor | None,
    temperature: float,
    student_mapped: Tensor | None,
    teacher_unmapped_logprobs: Tensor | None,
    teacher_unmapped_rest: Tensor | None = None,
) -> Tensor:
    """ULD between the unmapped parts of both sides, ``[N]`` (see cross_tokenizer_per_position)."""
    vs = student_logits.shape[-1]
    if student_mapped is None or teacher_unmapped_logprobs is None:
        raise ValueError("cross_tokenizer method 'hybrid' needs student_mapped [Vs] and "
                         "teacher_unmapped_logprobs [N, u] (the teacher entries with no student token)")
    if student_mapped.shape != (vs,) or student_mapped.dtype != torch.bool:
        raise ValueError(f"student_mapped must be a bool [Vs] = [{vs}] tensor, got "
                         f"{student_mapped.dtype} {tuple(student_mapped.shape)}")
    if teacher_unmapped_logprobs.dim() != 2 or teacher_unmapped_logprobs.shape[0] != lp.shape[0]:
        raise ValueError(f"teacher_unmapped_logprobs {tuple(teacher_unmapped_logprobs.shape)} must be [N, u] "
                         f"with N = {lp.shape[0]}")
    p_u = _tempered_unmapped(teacher_unmapped_logprobs.detach(), lp, tail, temperature)
    free = torch.nonzero(~student_mapped.to(student_logits.device)).squeeze(-1)
    q_u = F.softmax(upcast(student_logits) / temperature, dim=-1).index_select(-1, free)
    # the top-k form with the teacher cut to the student's width is the full ULD exactly: past
    # it the student side is 0, so Σ|0 − p↓_i| is the cut mass (|tail_q − tail_p|, tail_q = 0);
    # a teacher list no wider than the student's leaves tail_p = 0 and tail_q = Σ q↓ past it
    p_u = p_u.to(q_u.dtype).sort(dim=-1, descending=True).values
    width = min(p_u.shape[-1], q_u.shape[-1])
    rest = p_u[:, width:].sum(-1, dtype=torch.float64)
    if teacher_unmapped_rest is not None:
        if teacher_unmapped_rest.shape != p_u.shape[:1]:
            raise ValueError(f"teacher_unmapped_rest {tuple(teacher_unmapped_rest.shape)} must be [N] = "
                             f"{tuple(p_u.shape[:1])}")
        folded = _tempered_unmapped(teacher_unmapped_rest.detach().unsqueeze(-1), lp, tail, temperature)
        rest = rest + folded.squeeze(-1).double()
    return uld_distance(q_u, teacher_sorted_topk=p_u[:, :width], teacher_tail=rest)
