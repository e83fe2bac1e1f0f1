"""The logit shard codec: per example, per position, the teacher's top-k ids and log-probs and the
log tail mass, in a few bits per entry; one shard file holds many examples, each decodable on its
own from a memory map. The byte layout and the error bounds are in ``docs/logit_format.md``.

Per position ``t`` (all streams vectorized with numpy, no per-position Python loop):

* ids: sorted ascending, gaps ``g_0 = id_0``, ``g_i = id_i - id_{i-1} - 1`` Rice-coded with a
  per-position parameter ``b_t`` (the one that minimizes the bits): the unary quotients go to
  one bit stream, the ``b_t``-bit remainders to another;
* log-probs: the top-1 log-prob as float16; every entry (the top-1 included) as a level
  ``round(M_t * sqrt(p_i / p_1))`` with ``M_t = 2**w_t - 1``: uniform steps in ``sqrt(p)``
  spread the KL error evenly over the entries. ``w_t`` is the fewest bits (at most
  ``logprob_bits``) for which the decoded position's KL to the true one is at most ``max_kl``;
  the encoder checks it by decoding;
* the log tail mass as float16.

The decoder renormalizes the k + 1 buckets (top-k and tail), so its output is a distribution.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillery.errors import DistilleryError

FORMAT_VERSION = 1
MAGIC = b"DLLOGIT\x00"
SUFFIX = ".dlc"

# header: magic, version, k, vocab_size, logprob_bits, flags, max_kl, n_examples,
# index_offset, index_bytes, strings_bytes, index_crc, header_crc
_HEADER = struct.Struct("<8sIIIBBxxdQQQQII")
HEADER_SIZE = _HEADER.size
_INDEX = np.dtype([
    ("id_offset", "<u8"), ("id_len", "<u4"), ("n_tokens", "<u4"), ("n_positions", "<u4"),
    ("crc", "<u4"), ("offset", "<u8"), ("nbytes", "<u8"),
])
_MAX_B = 15  # Rice parameter and level width share one byte per position: b << 4 | (w - 1)
_ZERO_LEVEL = 0.25  # level 0 decodes to u = 0.25 / M: never a zero probability
# header flag bits; a reader refuses bits it does not know rather than misreading the payload
FLAG_OFFSETS = 1  # every example stores its tokens' character offsets (cross-tokenizer caches)
_KNOWN_FLAGS = FLAG_OFFSETS


class ShardError(DistilleryError, ValueError):
    """A shard file that is not one, is truncated or corrupt, or of an unknown version."""


@dataclass
class TopKExample:
    """One example: its ``token_ids [T]`` and per stored position (``P`` of them, ``T`` or
    ``T - 1``: the capture decides) the top-k ``ids [P, k]``, ``logprobs [P, k]`` (float32)
    and ``log_tail [P]`` (log of the mass outside the top k). ``offsets [T, 2]`` (int, optional)
    are the tokens' character spans ``(start, end)`` in the text they were cut from, ``(-1, -1)``
    for tokens outside it (chat template, special tokens): a student with another tokenizer
    aligns to the teacher's tokens through them (:mod:`distillery.train.cross_tokenizer`)."""

    id: str
    token_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    log_tail: np.ndarray
    offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids).reshape(-1)
        if self.offsets is not None:
            self.offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1, 2)
            if len(self.offsets) != len(self.token_ids):
                raise ValueError(f"example {self.id!r}: {len(self.offsets)} offsets for "
                                 f"{len(self.token_ids)} tokens")
        self.ids = np.asarray(self.ids)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        self.log_tail = np.asarray(self.log_tail, dtype=np.float32).reshape(-1)
        if self.ids.ndim == 1:
            self.ids = self.ids[:, None]
            self.logprobs = self.logprobs.reshape(-1, 1)
        if self.ids.shape != self.logprobs.shape or self.ids.shape[0] != self.log_tail.shape[0]:
            raise ValueError(f"example {self.id!r}: ids {self.ids.shape}, logprobs "
                             f"{self.logprobs.shape}, log_tail {self.log_tail.shape} disagree")

    @property
    def num_positions(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_topk(cls, example_id: str, token_ids: Any, topk: Any) -> TopKExample:
        """From a :class:`distillery.losses.TeacherTopK` of one sequence (torch or numpy)."""
        def arr(x: Any) -> np.ndarray:
            return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        tail = topk.log_tail
        if tail is None:
            raise ValueError("the log tail mass is needed (TeacherTopK.log_tail is None)")
        return cls(example_id, arr(token_ids), arr(topk.ids), arr(topk.logprobs), arr(tail))

    def to_topk(self) -> Any:
        """As a :class:`distillery.logits.topk.TeacherTopK` of torch tensors (ids int64)."""
        import torch

        from distillery.logits.topk import TeacherTopK  # torch only when asked: format is numpy

        return TeacherTopK(torch.from_numpy(self.ids.astype(np.int64)),
                           torch.from_numpy(self.logprobs), torch.from_numpy(self.log_tail))


# ---------------------------------------------------------------------------------- bit streams


def _pack_fixed(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate ``values[i]`` in ``widths[i]`` (0..16) bits, MSB first, byte-padded."""
    if not len(widths):
        return np.zeros(0, np.uint8)
    w = widths.astype(np.int64)
    v = values.astype(np.int64)
    ends = np.cumsum(w)
    total = int(ends[-1])
    starts = ends - w
    word, off = starts >> 5, starts & 31  # 32-bit big-endian words; the bits never overlap, so
    spill = off + w - 32                  # summing the parts (bincount) is OR-ing them
    first = np.where(spill > 0, v >> np.maximum(spill, 0), v << np.maximum(-spill, 0))
    n_words = (total + 31) // 32 + 1
    acc = np.bincount(word, weights=first, minlength=n_words)
    over = spill > 0
    if over.any():
        second = (v[over] << (32 - spill[over])) & 0xFFFFFFFF
        acc += np.bincount(word[over] + 1, weights=second, minlength=n_words)
    return acc.astype(">u4").view(np.uint8)[: _nbytes(total)]


def _unpack_fixed(buf: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_fixed`: int64 values."""
    widths = widths.astype(np.int64)
    if not len(widths) or widths.max() == 0:
        return np.zeros(len(widths), np.int64)
    ends = np.cumsum(widths)
    if ends[-1] > 8 * len(buf):
        raise ShardError("fixed-width stream too short")
    starts = ends - widths
    padded = np.concatenate([buf, np.zeros(3, np.uint8)]).astype(np.uint32)
    byte = starts >> 3
    word = (padded[byte] << 16) | (padded[byte + 1] << 8) | padded[byte + 2]  # 24 bits >= 7 + 16
    return ((word >> (24 - (starts & 7) - widths)) & ((1 << widths) - 1)).astype(np.int64)


def _pack_unary(q: np.ndarray) -> np.ndarray:
    """``q[i]`` zeros then a one, concatenated, byte-padded."""
    ends = np.cumsum(q.astype(np.int64) + 1)
    bits = np.zeros(int(ends[-1]) if len(ends) else 0, np.uint8)
    bits[ends - 1] = 1
    return np.packbits(bits)


def _unpack_unary(buf: np.ndarray, n: int) -> np.ndarray:
    ones = np.flatnonzero(np.unpackbits(buf))[:n]
    if len(ones) < n:
        raise ShardError("unary stream too short")
    return np.diff(ones, prepend=-1) - 1


def _nbytes(bits: int) -> int:
    return (bits + 7) // 8


# ------------------------------------------------------------------------------------- the codec


def _decode_logprobs(top1: np.ndarray, tail: np.ndarray, levels: np.ndarray,
                     widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-probs [P, k] and log tail [P] from the stored fields, renormalized."""
    m = (2.0 ** widths.astype(np.float64) - 1)[:, None]
    u = np.where(levels > 0, levels, _ZERO_LEVEL) / m
    lp = top1.astype(np.float64)[:, None] + 2.0 * np.log(u)
    lt = tail.astype(np.float64)
    both = np.concatenate([lp, lt[:, None]], axis=1)
    mx = both.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(both - mx).sum(axis=1))
    return lp - lse[:, None], lt - lse


def _kl_rows(true_lp: np.ndarray, true_lt: np.ndarray, lp: np.ndarray, lt: np.ndarray) -> np.ndarray:
    """Per row KL(true || decoded) over the k + 1 buckets, float64 (the true one renormalized)."""
    both = np.concatenate([true_lp, true_lt[:, None]], axis=1)
    mx = both.max(axis=1, keepdims=True)
    both = both - (mx + np.log(np.exp(both - mx).sum(axis=1, keepdims=True)))
    dec = np.concatenate([lp, lt[:, None]], axis=1)
    p = np.exp(both)
    with np.errstate(invalid="ignore"):
        diff = np.where(p > 0, both - dec, 0.0)
    return (p * diff).sum(axis=1)


def _levels(true_lp: np.ndarray, top1: np.ndarray, widths: np.ndarray) -> np.ndarray:
    m = (2.0 ** widths.astype(np.float64) - 1)[:, None]
    u = np.exp(np.minimum((true_lp - top1.astype(np.float64)[:, None]) / 2.0, 0.0))
    return np.clip(np.rint(u * m), 0, m).astype(np.int64)


def _rice_param(x: np.ndarray, cap: np.ndarray, fixed: bool = False) -> np.ndarray:
    """Per row the Rice parameter (<= cap) with the fewest bits for ``x [P, k]``, trying the
    three around ``log2(mean)``; with ``fixed``, ``cap`` itself means "plain cap bits"."""
    k = x.shape[1]
    guess = np.floor(np.log2(x.mean(axis=1) * np.log(2) + 1)).astype(np.int64)
    best = np.minimum(guess, cap)
    best_cost = np.where(fixed & (best == cap), k * cap, (x >> best[:, None]).sum(axis=1) + k * (best + 1))
    for d in (-1, 1):
        c = np.clip(guess + d, 0, cap)
        cost = np.where(fixed & (c == cap), k * cap, (x >> c[:, None]).sum(axis=1) + k * (c + 1))
        better = cost < best_cost
        best[better], best_cost[better] = c[better], cost[better]
    if fixed:  # plain bits beat Rice on flat rows
        better = k * cap < best_cost
        best[better] = cap[better]
    return best


def encode_positions(ids: np.ndarray, logprobs: np.ndarray, log_tail: np.ndarray, *,
                     vocab_size: int, logprob_bits: int = 12, max_kl: float = 5e-4) -> bytes:
    """The coded positions of one example (everything but its token ids)."""
    P, k = ids.shape
    ids = ids.astype(np.int64)
    lp = logprobs.astype(np.float64)
    if P == 0:
        return b""
    if np.isnan(lp).any() or np.isnan(log_tail).any():
        raise ValueError("NaN log-probs")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids outside [0, {vocab_size})")
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    lp = np.take_along_axis(lp, order, axis=1)
    gaps = np.diff(ids, axis=1, prepend=-1) - 1
    if (gaps < 0).any():
        raise ValueError("repeated token id within a position")
    # Rice parameter per position: the cheapest of 0.._MAX_B
    best_b = _rice_param(gaps, np.full(P, _MAX_B))
    q = gaps >> best_b[:, None]
    r = gaps & ((1 << best_b[:, None]) - 1)

    top1 = lp.max(axis=1).astype(np.float16)
    tail = log_tail.astype(np.float16)
    if np.isinf(top1).any():  # -inf top-1: nothing to scale by; store the smallest fp16 instead
        top1[np.isneginf(top1)] = np.float16(-65504)
    # level width: start below the estimate M >= sqrt(k p1 / (6 max_kl)), add bits until the
    # decoded KL is within max_kl (or the width is logprob_bits)
    p1 = np.exp(top1.astype(np.float64))
    est = np.ceil(np.log2(np.sqrt(k * p1 / (6 * max_kl)) + 1))
    widths = np.clip(est - 2, 1, logprob_bits).astype(np.int64)
    todo = np.arange(P)
    levels = np.zeros((P, k), np.int64)
    true_lt = log_tail.astype(np.float64)
    while len(todo):
        levels[todo] = _levels(lp[todo], top1[todo], widths[todo])
        dlp, dlt = _decode_logprobs(top1[todo], tail[todo], levels[todo], widths[todo])
        kl = _kl_rows(lp[todo], true_lt[todo], dlp, dlt)
        bad = (kl > max_kl) & (widths[todo] < logprob_bits)
        todo = todo[bad]
        widths[todo] += 1

    # levels: Rice-coded with a per-position parameter c < w when that is shorter than w fixed
    # bits (peaked rows: most levels are small), else plain w bits (c = w, no unary part)
    best_c = _rice_param(levels, widths, fixed=True)
    rice = best_c < widths
    lq = levels[rice] >> best_c[rice][:, None]

    bw = ((best_b << 4) | (widths - 1)).astype(np.uint8)
    unary = _pack_unary(np.concatenate([q.reshape(-1), lq.reshape(-1)]))
    levels_mask = (1 << best_c[:, None]) - 1
    rem = _pack_fixed(np.concatenate([r.reshape(-1), (levels & levels_mask).reshape(-1)]),
                      np.concatenate([np.repeat(best_b, k), np.repeat(best_c, k)]))
    return b"".join([struct.pack("<I", len(unary)), top1.tobytes(), tail.tobytes(), bw.tobytes(),
                     best_c.astype(np.uint8).tobytes(), unary.tobytes(), rem.tobytes()])


def decode_positions(buf: memoryview | bytes, n_positions: int, k: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [P, k] int64 (ascending per row), logprobs [P, k] float32, log_tail [P] float32."""
    P = n_positions
    if P == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32)
    raw = np.frombuffer(buf, np.uint8)
    (n_unary,) = struct.unpack_from("<I", buf, 0)
    top1 = raw[4 : 4 + 2 * P].view(np.float16)
    tail = raw[4 + 2 * P : 4 + 4 * P].view(np.float16)
    bw = raw[4 + 4 * P : 4 + 5 * P].astype(np.int64)
    c = raw[4 + 5 * P : 4 + 6 * P].astype(np.int64)
    b, widths = bw >> 4, (bw & 15) + 1
    rice = c < widths
    n_rice = int(rice.sum())
    o = 4 + 6 * P
    unary = raw[o : o + n_unary]
    o += n_unary
    uq = _unpack_unary(unary, (P + n_rice) * k)
    q = uq[: P * k].reshape(P, k)
    r_all = _unpack_fixed(raw[o:], np.concatenate([np.repeat(b, k), np.repeat(c, k)]))
    r = r_all[: P * k].reshape(P, k)
    gaps = (q << b[:, None]) | r
    ids = np.cumsum(gaps + 1, axis=1) - 1
    levels = r_all[P * k :].reshape(P, k)
    levels[rice] |= uq[P * k :].reshape(n_rice, k) << c[rice][:, None]
    lp, lt = _decode_logprobs(top1, tail, levels, widths)
    return ids, lp.astype(np.float32), lt.astype(np.float32)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---------------------------------------------------------------------------------- shard files


def write_shard(path: str | os.PathLike, examples: list[TopKExample], k: int, vocab_size: int, *,
                logprob_bits: int = 12, max_kl: float = 5e-4) -> int:
    """Write ``examples`` to one shard file atomically (tmp + fsync + rename); bytes written.

    Every position's decoded top-k distribution (k + 1 buckets) is within ``max_kl`` nats of
    the true one, unless that needs more than ``logprob_bits`` (1..16) bits per log-prob.
    """
    if not 1 <= logprob_bits <= 16:
        raise ValueError("logprob_bits must be in 1..16")
    if not 0 < k <= vocab_size:
        raise ValueError(f"k={k} must be in 1..vocab_size={vocab_size}")
    path = Path(path)
    tdt = _token_dtype(vocab_size)
    with_offsets = {ex.offsets is not None for ex in examples}
    if len(with_offsets) > 1:
        raise ValueError("either every example of a shard has offsets or none has")
    flags = FLAG_OFFSETS if with_offsets == {True} else 0
    seen: set[str] = set()
    index = np.zeros(len(examples), _INDEX)
    strings = bytearray()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_SIZE)
            offset = HEADER_SIZE
            for i, ex in enumerate(examples):
                if ex.id in seen:
                    raise ValueError(f"example id {ex.id!r} twice in one shard")
                seen.add(ex.id)
                if ex.ids.shape[1] != k:
                    raise ValueError(f"example {ex.id!r} has k={ex.ids.shape[1]}, the shard {k}")
                toks = ex.token_ids.astype(np.int64)
                if len(toks) and (toks.min() < 0 or toks.max() >= 1 << (8 * tdt.itemsize)):
                    raise ValueError(f"example {ex.id!r}: token ids out of range")
                spans = ex.offsets.astype("<i4").tobytes() if flags & FLAG_OFFSETS else b""
                blob = toks.astype(tdt).tobytes() + spans + encode_positions(
                    ex.ids, ex.logprobs, ex.log_tail, vocab_size=vocab_size,
                    logprob_bits=logprob_bits, max_kl=max_kl)
                name = ex.id.encode()
                index[i] = (len(strings), len(name), len(toks), ex.num_positions,
                            zlib.crc32(blob), offset, len(blob))
                strings += name
                f.write(blob)
                offset += len(blob)
            idx = index.tobytes() + bytes(strings)
            f.write(idx)
            head = _HEADER.pack(MAGIC, FORMAT_VERSION, k, vocab_size, logprob_bits, flags, max_kl,
                                len(examples), offset, index.nbytes, len(strings),
                                zlib.crc32(idx), 0)
            head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
            f.seek(0)
            f.write(head)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return offset + len(idx)


def fsync_dir(d: Path) -> None:
    """Flush directory ``d``'s entries, so a rename into it survives a crash (best effort:
    some filesystems cannot open or fsync a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardReader:
    """A shard file, memory-mapped: the header and index are read on open, each example's bytes
    only when it is decoded (so shards bigger than RAM are fine)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise ShardError(f"logit shard {self.path}: cannot open ({exc})") from exc
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, why: str) -> ShardError:
        return ShardError(f"logit shard {self.path}: {why}")

    def _open(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE or not head.startswith(MAGIC):
            raise self._fail("not a distillery logit shard (bad magic or truncated header)")
        (_, version, k, vocab, bits, flags, max_kl, n, index_offset, index_bytes, strings_bytes,
         index_crc, head_crc) = _HEADER.unpack(head)
        if version != FORMAT_VERSION:
            raise self._fail(f"format version {version}, this reader knows {FORMAT_VERSION}")
        if zlib.crc32(head[:-4]) != head_crc:
            raise self._fail("corrupt header (checksum mismatch)")
        if flags & ~_KNOWN_FLAGS:
            raise self._fail(f"unknown header flags {flags:#x}: written by a newer distillery")
        self.flags = flags
        end = index_offset + index_bytes + strings_bytes
        if end != size:
            raise self._fail(f"truncated or padded: {size} bytes, the header says {end}")
        self.k, self.vocab_size, self.logprob_bits, self.max_kl = k, vocab, bits, max_kl
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        idx = self._mm[index_offset:end]
        if zlib.crc32(idx) != index_crc:
            raise self._fail("corrupt index (checksum mismatch)")
        self._index = np.frombuffer(idx, _INDEX, count=n, offset=0)
        strings = idx[index_bytes:]
        self._ids = [strings[o : o + m].decode() for o, m in
                     zip(self._index["id_offset"].tolist(), self._index["id_len"].tolist())]
        self._pos = {name: i for i, name in enumerate(self._ids)}
        if ((self._index["offset"] + self._index["nbytes"]) > index_offset).any():
            raise self._fail("corrupt index (an example points past the payload)")
        self._tdt = _token_dtype(vocab)

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self._mm.close()
            self._mm = None
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._pos

    def get(self, example_id: str) -> TopKExample:
        try:
            i = self._pos[example_id]
        except KeyError:
            raise KeyError(f"example {example_id!r} not in {self.path}") from None
        return self[i]

    def __getitem__(self, i: int) -> TopKExample:
        row = self._index[i]
        off, nbytes = int(row["offset"]), int(row["nbytes"])
        view = memoryview(self._mm)[off : off + nbytes]
        if True:
            if zlib.crc32(view) != int(row["crc"]):
                raise self._fail(f"example {self._ids[i]!r} is corrupt (checksum mismatch)")
            T, P = int(row["n_tokens"]), int(row["n_positions"])
            nt = T * self._tdt.itemsize
            toks = np.frombuffer(view[:nt], self._tdt).astype(np.int64)
            spans = None
            if self.flags & FLAG_OFFSETS:
                spans = np.frombuffer(view[nt : nt + 8 * T], "<i4").reshape(T, 2).astype(np.int64)
                nt += 8 * T
            try:
                ids, lp, lt = decode_positions(view[nt:], P, self.k)
            except (ValueError, struct.error) as exc:
                raise self._fail(f"example {self._ids[i]!r} cannot be decoded ({exc})") from exc
        return TopKExample(self._ids[i], toks, ids, lp, lt, spans)

    def __iter__(self) -> Iterator[TopKExample]:
        return (self[i] for i in range(len(self)))
