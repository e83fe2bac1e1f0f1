"""Cross-tokenizer losses (issue 8) against float64 references written the plain way."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.losses.cross_tokenizer import (
    cross_tokenizer_per_position,
    map_teacher_to_student,
    move_span_mass,
    take_span_mass,
    uld_distance,
)
from distillery.losses.forms import dense_per_token, sparse_per_token
from distillery.losses.terms import make_term
from losses._reference import REFERENCES

NEG_INF = float("-inf")
FAST = settings(max_examples=40, deadline=None)


def _probs(seed: int, n: int, v: int, scale: float = 2.0, zeros: float = 0.0) -> torch.Tensor:
    """``[n, v]`` float64 probability rows; a fraction ``zeros`` of the entries set to 0."""
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).softmax(-1)
    if zeros:
        p = p * (torch.rand(n, v, generator=g, dtype=torch.float64) >= zeros)
        p[:, 0] += 1e-3  # keep every row non-empty
        p = p / p.sum(-1, keepdim=True)
    return p


# --------------------------------------------------------------------------------------------
# plain references
# --------------------------------------------------------------------------------------------


def ref_uld(q_row, p_row) -> float:
    """Sort both lists in decreasing order, pad the shorter with zeros, sum |differences|."""
    a = sorted((float(x) for x in q_row), reverse=True)
    b = sorted((float(x) for x in p_row), reverse=True)
    width = max(len(a), len(b))
    a += [0.0] * (width - len(a))
    b += [0.0] * (width - len(b))
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def ref_uld_topk(q_row, top_row, tail: float) -> float:
    """The student's k largest against the teacher's k, plus |tail − the student's rest|."""
    a = sorted((float(x) for x in q_row), reverse=True)
    b = sorted((float(x) for x in top_row), reverse=True)
    k = len(b)
    a += [0.0] * max(0, k - len(a))
    return sum(abs(x - y) for x, y in zip(a[:k], b, strict=True)) + abs(tail - sum(a[k:]))


def ref_student_space(ids, lps, log_tail, mapping, vs):
    """The teacher's rows carried to student ids with a loop: ``([n, vs] masses, [n] tail)``."""
    dense = torch.zeros(ids.shape[0], vs, dtype=torch.float64)
    tails = []
    for r in range(ids.shape[0]):
        tail = math.exp(float(log_tail[r]))
        for t, lp in zip(ids[r].tolist(), lps[r].tolist(), strict=True):
            s = int(mapping[t])
            if s < 0:
                tail += math.exp(lp)
            else:
                dense[r, s] += math.exp(lp)
        tails.append(tail)
    return dense, torch.tensor(tails, dtype=torch.float64)


def ref_support(dense, tail, z, policy, T):
    """Per row, teacher and student probabilities over the policy's support (plain lists):
    support S = the student ids the teacher has mass on; tail_bucket adds the bucket unless S is
    the whole vocabulary. The teacher's outcomes are raised to 1/T and renormalized."""
    rows = []
    for r in range(dense.shape[0]):
        q = (z[r].double() / T).softmax(-1).tolist()
        support = [v for v in range(dense.shape[1]) if dense[r, v] > 0]
        p_s = [float(dense[r, v]) for v in support]
        q_s = [q[v] for v in support]
        if policy == "tail_bucket" and len(support) < dense.shape[1]:
            p_s.append(float(tail[r]))
            q_s.append(sum(q[v] for v in range(dense.shape[1]) if v not in support))
        if policy == "renormalize" or len(support) == dense.shape[1]:
            q_s = [x / sum(q_s) for x in q_s]
        p_s = [x ** (1 / T) for x in p_s]
        p_s = [x / sum(p_s) for x in p_s]
        rows.append((torch.tensor(p_s, dtype=torch.float64), torch.tensor(q_s, dtype=torch.float64)))
    return rows


def _teacher_topk(seed, n, vt, k, scale=2.0):
    """A top-k teacher row: ids, log-probs ``[n, k]`` (float64) and the log tail ``[n]``."""
    lt = _probs(seed, n, vt, scale).log()
    lps, ids = lt.topk(k, dim=-1)
    tail = torch.log1p(-lps.exp().sum(-1).clamp_max(1 - 1e-12))
    return ids, lps, tail


def _mapping(seed, vt, vs, mode):
    """teacher id -> student id or −1: 'random' (some unmapped, some many-to-one),
    'many_to_one' (every teacher id onto one of 2 student ids) or 'all_unmapped'."""
    g = torch.Generator().manual_seed(seed)
    if mode == "all_unmapped":
        return torch.full((vt,), -1, dtype=torch.long)
    if mode == "many_to_one":
        return torch.randint(0, min(2, vs), (vt,), generator=g)
    m = torch.randint(-1, vs, (vt,), generator=g)
    return m


# --------------------------------------------------------------------------------------------
# ULD
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vs", "vt"), [(7, 11), (11, 7), (9, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uld_matches_the_plain_reference(vs, vt, dtype):
    q, p = _probs(1, 4, vs), _probs(2, 4, vt, zeros=0.3)
    got = uld_distance(q.to(dtype), p.to(dtype))
    assert got.dtype == dtype and got.shape == (4,)
    ref = torch.tensor([ref_uld(q[r], p[r]) for r in range(4)], dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    assert (ref > 0.05).all()  # a real difference, not a trivially passing 0


@pytest.mark.parametrize("given_tail", [True, False])
def test_uld_topk_matches_the_plain_reference(given_tail):
    q, p = _probs(3, 5, 12), _probs(4, 5, 20)
    top = p.topk(4, dim=-1).values[:, [2, 0, 3, 1]]  # not in order: the function sorts
    tail = 1 - top.sum(-1)
    got = uld_distance(q.float(), teacher_sorted_topk=top.float(), teacher_tail=tail.float() if given_tail else None)
    ref = torch.tensor([ref_uld_topk(q[r], top[r], float(tail[r])) for r in range(5)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_uld_gradcheck_in_float64():
    g = torch.Generator().manual_seed(5)
    q = torch.rand(3, 6, generator=g, dtype=torch.float64).add(0.05).requires_grad_()
    p = _probs(6, 3, 9)
    top = p.topk(4, -1).values
    assert torch.autograd.gradcheck(lambda x: uld_distance(x, p), (q,))
    assert torch.autograd.gradcheck(lambda x: uld_distance(x, teacher_sorted_topk=top, teacher_tail=1 - top.sum(-1)), (q,))


@FAST
@given(seed=st.integers(0, 2**31 - 1), vs=st.integers(1, 12), vt=st.integers(1, 12))
def test_uld_is_a_symmetric_permutation_invariant_metric(seed, vs, vt):
    q, p = _probs(seed, 3, vs, zeros=0.2), _probs(seed + 1, 3, vt, zeros=0.2)
    d = uld_distance(q, p)
    assert (d >= 0).all()
    torch.testing.assert_close(uld_distance(p, q), d, rtol=0, atol=1e-15)
    g = torch.Generator().manual_seed(seed)
    perm_q, perm_p = torch.randperm(vs, generator=g), torch.randperm(vt, generator=g)
    torch.testing.assert_close(uld_distance(q[:, perm_q], p[:, perm_p]), d, rtol=0, atol=1e-15)
    # zero exactly for a permutation of the teacher's vector, positive when the sorted differ
    assert (uld_distance(p[:, perm_p], p) == 0).all()
    qs, ps = q.sort(-1, descending=True).values, p.sort(-1, descending=True).values
    width = max(vs, vt)
    differ = ~torch.nn.functional.pad(qs, (0, width - vs)).eq(torch.nn.functional.pad(ps, (0, width - vt))).all(-1)
    assert ((d > 0) == differ).all()


@FAST
@given(seed=st.integers(0, 2**31 - 1), vs=st.integers(1, 12), vt=st.integers(2, 12), k=st.integers(1, 12))
def test_uld_topk_is_a_lower_bound_equal_for_a_k_sparse_teacher(seed, vs, vt, k):
    k = min(k, vt)
    q, p = _probs(seed, 4, vs, zeros=0.2), _probs(seed + 1, 4, vt, scale=3.0)
    top = p.topk(k, -1).values
    bound = uld_distance(q, teacher_sorted_topk=top, teacher_tail=1 - top.sum(-1))
    assert (bound <= uld_distance(q, p) + 1e-12).all()
    # an exactly k-sparse teacher: the rest is 0, the bound is the full ULD
    sparse = torch.zeros_like(p).scatter(-1, p.topk(k, -1).indices, top / top.sum(-1, keepdim=True))
    top_s = sparse.topk(k, -1).values
    exact = uld_distance(q, teacher_sorted_topk=top_s, teacher_tail=torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(exact, uld_distance(q, sparse), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# map_teacher_to_student
# --------------------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 2**31 - 1), vt=st.integers(2, 15), vs=st.integers(1, 9), k=st.integers(1, 15),
    mode=st.sampled_from(["random", "many_to_one", "all_unmapped"]), with_tail=st.booleans(),
)
def test_mapping_conserves_mass_and_merges_duplicates(seed, vt, vs, k, mode, with_tail):
    k = min(k, vt)
    ids, lps, tail = _teacher_topk(seed, 3, vt, k)
    mapping = _mapping(seed, vt, vs, mode)
    out_ids, out_lp, out_tail = map_teacher_to_student(ids, lps, mapping, tail if with_tail else None)
    assert out_ids.shape == out_lp.shape == (3, k) and out_tail.shape == (3,)
    # mass: what came in (given tail, or 1 − Σ p when none) goes out
    total_in = lps.exp().sum(-1) + (tail.exp() if with_tail else 1 - lps.exp().sum(-1))
    torch.testing.assert_close(out_lp.exp().sum(-1) + out_tail.exp(), total_in, rtol=0, atol=1e-6)
    # every id is a valid student id; present ids are unique per row
    assert ((out_ids >= 0) & (out_ids < vs)).all()
    present = out_lp > NEG_INF
    for r in range(3):
        row = out_ids[r][present[r]].tolist()
        assert len(row) == len(set(row))
    # the same masses as the plain loop
    dense, ref_tail = ref_student_space(ids, lps, tail, mapping, vs)
    got = torch.zeros(3, vs, dtype=torch.float64).scatter_add(-1, out_ids, out_lp.exp())
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-15)
    if with_tail:
        torch.testing.assert_close(out_tail.exp(), ref_tail, rtol=1e-12, atol=1e-15)
    if mode == "all_unmapped":
        assert not present.any()


def _mapped_case(seed=7, n=4, vt=14, vs=9, k=6):
    ids, lps, tail = _teacher_topk(seed, n, vt, k)
    mapping = torch.tensor([0, 1, 1, -1, 2, 3, -1, 5, 5, 6, -1, 7, 8, 4])[:vt]
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(n, vs, generator=g, dtype=torch.float64) * 2
    return ids, lps, tail, mapping, z


def test_mapped_rows_feed_sparse_per_token_directly_for_forward_kl():
    """Absent slots are duplicates at −inf: exact for the tail bucket with forward KL."""
    ids, lps, tail, mapping, z = _mapped_case()
    m_ids, m_lp, m_tail = map_teacher_to_student(ids, lps, mapping, tail)
    assert (m_lp == NEG_INF).any()  # the case has freed slots
    got, _ = sparse_per_token(z, m_ids, m_lp, m_tail, [make_term("forward_kl")], tail_policy="tail_bucket")
    dense, ref_tail = ref_student_space(ids, lps, tail, mapping, z.shape[-1])
    ref = [REFERENCES["forward_kl"](p, q) for p, q in ref_support(dense, ref_tail, z, "tail_bucket", 1.0)]
    torch.testing.assert_close(got, torch.stack(ref))


@pytest.mark.parametrize("policy", ["tail_bucket", "renormalize"])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_vocab_map_matches_the_dense_reference(policy, T, name):
    ids, lps, tail, mapping, z = _mapped_case()
    m_ids, m_lp, m_tail = map_teacher_to_student(ids, lps, mapping, tail)
    zg = z.clone().requires_grad_()
    got, parts = cross_tokenizer_per_position(
        zg, m_ids, m_lp, m_tail, method="vocab_map", terms=[make_term(name, 0.5)], temperature=T, unmapped=policy
    )
    dense, ref_tail = ref_student_space(ids, lps, tail, mapping, z.shape[-1])
    ref = torch.stack([REFERENCES[name](p, q) for p, q in ref_support(dense, ref_tail, z, policy, T)])
    torch.testing.assert_close(parts[name], ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got, 0.5 * ref, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), zg)
    assert grad.isfinite().all() and grad.abs().sum() > 0


@pytest.mark.parametrize("policy", ["tail_bucket", "renormalize"])
def test_identity_mapping_of_a_full_teacher_is_the_dense_form(policy):
    """Every student id present: no room for a bucket, so it is the dense divergence."""
    vs = 7
    lt = _probs(8, 3, vs).log()
    z = torch.randn(3, vs, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ident = torch.arange(vs)
    m = map_teacher_to_student(ident.expand(3, vs), lt, ident, torch.full((3,), NEG_INF, dtype=torch.float64))
    for name in ("forward_kl", "reverse_kl"):
        got, _ = cross_tokenizer_per_position(z, *m, method="vocab_map", terms=[make_term(name)], temperature=1.5, unmapped=policy)
        ref, _ = dense_per_token(z, lt, [make_term(name)], temperature=1.5)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("policy", ["tail_bucket", "renormalize"])
def test_vocab_map_is_zero_when_the_student_is_the_mapped_teacher(policy):
    ids, lps, tail, mapping, _ = _mapped_case()
    m_ids, m_lp, m_tail = map_teacher_to_student(ids, lps, mapping, tail)
    dense, ref_tail = ref_student_space(ids, lps, tail, mapping, 9)
    # the student puts the teacher's mapped masses on their ids and spreads the tail elsewhere
    outside = dense == 0
    student = torch.where(outside, ref_tail[:, None] / outside.sum(-1, keepdim=True), dense)
    got, _ = cross_tokenizer_per_position(
        student.log(), m_ids, m_lp, m_tail, method="vocab_map",
        terms=[make_term("forward_kl"), make_term("reverse_kl")], unmapped=policy,
    )
    torch.testing.assert_close(got, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rows_with_nothing_mapped_give_zero_loss_and_finite_gradients():
    # three rows over disjoint teacher ids; only row 0's ids have student tokens
    lps = _probs(10, 3, 7).log()[:, :6]
    ids = torch.arange(18).reshape(3, 6)
    mapping = torch.full((18,), -1, dtype=torch.long)
    mapping[:6] = torch.tensor([0, 1, 1, 2, 3, 4])
    z = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    m = map_teacher_to_student(ids, lps, mapping)
    assert (m[1][0] > NEG_INF).any() and not (m[1][1:] > NEG_INF).any()
    for policy in ("tail_bucket", "renormalize"):
        zg = z.clone().requires_grad_()
        terms = [make_term("reverse_kl"), make_term("jsd")]
        got, _ = cross_tokenizer_per_position(zg, *m, method="vocab_map", terms=terms, unmapped=policy)
        (grad,) = torch.autograd.grad(got.sum(), zg)
        assert grad.isfinite().all() and got[0] > 0
        torch.testing.assert_close(got[1:], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
        assert (grad[1:] == 0).all()


# --------------------------------------------------------------------------------------------
# move_span_mass
# --------------------------------------------------------------------------------------------


def ref_move(ids_row, lp_row, log_tail, src, dst, log_mass):
    """One row as a dict {student id: mass} plus the tail, moved the plain way."""
    row = {int(i): math.exp(float(x)) for i, x in zip(ids_row, lp_row, strict=True) if float(x) > NEG_INF}
    tail = math.exp(float(log_tail))
    src_key = src if src in row else "tail"
    dst_key = dst if dst >= 0 else "tail"
    if src_key == dst_key:
        return row, tail
    held = tail if src_key == "tail" else row[src_key]
    amount = min(math.exp(float(log_mass)), held)
    if src_key == "tail":
        tail -= amount
    else:
        row[src_key] -= amount
    if dst_key == "tail":
        tail += amount
    else:
        row[dst_key] = row.get(dst_key, 0.0) + amount
    return row, tail


def _as_dict(ids_row, lp_row):
    out: dict[int, float] = {}
    for i, x in zip(ids_row.tolist(), lp_row.tolist(), strict=True):
        if x > NEG_INF:
            assert i not in out, "a student id is present twice"
            out[i] = math.exp(x)
    return out


@FAST
@given(seed=st.integers(0, 2**31 - 1), vs=st.integers(1, 8), k=st.integers(1, 8))
def test_move_span_mass_conserves_mass_and_lands_on_to(seed, vs, k):
    n, vt = 6, 12
    k = min(k, vt)
    ids, lps, tail = _teacher_topk(seed, n, vt, k)
    m_ids, m_lp, m_tail = map_teacher_to_student(ids, lps, _mapping(seed, vt, vs, "random"), tail)
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(-1, vs, (n,), generator=g)
    dst = torch.randint(-1, vs, (n,), generator=g)
    # from nothing to more than anything holds (clamped)
    log_mass = torch.tensor([NEG_INF, -8.0, -3.0, -1.0, 0.0, 2.0], dtype=torch.float64)[torch.randperm(n, generator=g)]
    o_ids, o_lp, o_tail = move_span_mass(m_ids, m_lp, m_tail, src, dst, log_mass)
    assert o_ids.shape == o_lp.shape == (n, k + 1)
    assert ((o_ids >= 0) & (o_ids < vs)).all()
    torch.testing.assert_close(o_lp.exp().sum(-1) + o_tail.exp(), m_lp.exp().sum(-1) + m_tail.exp(), rtol=0, atol=1e-12)
    for r in range(n):
        row, ref_tail = ref_move(m_ids[r], m_lp[r], m_tail[r], int(src[r]), int(dst[r]), log_mass[r])
        got = _as_dict(o_ids[r], o_lp[r])
        assert got.keys() == {i for i, x in row.items() if x > 0}
        for i, x in got.items():
            assert math.isclose(x, row[i], rel_tol=1e-9, abs_tol=1e-15)
        assert math.isclose(math.exp(float(o_tail[r])), ref_tail, rel_tol=1e-9, abs_tol=1e-15)


def test_move_span_mass_clamps_and_creates_the_destination():
    ids = torch.tensor([[3, 1, 3], [0, 2, 0]])
    lp = torch.tensor([[0.1, 0.5, 0.0], [0.3, 0.2, 0.0]], dtype=torch.float64).log()
    log_tail = torch.tensor([0.4, 0.5], dtype=torch.float64).log()
    # row 0: 0.9 asked from id 3 (holds 0.1) to id 1; row 1: 0.05 from the tail to new id 4
    o_ids, o_lp, o_tail = move_span_mass(
        ids, lp, log_tail, torch.tensor([3, -1]), torch.tensor([1, 4]), torch.tensor([0.9, 0.05], dtype=torch.float64).log()
    )
    assert _as_dict(o_ids[0], o_lp[0]) == pytest.approx({1: 0.6})
    assert _as_dict(o_ids[1], o_lp[1]) == pytest.approx({0: 0.3, 2: 0.2, 4: 0.05})
    torch.testing.assert_close(o_tail.exp(), torch.tensor([0.4, 0.45], dtype=torch.float64))
    assert o_lp[0, 0] == NEG_INF  # emptied, not negative


@FAST
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 8))
def test_take_span_mass_takes_the_moved_mass_from_the_token_only(seed, k):
    n, vt = 6, 12
    ids, lps, _ = _teacher_topk(seed, n, vt, min(k, vt))
    g = torch.Generator().manual_seed(seed)
    token = torch.randint(0, vt, (n,), generator=g)  # sometimes in the row, sometimes not
    log_mass = torch.tensor([NEG_INF, -8.0, -3.0, -1.0, 0.0, 2.0], dtype=torch.float64)[torch.randperm(n, generator=g)]
    got = take_span_mass(ids, lps, token, log_mass)
    for r in range(n):
        for i, x in zip(ids[r].tolist(), lps[r].tolist(), strict=True):
            want = math.exp(x)
            if i == int(token[r]):  # the plain way: subtract, never below zero
                want = max(want - min(math.exp(float(log_mass[r])), want), 0.0)
            assert math.isclose(math.exp(float(got[r, ids[r].tolist().index(i)])), want, rel_tol=1e-9, abs_tol=1e-15)


# --------------------------------------------------------------------------------------------
# hybrid and uld per position
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_hybrid_is_vocab_map_plus_weighted_uld_of_the_unmapped_parts(T):
    vs = 11  # ids 9 and 10: no teacher token maps there
    ids, lps, tail, mapping, z = _mapped_case(vs=vs)
    m = map_teacher_to_student(ids, lps, mapping, tail)
    student_mapped = torch.zeros(vs, dtype=torch.bool)
    student_mapped[mapping[mapping >= 0]] = True
    unmapped_lp = lps.masked_fill(mapping[ids] >= 0, NEG_INF)
    zg = z.clone().requires_grad_()
    got, parts = cross_tokenizer_per_position(
        zg, *m, method="hybrid", terms=[make_term("forward_kl")], temperature=T, uld_weight=0.3,
        student_mapped=student_mapped, teacher_unmapped_logprobs=unmapped_lp,
    )
    dense, ref_tail = ref_student_space(ids, lps, tail, mapping, vs)
    kl = torch.stack([REFERENCES["forward_kl"](p, q) for p, q in ref_support(dense, ref_tail, z, "tail_bucket", T)])
    uld = []
    for r in range(4):
        # the teacher's unmapped entries at T, over the same normaliser as its mapped outcomes
        z_t = sum(float(x) ** (1 / T) for x in dense[r] if x > 0) + float(ref_tail[r]) ** (1 / T)
        p_u = [math.exp(float(x)) ** (1 / T) / z_t for x in unmapped_lp[r] if x > NEG_INF]
        q = (z[r] / T).softmax(-1)
        uld.append(ref_uld([q[v] for v in range(vs) if not student_mapped[v]], p_u))
    uld = torch.tensor(uld, dtype=torch.float64)
    assert (uld > 0).all()
    torch.testing.assert_close(parts["uld"], uld, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got, kl + 0.3 * uld, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), zg)
    assert grad.isfinite().all()


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_uld_per_position_matches_the_reference(T):
    lt = _probs(12, 4, 15).log()
    z = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    zg = z.clone().requires_grad_()
    # top-k teacher, in teacher ids, not sorted
    lps, ids = lt.topk(5, -1)
    lps, ids = lps[:, [3, 0, 4, 1, 2]], ids[:, [3, 0, 4, 1, 2]]
    tail = torch.log1p(-lps.exp().sum(-1))
    got, parts = cross_tokenizer_per_position(zg, ids, lps, tail, method="uld", temperature=T)
    assert parts.keys() == {"uld"}
    ref = []
    for r in range(4):
        outcomes = [math.exp(float(x)) ** (1 / T) for x in [*lps[r], tail[r]]]
        outcomes = [x / sum(outcomes) for x in outcomes]
        ref.append(ref_uld_topk((z[r] / T).softmax(-1), outcomes[:-1], outcomes[-1]))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), zg)
    assert grad.isfinite().all() and grad.abs().sum() > 0
    # the full teacher with a zero tail: the full ULD
    full, _ = cross_tokenizer_per_position(z, None, lt, torch.full((4,), NEG_INF, dtype=torch.float64), method="uld")
    ref_full = [ref_uld(z[r].softmax(-1), lt[r].exp()) for r in range(4)]
    torch.testing.assert_close(full, torch.tensor(ref_full, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_bad_calls_say_what_to_fix():
    ids, lps, tail, mapping, z = _mapped_case()
    m = map_teacher_to_student(ids, lps, mapping, tail)
    kl = [make_term("forward_kl")]
    with pytest.raises(ValueError, match="method must be one of"):
        cross_tokenizer_per_position(z, *m, method="gold", terms=kl)
    with pytest.raises(ValueError, match="needs unmapped='tail_bucket'"):
        cross_tokenizer_per_position(z, *m, method="hybrid", terms=kl, unmapped="renormalize")
    with pytest.raises(ValueError, match="student_mapped"):
        cross_tokenizer_per_position(z, *m, method="hybrid", terms=kl)
    with pytest.raises(ValueError, match="map the teacher with map_teacher_to_student"):
        cross_tokenizer_per_position(z, ids, lps, tail, method="vocab_map", terms=kl)  # teacher ids
    with pytest.raises(ValueError, match="at least one divergence"):
        cross_tokenizer_per_position(z, *m, method="vocab_map", terms=[])
    with pytest.raises(ValueError, match="mapping's teacher vocabulary"):
        map_teacher_to_student(ids, lps, mapping[:5], tail)
    with pytest.raises(ValueError, match="exactly one of"):
        uld_distance(z.softmax(-1), lps.exp(), teacher_sorted_topk=lps.exp())


@pytest.mark.parametrize("method", ["vocab_map", "hybrid", "uld"])
def test_float32_and_bfloat16_inputs_agree_with_float64(method):
    vs = 11
    ids, lps, tail, mapping, z = _mapped_case(vs=vs)
    m = map_teacher_to_student(ids, lps, mapping, tail)
    student_mapped = torch.zeros(vs, dtype=torch.bool)
    student_mapped[mapping[mapping >= 0]] = True
    teacher = (ids, lps, tail) if method == "uld" else m
    kw = dict(method=method, terms=[make_term("jsd")], temperature=1.3, student_mapped=student_mapped,
              teacher_unmapped_logprobs=lps.masked_fill(mapping[ids] >= 0, NEG_INF))
    ref, _ = cross_tokenizer_per_position(z, *teacher, **kw)
    low = [t.float() if t.is_floating_point() else t for t in teacher]
    got, _ = cross_tokenizer_per_position(z.float(), *low, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    got16, _ = cross_tokenizer_per_position(z.bfloat16(), *low, **kw)  # computed in float32
    assert got16.dtype == torch.float32 and got16.isfinite().all()
