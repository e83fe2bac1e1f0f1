"""Feature (hidden-state) and relation (Gram-matrix) distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.losses import FeatureDistiller, feature_loss, relation_loss


def _states(seed, b=2, s=5, h=6, n=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, generator=g, dtype=torch.float64) for _ in range(n))


MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)


def test_feature_losses_match_plain_formulas():
    a, b = _states(0, h=4, n=2)
    mse = sum(((a[i, j] - b[i, j]) ** 2).mean() for i in range(2) for j in range(5) if MASK[i, j]) / MASK.sum()
    cos = sum(1 - torch.dot(a[i, j], b[i, j]) / (a[i, j].norm() * b[i, j].norm()) for i in range(2) for j in range(5) if MASK[i, j]) / MASK.sum()
    torch.testing.assert_close(feature_loss(a, b, MASK, "mse"), mse)
    torch.testing.assert_close(feature_loss(a, b, MASK, "cosine"), cos)


def test_relation_losses_match_plain_formulas():
    s, t = _states(1, h=4, n=1)[0], _states(2, h=7, n=1)[0]
    per_seq_mse, per_seq_kl = [], []
    for i in range(2):
        xs, xt = s[i][MASK[i]], t[i][MASK[i]]
        gs = torch.stack([torch.stack([F.cosine_similarity(u, v, dim=0) for v in xs]) for u in xs])
        gt = torch.stack([torch.stack([F.cosine_similarity(u, v, dim=0) for v in xt]) for u in xt])
        per_seq_mse.append(((gs - gt) ** 2).mean())
        p, q = (gt / 0.5).softmax(-1), (gs / 0.5).softmax(-1)
        per_seq_kl.append((p * (p / q).log()).sum(-1).mean())
    torch.testing.assert_close(relation_loss(s, t, MASK, "mse"), torch.stack(per_seq_mse).mean())
    torch.testing.assert_close(relation_loss(s, t, MASK, "kl", temperature=0.5), torch.stack(per_seq_kl).mean())


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_relation_is_zero_under_rotation_and_scale_and_positive_otherwise(kind):
    (s,) = _states(3, h=6, n=1)
    rot, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    t = 3.0 * s @ rot
    assert float(relation_loss(s, t, MASK, kind)) < 1e-12
    (other,) = _states(5, h=6, n=1)
    assert float(relation_loss(s, other, MASK, kind)) > 1e-3


def test_masked_positions_do_not_matter():
    s, t = _states(6, h=4, n=2)[0], _states(7, h=8, n=1)[0]
    fd = FeatureDistiller(4, 8, {0: 0}, relation_weight=0.5).double()
    loss, _ = fd((s,), (t,), MASK)
    s2, t2 = s.clone(), t.clone()
    s2[~MASK] = 100.0
    t2[~MASK] = -7.0
    loss2, _ = fd((s2,), (t2,), MASK)
    torch.testing.assert_close(loss, loss2)


def test_distiller_combines_pairs_and_terms():
    ss, ts = _states(8, h=4, n=3), _states(9, h=8, n=5)
    fd = FeatureDistiller(4, 8, [(1, 2), (-1, -1)], loss="cosine", feature_weight=2.0, relation_weight=0.5,
                          relation_loss="kl", relation_temperature=0.2).double()
    loss, m = fd(ss, ts, MASK)
    feats = [feature_loss(fd.projections[k](ss[i]), ts[j], MASK, "cosine") for k, i, j in (("s1_t2", 1, 2), ("sm1_tm1", -1, -1))]
    rels = [relation_loss(ss[i], ts[j], MASK, "kl", 0.2) for i, j in ((1, 2), (-1, -1))]
    torch.testing.assert_close(loss, 2.0 * (feats[0] + feats[1]) / 2 + 0.5 * (rels[0] + rels[1]) / 2)
    assert set(m) == {"feature/s1_t2", "feature/sm1_tm1", "relation/s1_t2", "relation/sm1_tm1", "feature", "relation", "loss"}
    assert math.isclose(m["loss"], float(loss.detach()))
    # gradients reach the projections and the student, never the teacher
    ss = tuple(x.clone().requires_grad_() for x in ss)
    ts = tuple(x.clone().requires_grad_() for x in ts)
    loss, _ = fd(ss, ts, MASK)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fd.parameters())
    assert ss[1].grad.abs().sum() > 0 and all(t.grad is None for t in ts)


def test_with_hf_hidden_states_training_reduces_loss():
    transformers = pytest.importorskip("transformers")

    def llama(h, seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=h, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, tie_word_embeddings=True))

    student, teacher = llama(32, 0), llama(48, 1).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.bool)
    fd = FeatureDistiller(32, 48, {1: 1, 2: 2}, loss="mse", relation_weight=1.0)
    opt = torch.optim.Adam(list(student.parameters()) + list(fd.parameters()), lr=1e-2)
    with torch.no_grad():
        t_states = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(t_states) == 3

    def step():
        s_states = student(input_ids=ids, output_hidden_states=True).hidden_states
        return fd(s_states, t_states, mask)

    first, _ = step()
    for _ in range(15):
        opt.zero_grad()
        loss, _ = step()
        loss.backward()
        opt.step()
    last, metrics = step()
    assert float(last.detach()) < 0.7 * float(first.detach())
    assert metrics["relation"] >= 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        FeatureDistiller(4, 8, {})
    with pytest.raises(ValueError):
        FeatureDistiller(4, 8, {0: 0}, loss="l1")
