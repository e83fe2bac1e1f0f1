"""The logit shard codec, shard files and the cache directory (docs/logit_format.md)."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillery.logits import (
    FORMAT_VERSION,
    CacheError,
    CacheMismatchError,
    CacheWriter,
    LogitCache,
    ShardError,
    ShardReader,
    TopKExample,
    tokenizer_hash,
    write_shard,
)

MAX_KL = 5e-4  # the codec's default bound per position


def make_example(rng: np.random.Generator, name: str, V: int, k: int, P: int, scale: float,
                 tail_logit: float = 0.0) -> TopKExample:
    """A true top-k distribution: k ids, their log-probs and the tail, summing to 1."""
    ids = np.stack([rng.choice(V, size=k, replace=False) for _ in range(P)])
    logits = rng.standard_normal((P, k)) * scale
    logits = -np.sort(-logits, axis=1)
    tail = np.full((P, 1), tail_logit + logits[:, :1].min() - 1.0) if tail_logit else logits[:, -1:]
    both = np.concatenate([logits, tail], axis=1)
    both -= np.logaddexp.reduce(both, axis=1, keepdims=True)
    toks = rng.integers(0, V, size=P + 1)
    return TopKExample(name, toks, ids, both[:, :k].astype(np.float32), both[:, k].astype(np.float32))


def plain_kl(true: TopKExample, dec: TopKExample) -> list[float]:
    """KL(true || decoded) per position over the k + 1 buckets, float64, the plain way."""
    out = []
    for t in range(true.num_positions):
        q = {int(i): math.exp(float(lp)) for i, lp in zip(dec.ids[t], dec.logprobs[t])}
        q_tail = math.exp(float(dec.log_tail[t]))
        p = {int(i): math.exp(float(lp)) for i, lp in zip(true.ids[t], true.logprobs[t])}
        p_tail = math.exp(float(true.log_tail[t]))
        z = sum(p.values()) + p_tail
        kl = 0.0
        for i, pi in p.items():
            if pi > 0:
                kl += pi / z * math.log(pi / z / q[i])
        if p_tail > 0:
            kl += p_tail / z * math.log(p_tail / z / q_tail)
        out.append(kl)
    return out


def check_round_trip(true: TopKExample, dec: TopKExample, max_kl: float = MAX_KL) -> None:
    assert dec.id == true.id
    np.testing.assert_array_equal(dec.token_ids, true.token_ids)
    assert dec.ids.shape == true.ids.shape
    for t in range(true.num_positions):  # same id set; each id keeps its probability
        assert sorted(dec.ids[t].tolist()) == sorted(true.ids[t].tolist())
        p = dict(zip(true.ids[t].tolist(), np.exp(true.logprobs[t].astype(np.float64))))
        q = dict(zip(dec.ids[t].tolist(), np.exp(dec.logprobs[t].astype(np.float64))))
        # documented tolerance: |sqrt(q_i) - sqrt(p_i)| <= sqrt(max_kl), tail likewise
        err = max(abs(math.sqrt(q[i]) - math.sqrt(p[i])) for i in p)
        assert err <= math.sqrt(max_kl) + 1e-6
        tail_err = abs(math.exp(dec.log_tail[t] / 2) - math.exp(true.log_tail[t] / 2))
        assert tail_err <= math.sqrt(max_kl) + 1e-6
        # a decoded position is a distribution
        total = q_sum = sum(q.values()) + math.exp(float(dec.log_tail[t]))
        assert abs(total - 1) < 1e-4, q_sum
    kls = plain_kl(true, dec)
    assert min(kls) > -1e-6
    assert max(kls) <= max_kl * 1.01 + 1e-6  # float32 output rounding


def round_trip(tmp_path, examples, k, V, **opts) -> list[TopKExample]:
    path = tmp_path / "s.dlc"
    n = write_shard(path, examples, k, V, **opts)
    assert n == path.stat().st_size
    with ShardReader(path) as r:
        return [r[i] for i in range(len(r))]


def test_round_trip_basic(tmp_path):
    rng = np.random.default_rng(0)
    exs = [make_example(rng, f"ex{i}", 32000, 64, 40, s) for i, s in enumerate([0.5, 2, 6, 12])]
    for true, dec in zip(exs, round_trip(tmp_path, exs, 64, 32000)):
        check_round_trip(true, dec)
        t1 = true.logprobs.max(axis=1)
        d1 = np.array([dec.logprobs[t][dec.ids[t] == true.ids[t][np.argmax(true.logprobs[t])]][0]
                       for t in range(true.num_positions)])
        assert np.abs(d1 - t1).max() < 0.01  # the top-1 is kept (fp16 + renormalization)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), V=st.integers(50, 200_000), k=st.integers(1, 128),
       P=st.integers(1, 50), scale=st.sampled_from([0.0, 0.3, 1.0, 3.0, 10.0, 30.0]),
       tail_logit=st.sampled_from([0.0, -30.0, 5.0]), max_kl=st.sampled_from([5e-4, 1e-3, 1e-5]))
def test_round_trip_hypothesis(tmp_path, seed, V, k, P, scale, tail_logit, max_kl):
    k = min(k, V)
    rng = np.random.default_rng(seed)
    true = make_example(rng, "x", V, k, P, scale, tail_logit)
    (dec,) = round_trip(tmp_path, [true], k, V, max_kl=max_kl, logprob_bits=16)
    check_round_trip(true, dec, max_kl)


def test_offsets_round_trip_and_flag(tmp_path):
    """Token offsets (cross-tokenizer caches) come back exactly; a shard cannot mix with and
    without them, and a reader refuses header flags it does not know."""
    rng = np.random.default_rng(3)
    exs = [make_example(rng, f"o{i}", 500, 8, P, 2.0) for i, P in enumerate([5, 1, 12])]
    for ex in exs:
        T = len(ex.token_ids)
        ex.offsets = np.stack([np.arange(T) * 2 - 1, np.arange(T) * 2 + 1], axis=1)
        ex.offsets[0] = (-1, -1)
    decoded = round_trip(tmp_path, exs, 8, 500)
    for true, dec in zip(exs, decoded):
        check_round_trip(true, dec)
        np.testing.assert_array_equal(dec.offsets, true.offsets)
    plain = make_example(rng, "plain", 500, 8, 3, 1.0)
    assert round_trip(tmp_path, [plain], 8, 500)[0].offsets is None
    with pytest.raises(ValueError, match="every example"):
        write_shard(tmp_path / "mixed.dlc", [exs[0], plain], 8, 500)
    with pytest.raises(ValueError, match="offsets for"):
        TopKExample("bad", [1, 2, 3], np.zeros((2, 1)), np.zeros((2, 1)), np.zeros(2), offsets=[[0, 1]])
    path = tmp_path / "s.dlc"
    raw = bytearray(path.read_bytes())
    raw[21] |= 0x80  # an unknown flag bit, header checksum fixed so only the flag is wrong
    raw[68:72] = struct.pack("<I", zlib.crc32(bytes(raw[:68])))
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="unknown header flags"):
        ShardReader(path)


def test_edge_cases(tmp_path):
    rng = np.random.default_rng(1)
    ex = make_example(rng, "full", 40, 40, 5, 3.0)
    ex.log_tail[:] = -np.inf  # k == V: no tail
    ex.logprobs -= np.logaddexp.reduce(ex.logprobs, axis=1, keepdims=True)
    empty = TopKExample("empty", np.zeros(0, np.int64), np.zeros((0, 40), np.int64),
                        np.zeros((0, 40), np.float32), np.zeros(0, np.float32))
    ex2 = make_example(rng, "zeros", 40, 40, 5, 3.0)
    ex2.logprobs[:, -3:] = -np.inf  # probabilities that underflowed
    dec = round_trip(tmp_path, [ex, empty, ex2], 40, 40)
    check_round_trip(ex, dec[0])
    assert dec[1].ids.shape == (0, 40) and len(dec[1].token_ids) == 0
    assert max(plain_kl(ex2, dec[2])) <= MAX_KL * 1.01
    with pytest.raises(ValueError, match="repeated"):
        bad = make_example(rng, "dup", 100, 4, 2, 1.0)
        bad.ids[0, 1] = bad.ids[0, 0]
        write_shard(tmp_path / "b.dlc", [bad], 4, 100)
    with pytest.raises(ValueError, match="twice"):
        write_shard(tmp_path / "b.dlc", [ex, ex], 40, 40)
    assert not list(tmp_path.glob("b.dlc*"))  # a failed write leaves nothing


def test_large_vocab_token_ids(tmp_path):
    rng = np.random.default_rng(2)
    ex = make_example(rng, "big", 128_256, 16, 10, 3.0)
    ex.token_ids[0] = 128_255
    (dec,) = round_trip(tmp_path, [ex], 16, 128_256)
    check_round_trip(ex, dec)


def test_random_access_by_id_and_lazy_reads(tmp_path):
    rng = np.random.default_rng(3)
    exs = [make_example(rng, f"id-{i}", 32000, 8, 5 + i, 4.0) for i in range(20)]
    # one example whose payload (token ids) is 20 MB: reading another must not touch it
    huge = TopKExample("huge", rng.integers(0, 32000, 10_000_000), exs[0].ids[:1],
                       exs[0].logprobs[:1], exs[0].log_tail[:1])
    path = tmp_path / "s.dlc"
    write_shard(path, exs[:10] + [huge] + exs[10:], 8, 32000)
    assert path.stat().st_size > 20_000_000
    tracemalloc.start()
    with ShardReader(path) as r:
        assert len(r) == 21 and r.ids()[10] == "huge" and "id-13" in r
        for i in (17, 2, 13):
            check_round_trip(exs[i], r.get(f"id-{i}"))
        _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2_000_000, peak
    with ShardReader(path) as r, pytest.raises(KeyError, match="nope"):
        r.get("nope")


def test_corrupt_and_truncated_files(tmp_path):
    rng = np.random.default_rng(4)
    exs = [make_example(rng, f"e{i}", 1000, 8, 6, 2.0) for i in range(3)]
    path = tmp_path / "s.dlc"
    write_shard(path, exs, 8, 1000)
    data = path.read_bytes()

    trunc = tmp_path / "trunc.dlc"
    trunc.write_bytes(data[:-10])
    with pytest.raises(ShardError, match="trunc.dlc.*truncated"):
        ShardReader(trunc)
    short = tmp_path / "short.dlc"
    short.write_bytes(data[:20])
    with pytest.raises(ShardError, match="short.dlc"):
        ShardReader(short)
    notours = tmp_path / "other.dlc"
    notours.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ShardError, match="other.dlc.*magic"):
        ShardReader(notours)
    newer = tmp_path / "newer.dlc"
    newer.write_bytes(data[:8] + (FORMAT_VERSION + 1).to_bytes(4, "little") + data[12:])
    with pytest.raises(ShardError, match="newer.dlc.*version"):
        ShardReader(newer)
    # flip a byte inside example 1's payload: 0 and 2 still decode, 1 is reported
    with ShardReader(path) as r:
        off = int(r._index[1]["offset"]) + 30
    bad = bytearray(data)
    bad[off] ^= 0xFF
    flipped = tmp_path / "flip.dlc"
    flipped.write_bytes(bytes(bad))
    with ShardReader(flipped) as r:
        check_round_trip(exs[0], r[0])
        check_round_trip(exs[2], r[2])
        with pytest.raises(ShardError, match="flip.dlc.*'e1'.*corrupt"):
            r[1]
    with pytest.raises(ShardError, match="missing.dlc"):
        ShardReader(tmp_path / "missing.dlc")


def _writer(d, **kw):
    return CacheWriter(d, teacher="t", tokenizer_hash="h", k=8, temperature=1.0,
                       vocab_size=1000, shard_size=3, **kw)


def test_cache_writer_kill_and_resume(tmp_path):
    rng = np.random.default_rng(5)
    exs = [make_example(rng, f"q{i}", 1000, 8, 4 + i % 3, 3.0) for i in range(10)]
    d = tmp_path / "cache"
    w = _writer(d)
    for ex in exs[:7]:  # two shards written, one example buffered
        w.add(ex)
    (d / "shard-000002.dlc.tmp").write_bytes(b"partial")  # the kill hit a shard mid-write
    del w
    assert not (d / "manifest.json").exists()
    with pytest.raises(CacheError, match=str(d)):
        LogitCache(d)

    w = _writer(d)
    assert w.done_ids() == {f"q{i}" for i in range(6)}
    assert not list(d.glob("*.tmp"))
    for ex in exs:
        if ex.id not in w.done_ids():
            w.add(ex)
    w.add(exs[0])  # already written: skipped
    m = w.finish()
    assert m.count == 10 and sum(s["count"] for s in m.shards) == 10 and len(m.shards) == 4
    assert sum(s["sequence_tokens"] for s in m.shards) == sum(len(e.token_ids) for e in exs)
    assert m.positions == sum(e.num_positions for e in exs) == sum(s["positions"] for s in m.shards)
    assert m.bytes_per_position == sum(s["bytes"] for s in m.shards) / m.positions
    assert all(s["bytes"] == (d / s["file"]).stat().st_size for s in m.shards)

    cache = LogitCache(d)
    assert len(cache) == 10 and "q9" in cache and "zz" not in cache
    assert sorted(cache.ids()) == sorted(e.id for e in exs)
    for ex in exs:
        check_round_trip(ex, cache[ex.id])
    assert cache.manifest.k == 8 and cache.manifest.format_version == FORMAT_VERSION
    with pytest.raises(CacheMismatchError, match="other settings"):
        CacheWriter(d, teacher="t", tokenizer_hash="h", k=16, temperature=1.0, vocab_size=1000)


def test_cache_errors(tmp_path):
    with pytest.raises(CacheError, match="nothing.*manifest"):
        LogitCache(tmp_path / "nothing")
    d = tmp_path / "c"
    w = _writer(d)
    w.finish()
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match=f"{d}.*corrupt"):
        LogitCache(d)
    w = _writer(d)
    raw = json.loads(json.dumps(w.finish().__dict__))
    raw["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CacheError, match=f"{d}.*version 99"):
        LogitCache(d)


def test_tokenizer_hash(tmp_path, tiny_tokenizer, task_cfg):
    from distillery.models import load_tokenizer, train_tokenizer
    from distillery.tasks import load_problems

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer_hash(again) == tokenizer_hash(tiny_tokenizer)
    problems = load_problems(task_cfg, "train", 300, seed=0)
    other = train_tokenizer([p.prompt + " the answer is " + p.chain for p in problems], vocab_size=300)
    assert tokenizer_hash(other) != tokenizer_hash(tiny_tokenizer)

    d = tmp_path / "cache"
    CacheWriter(d, teacher="t", tokenizer_hash=tokenizer_hash(tiny_tokenizer), k=4,
                temperature=1.0, vocab_size=300).finish()
    cache = LogitCache(d)
    cache.check_tokenizer(again)
    with pytest.raises(CacheMismatchError, match="cross_tokenizer") as info:
        cache.check_tokenizer(other)
    assert tokenizer_hash(other) in str(info.value) and str(d) in str(info.value)


def test_real_teacher_distributions(tmp_path, demo_teacher):
    tok = demo_teacher.tokenizer
    prompts = ["12 + 7 - 3 =", "45 - 19 + 8 = 34", "3 + 4 + 5 = 12", "99 - 98 ="]
    seqs = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    V = len(tok)
    for k in (8, 64):
        tops = demo_teacher.logprobs(seqs, k=k)
        exs = [TopKExample.from_topk(f"p{i}", s, t) for i, (s, t) in enumerate(zip(seqs, tops))]
        d = tmp_path / f"cache{k}"
        w = CacheWriter(d, teacher="demo", tokenizer_hash=tokenizer_hash(tok), k=k,
                        temperature=1.0, vocab_size=V, shard_size=2)
        for ex in exs:
            w.add(ex)
        m = w.finish()
        cache = LogitCache(d)
        cache.check_tokenizer(tok)
        for ex in exs:
            dec = cache[ex.id]
            check_round_trip(ex, dec)
            back = dec.to_topk()
            assert back.ids.shape == (len(ex.token_ids), k)
        assert m.bytes_per_position < 6 * k
