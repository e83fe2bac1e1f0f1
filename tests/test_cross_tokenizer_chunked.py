"""``cross_tokenizer.form: chunked`` against ``form: dense`` and a plain float64 reference.

Tiny random models with two different tokenizers (a BPE teacher, a unigram student whose
digits merge, so every row kind occurs), in float64: the chunked loss and its gradient wrt
every student parameter must equal the dense form's for vocab_map (both tail policies), uld and
hybrid, at T = 1 and 2, with a live teacher (whole rows or top-k) and a logit cache; for every
chunk size (hypothesis). A dispatch hook checks that no ``[positions, vocab]`` tensor is made.
The pure pieces (mapping whole rows without a sort, cutting a row for ULD) are checked against
plain loops.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from distillery.config import CrossTokenizerConfig, ModelConfig
from distillery.losses import LossSpec
from distillery.losses.cross_tokenizer import (
    cross_tokenizer_per_position,
    keep_top,
    map_full_rows_to_student,
    map_teacher_to_student,
    student_columns,
    uld_distance,
    uld_rows,
)
from distillery.models import build_model, load_tokenizer
from distillery.models.vocab import build_vocab_mapping
from distillery.records import ground_truth_records
from distillery.tasks import load_problems
from distillery.train.cross_tokenizer import CrossTokenizerCollator, CrossTokenizerDataset
from distillery.train.objectives.logit_kd import CrossTokenizerKDObjective

MAX_LEN = 64
TOL = 1e-5


@pytest.fixture(scope="module")
def xt(task_cfg, tiny_tokenizer, merging_tokenizer_dir):
    records = ground_truth_records(load_problems(task_cfg, "train", 8, seed=0), "chain")
    student_tok = load_tokenizer(str(merging_tokenizer_dir))
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, tie_word_embeddings=False),
                          tiny_tokenizer).double().eval()
    # an output bias on `=-` and `;#-` (tokens the student lacks): the unmapped mass is large,
    # and the lm_head has a bias the chunked projection must apply
    head = teacher.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=torch.float64)
    with torch.no_grad():
        biased.weight.copy_(head.weight * 20.0)
        biased.bias.zero_()
        biased.bias[tiny_tokenizer.convert_tokens_to_ids(["=-", ";#-"])] = 8.0
    teacher.set_output_embeddings(biased)
    student = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), student_tok).double()
    ds = CrossTokenizerDataset(records, student_tok, tiny_tokenizer, MAX_LEN)
    collate = CrossTokenizerCollator(student_tok.pad_token_id, teacher_pad_id=tiny_tokenizer.pad_token_id)
    batch = collate([ds[i] for i in range(len(ds))])
    return {"teacher": teacher, "student": student, "batch": batch, "teacher_tok": tiny_tokenizer,
            "student_tok": student_tok}


def _mapping(xt, prefix=True):
    return build_vocab_mapping(xt["teacher_tok"], xt["student_tok"], len(xt["teacher_tok"]),
                               len(xt["student_tok"]), prefix=prefix)


def _loss_and_grads(xt, form, method, *, cached_batch=None, chunk_rows=64, top_k=None, unmapped=None,
                    temperature=1.0, kd_ratio=1.0):
    cfg = CrossTokenizerConfig(method=method, unmapped=unmapped, form=form, chunk_rows=chunk_rows, top_k=top_k)
    spec = LossSpec(divergence="forward_kl", kd_ratio=kd_ratio, temperature=temperature)
    mapping = None if method == "uld" else _mapping(xt)
    objective = CrossTokenizerKDObjective(spec, cfg, mapping, cached=cached_batch is not None)
    student = xt["student"]
    student.zero_grad(set_to_none=True)
    batch = cached_batch if cached_batch is not None else xt["batch"]
    out = objective.loss(batch, student, None if cached_batch is not None else xt["teacher"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), grads, out.metrics


def _assert_same(a, b, tol=TOL):
    (la, ga, ma), (lb, gb, mb) = a, b
    assert abs(la - lb) <= tol * max(1.0, abs(lb)), (la, lb)
    assert ga.keys() == gb.keys()
    for name in gb:
        err = float((ga[name] - gb[name]).abs().max())
        assert err <= tol * max(1.0, float(gb[name].abs().max())), (name, err)
    assert ma.keys() == mb.keys()
    for key in mb:
        assert abs(ma[key] - mb[key]) <= tol * max(1.0, abs(mb[key])), (key, ma[key], mb[key])


CASES = [("vocab_map", "renormalize"), ("vocab_map", "tail_bucket"), ("uld", None), ("hybrid", None)]


@pytest.mark.parametrize("method,unmapped", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_equals_dense_loss_and_student_gradients(xt, method, unmapped, temperature):
    dense = _loss_and_grads(xt, "dense", method, unmapped=unmapped, temperature=temperature, kd_ratio=0.5)
    chunked = _loss_and_grads(xt, "chunked", method, unmapped=unmapped, temperature=temperature, kd_ratio=0.5,
                              chunk_rows=7)
    _assert_same(chunked, dense)
    assert dense[0] > 0.1 and any(float(g.abs().max()) > 1e-4 for g in dense[1].values())


@settings(max_examples=12, deadline=None)
@given(chunk_rows=st.integers(1, 300), case=st.sampled_from(CASES))
def test_any_chunk_size_gives_the_dense_loss(xt, chunk_rows, case):
    method, unmapped = case
    dense = _loss_and_grads(xt, "dense", method, unmapped=unmapped)
    _assert_same(_loss_and_grads(xt, "chunked", method, unmapped=unmapped, chunk_rows=chunk_rows), dense)


@pytest.mark.parametrize("method", ["vocab_map", "uld", "hybrid"])
def test_top_k_and_cached_rows_take_the_chunked_student_pass(xt, method):
    """Sparse teacher rows (live top-k, or a cache's rows in the batch) go through the dense
    form's own carry; only the student is chunked: the same loss and gradients."""
    _assert_same(_loss_and_grads(xt, "chunked", method, top_k=5, chunk_rows=9),
                 _loss_and_grads(xt, "dense", method, top_k=5))
    batch = dict(xt["batch"])
    with torch.no_grad():  # the whole teacher row, as a capture with k = V stores it
        t = xt["teacher"](input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"])
        lp = torch.log_softmax(t.logits[batch["xt_row"], batch["xt_teacher_pos"]], -1)
        chain = torch.log_softmax(t.logits[batch["xt_chain_row"], batch["xt_chain_pos"]], -1)
    member = chain.gather(-1, batch["xt_chain_token"][:, None])[:, 0]
    n = lp.shape[0]
    log_mass = torch.full((n,), -float("inf"), dtype=lp.dtype).index_put(
        (batch["xt_chain_seg"],), torch.zeros_like(member)).index_add(0, batch["xt_chain_seg"], member)
    batch.update(xt_teacher_ids=torch.arange(lp.shape[-1]).expand(n, -1), xt_teacher_logprobs=lp,
                 xt_teacher_log_tail=torch.full((n,), -float("inf"), dtype=lp.dtype), xt_log_mass=log_mass)
    cached = _loss_and_grads(xt, "chunked", method, cached_batch=batch, chunk_rows=5)
    _assert_same(cached, _loss_and_grads(xt, "dense", method, cached_batch=batch))
    # and a cache with the whole row is the live teacher
    _assert_same(cached, _loss_and_grads(xt, "dense", method))


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op creates (views excluded: they allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("method", ["vocab_map", "uld", "hybrid"])
def test_no_tensor_holds_a_vocabulary_row_per_position(xt, method):
    """The widest tensors of the chunked pass hold ``chunk_rows`` rows of either vocabulary;
    the dense pass (the control) holds one per position."""
    vocab = {len(xt["teacher_tok"]), len(xt["student_tok"])}
    batch, hidden = xt["batch"]["input_ids"].shape[0], xt["student"].config.hidden_size
    positions = int(xt["batch"]["input_ids"].numel())
    chunk = batch  # the models' own lm_head runs at one position per sequence: batch rows

    def widest(form):
        with _Shapes() as rec:
            _loss_and_grads(xt, form, method, chunk_rows=chunk)
        # [hidden, vocab] is a transposed copy of an lm_head weight (the matmul's): no positions
        return max(max(1, int(torch.tensor(s[:-1]).prod())) for s in rec.shapes
                   if len(s) >= 2 and s[-1] in vocab and s != (hidden, s[-1]))

    assert widest("chunked") <= chunk
    assert widest("dense") >= positions


# ------------------------------------------------------------------------------ pure pieces


def _full_rows(seed, n, vt):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, vt, generator=g, dtype=torch.float64) * 3, -1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), vt=st.integers(2, 40), vs=st.integers(1, 12))
def test_mapping_whole_rows_without_a_sort_gives_the_same_entries(seed, vt, vs):
    g = torch.Generator().manual_seed(seed)
    mapping = torch.randint(-1, vs, (vt,), generator=g)
    lp = _full_rows(seed, 3, vt)
    lp[0, 0] = -float("inf")  # an entry with no mass stays out
    cols, slot = student_columns(mapping)
    ids, out, tail = map_full_rows_to_student(lp, cols, slot, torch.full((3,), -float("inf"), dtype=lp.dtype))
    ref_ids, ref_lp, ref_tail = map_teacher_to_student(torch.arange(vt).expand(3, vt), lp, mapping,
                                                       torch.full((3,), -float("inf"), dtype=lp.dtype))
    for r in range(3):
        mass = {}
        for t in range(vt):  # plain loop: the student entry of each teacher id
            if int(mapping[t]) >= 0 and float(lp[r, t]) > -float("inf"):
                mass[int(mapping[t])] = mass.get(int(mapping[t]), 0.0) + float(lp[r, t].exp())
        got = {int(i): float(v.exp()) for i, v in zip(ids[r], out[r]) if float(v) > -float("inf")}
        ref = {int(i): float(v.exp()) for i, v in zip(ref_ids[r], ref_lp[r]) if float(v) > -float("inf")}
        assert got.keys() == ref.keys() == mass.keys()
        assert all(abs(got[k] - mass[k]) < 1e-12 and abs(ref[k] - mass[k]) < 1e-12 for k in mass)
    assert torch.allclose(tail, ref_tail, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), vt=st.integers(2, 60), vs=st.integers(1, 30),
       temperature=st.sampled_from([1.0, 0.5, 3.0]))
def test_a_row_cut_to_the_student_width_gives_the_full_uld(seed, vt, vs, temperature):
    lp = _full_rows(seed, 4, vt)
    z = torch.randn(4, vs, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    kw = {"method": "uld", "temperature": temperature}
    full, _ = cross_tokenizer_per_position(z, None, lp, torch.full((4,), -float("inf"), dtype=lp.dtype), **kw)
    top, tail = uld_rows(lp, torch.full((4,), -float("inf"), dtype=lp.dtype), vs, temperature)
    assert top.shape[-1] == min(vs, vt)
    cut, _ = cross_tokenizer_per_position(z, None, top, tail, **kw)
    assert torch.allclose(cut, full, atol=1e-12, rtol=0)
    # and the plain definition at T = 1: sorted L1, the shorter vector zero-padded
    if temperature == 1.0:
        q, p = torch.softmax(z, -1), lp.exp()
        for r in range(4):
            a = sorted(q[r].tolist(), reverse=True)
            b = sorted(p[r].tolist(), reverse=True)
            w = max(len(a), len(b))
            ref = sum(abs(x - y) for x, y in zip(a + [0.0] * (w - len(a)), b + [0.0] * (w - len(b))))
            # the dense form's tail bucket holds e^-80 (its floor): far below the tolerance
            assert abs(float(full[r]) - ref) < 1e-10


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), u=st.integers(1, 40), width=st.integers(1, 40),
       temperature=st.sampled_from([1.0, 2.0]))
def test_keep_top_keeps_the_tempered_normaliser(seed, u, width, temperature):
    lp = _full_rows(seed, 3, u)
    top, rest = keep_top(lp, width, temperature)
    assert torch.equal(top, lp.sort(-1, descending=True).values[:, :width])
    whole = torch.logsumexp(lp / temperature, -1)
    kept = torch.logsumexp(torch.cat([top, rest[:, None]], -1) / temperature, -1)
    assert torch.allclose(kept, whole, atol=1e-12)


def test_hybrid_uld_with_a_cut_unmapped_list_is_the_full_one():
    g = torch.Generator().manual_seed(3)
    n, vs, u = 5, 12, 30
    z = torch.randn(n, vs, generator=g, dtype=torch.float64)
    ids = torch.arange(vs).expand(n, vs)
    lp = torch.log_softmax(torch.randn(n, vs, generator=g, dtype=torch.float64), -1) - 1.0
    tail = torch.full((n,), -0.5, dtype=torch.float64)
    mapped = torch.zeros(vs, dtype=torch.bool)
    mapped[:8] = True  # 4 free student ids; 30 unmapped teacher entries to cut to 4
    lp[:, 8:] = -float("inf")
    unmapped = torch.log_softmax(torch.randn(n, u, generator=g, dtype=torch.float64), -1) - 0.7
    kw = {"method": "hybrid", "terms": LossSpec(divergence="forward_kl").terms(), "student_mapped": mapped}
    full, fp = cross_tokenizer_per_position(z, ids, lp, tail, teacher_unmapped_logprobs=unmapped, **kw)
    top, rest = keep_top(unmapped, int((~mapped).sum()), 1.0)
    cut, cp = cross_tokenizer_per_position(z, ids, lp, tail, teacher_unmapped_logprobs=top,
                                           teacher_unmapped_rest=rest, **kw)
    assert torch.allclose(cut, full, atol=1e-12) and torch.allclose(cp["uld"], fp["uld"], atol=1e-12)
    q = torch.softmax(z, -1)[:, 8:]
    z_t = torch.logsumexp(torch.cat([lp, tail[:, None]], -1), -1, keepdim=True)  # the row's normaliser
    assert torch.allclose(fp["uld"], uld_distance(q, (unmapped - z_t).exp()), atol=1e-12)  # the full form
    assert float(fp["uld"].min()) > 0.01
