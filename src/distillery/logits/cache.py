"""A logit cache: a directory of shard files (``shard-000000.dlc`` ...) and ``manifest.json``
(written last). :class:`CacheWriter` is resumable: after a kill, complete shards stay, the tmp
file of a partial one is discarded, and :meth:`CacheWriter.done_ids` says what to skip."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distillery.chat import IGNORE
from distillery.errors import DistilleryError
from distillery.files import disk_space
from distillery.logits.format import (
    FORMAT_VERSION,
    SUFFIX,
    ShardError,
    ShardReader,
    TopKExample,
    fsync_dir,
    write_shard,
)
from distillery.outputs import claim_dir

MANIFEST = "manifest.json"
CAPTURE = "capture.json"  # the writer's settings, written first: a resume must match them


def stored_positions(labels: list[int]) -> np.ndarray:
    """The positions a cache stores for one example ``[P]``: ``t`` where ``labels[t + 1]`` is
    trained on (``!= IGNORE``). Capture writes these rows and training reads them back by the
    same rule, so both sides agree without storing the positions."""
    lab = np.asarray(labels)
    return np.nonzero(lab[1:] != IGNORE)[0]


class CacheMismatchError(DistilleryError, ValueError):
    """The cache does not fit the student (another tokenizer)."""


class CacheError(DistilleryError, ValueError):
    """A cache directory without a readable manifest, or of an unknown format version."""


@dataclass
class Manifest:
    teacher: str
    tokenizer_hash: str
    k: int
    temperature: float
    vocab_size: int
    count: int
    format_version: int
    # {"file", "count", "bytes", "positions", "sequence_tokens"}: positions are the stored
    # (trained) rows, sequence_tokens every token of the examples, prompts included
    shards: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def positions(self) -> int:
        """Stored positions (rows the student trains on) over all shards."""
        return sum(s["positions"] for s in self.shards)

    @property
    def nbytes(self) -> int:
        """Bytes of all shard files."""
        return sum(s["bytes"] for s in self.shards)

    @property
    def bytes_per_position(self) -> float:
        """Shard bytes per stored position: what a trained token costs on disk. Prompt tokens are
        not stored, so dividing by every sequence token would understate it."""
        return self.nbytes / self.positions if self.positions else 0.0


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 over what decides tokenization: the fast tokenizer's JSON (vocab, merges,
    normalizer, pre-tokenizer, added tokens; padding/truncation settings left out), canonical
    key order, plus the added vocabulary and the special tokens. Same tokenizer reloaded -> same
    hash."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        h.update(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode())
    else:  # slow tokenizer: the vocabulary is what we have
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    added = sorted(tokenizer.get_added_vocab().items()) if hasattr(tokenizer, "get_added_vocab") else []
    special = sorted(getattr(tokenizer, "all_special_tokens", []) or [])
    h.update(json.dumps({"added": added, "special": special}, ensure_ascii=False).encode())
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _shard_counts(reader: ShardReader) -> dict[str, int]:
    """A shard's stored positions and sequence tokens, from its index."""
    return {"positions": int(reader._index["n_positions"].sum()),
            "sequence_tokens": int(reader._index["n_tokens"].sum())}


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}{SUFFIX}"


class CacheWriter:
    """Buffer examples and write a shard atomically every ``shard_size`` of them; ``finish`` writes
    the last one and ``manifest.json``. Opening an existing directory resumes it: complete shards
    are kept (their ids in :meth:`done_ids`), partial ``*.tmp`` files removed; ``add`` skips an id
    already written. ``codec_opts`` go to :func:`write_shard` (``logprob_bits``, ``max_kl``).
    ``source`` fingerprints what the examples are made from (the records, ``max_seq_len``, ...);
    it is kept in ``capture.json`` and the manifest, and resuming from another source is refused,
    as are another teacher, tokenizer or k."""

    def __init__(self, out_dir: str | os.PathLike, *, teacher: str, tokenizer_hash: str, k: int,
                 temperature: float, vocab_size: int, shard_size: int = 1024,
                 source: dict[str, Any] | None = None, **codec_opts: Any) -> None:
        # marked: resuming removes our partial files in it, never a user's
        self.dir = claim_dir(Path(out_dir), "distillery capture",
                             "choose another output_dir, or move the files out of it")
        self.shard_size = shard_size
        self.codec_opts = codec_opts
        self.settings = {"teacher": teacher, "tokenizer_hash": tokenizer_hash, "k": k,
                         "temperature": float(temperature), "vocab_size": vocab_size,
                         "format_version": FORMAT_VERSION}
        if source is not None:
            self.settings["source"] = source
        cap = self.dir / CAPTURE
        if cap.exists():
            old = json.loads(cap.read_text())
            diff = {key: (old.get(key), v) for key, v in self.settings.items() if old.get(key) != v}
            if "source" in diff:
                # the shards on disk hold other examples under the same ids: resuming would
                # report success on stale teacher rows
                changed = sorted(key for key, v in (source or {}).items()
                                 if (old.get("source") or {}).get(key) != v)
                raise CacheMismatchError(
                    f"cache at {self.dir} was captured from other records or settings "
                    f"({', '.join(changed)} changed): use another output_dir or delete it")
            if diff:
                raise CacheMismatchError(f"cache {self.dir} was started with other settings "
                                         f"(old, new): {diff}; use another directory")
        else:
            _write_json_atomic(cap, self.settings)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        (self.dir / MANIFEST).unlink(missing_ok=True)  # rewritten by finish()
        self.shards: list[dict] = []
        self._done: set[str] = set()
        for path in sorted(self.dir.glob(f"shard-*{SUFFIX}")):
            try:
                with ShardReader(path) as r:
                    if (r.k, r.vocab_size) != (k, vocab_size):
                        raise CacheMismatchError(f"{path}: k={r.k}, V={r.vocab_size}; the writer "
                                                 f"has k={k}, V={vocab_size}")
                    ids = r.ids()
                    counts = _shard_counts(r)
            except ShardError:  # unreadable (torn write outside our rename): capture it again
                path.unlink()
                continue
            self.shards.append({"file": path.name, "count": len(ids),
                                "bytes": path.stat().st_size, **counts})
            self._done.update(ids)
        self._next = 1 + max((int(s["file"][6:12]) for s in self.shards), default=-1)
        self._buffer: list[TopKExample] = []
        self._buffered: set[str] = set()

    def done_ids(self) -> set[str]:
        """Ids in complete shards on disk."""
        return set(self._done)

    def add(self, example: TopKExample) -> None:
        if example.id in self._done or example.id in self._buffered:
            return
        self._buffer.append(example)
        self._buffered.add(example.id)
        if len(self._buffer) >= self.shard_size:
            self._flush()

    def flush(self) -> None:
        """Write the buffered examples as a shard now (``finish`` does too)."""
        self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.dir / _shard_name(self._next)
        with disk_space(path, f"logit cache shard {path.name}", f"the {len(self.shards)} complete "
                        f"shards in {self.dir} are kept (a re-run captures only the rest)"):
            nbytes = write_shard(path, self._buffer, self.settings["k"], self.settings["vocab_size"],
                                 **self.codec_opts)
        self.shards.append({"file": path.name, "count": len(self._buffer), "bytes": nbytes,
                            "positions": sum(e.num_positions for e in self._buffer),
                            "sequence_tokens": sum(len(e.token_ids) for e in self._buffer)})
        self._done |= self._buffered
        self._buffer, self._buffered = [], set()
        self._next += 1

    def finish(self, extra: dict | None = None) -> Manifest:
        self._flush()
        s = self.settings
        m = Manifest(teacher=s["teacher"], tokenizer_hash=s["tokenizer_hash"], k=s["k"],
                     temperature=s["temperature"], vocab_size=s["vocab_size"],
                     count=sum(x["count"] for x in self.shards), format_version=FORMAT_VERSION,
                     shards=list(self.shards), extra=dict(extra or {}, **self.codec_opts,
                                                          **({"source": s["source"]} if "source" in s else {})))
        with disk_space(self.dir / MANIFEST, "the cache manifest", f"every shard in {self.dir} is "
                        "complete (a re-run only writes the manifest)"):
            _write_json_atomic(self.dir / MANIFEST, asdict(m))
        return m


class LogitCache:
    """Read side: the manifest, an id -> shard map, one lazily opened reader per shard."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST
        try:
            raw = json.loads(path.read_text())
            self.manifest = Manifest(**raw)
        except FileNotFoundError:
            raise CacheError(f"logit cache {self.dir}: no {MANIFEST} (not a cache, or the capture "
                             f"did not finish)") from None
        except (OSError, ValueError, TypeError) as exc:
            raise CacheError(f"logit cache {self.dir}: corrupt {MANIFEST} ({exc})") from exc
        if self.manifest.format_version != FORMAT_VERSION:
            raise CacheError(f"logit cache {self.dir}: format version "
                             f"{self.manifest.format_version}, this distillery reads "
                             f"{FORMAT_VERSION}")
        self._readers: dict[int, ShardReader] = {}
        self._where: dict[str, int] = {}
        for i, shard in enumerate(self.manifest.shards):
            with ShardReader(self.dir / shard["file"]) as r:
                for name in r.ids():
                    self._where[name] = i
                if "positions" not in shard:  # a manifest from before 2026-12-06: "tokens" counted
                    shard.pop("tokens", None)  # every sequence token; recount from the index
                    shard.update(_shard_counts(r))

    def _reader(self, i: int) -> ShardReader:
        if i not in self._readers:
            self._readers[i] = ShardReader(self.dir / self.manifest.shards[i]["file"])
        return self._readers[i]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._where

    def ids(self) -> list[str]:
        return list(self._where)

    def __getitem__(self, example_id: str) -> TopKExample:
        try:
            i = self._where[example_id]
        except KeyError:
            raise KeyError(f"example {example_id!r} not in logit cache {self.dir}") from None
        return self._reader(i).get(example_id)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def check_tokenizer(self, tokenizer: Any) -> None:
        theirs = tokenizer_hash(tokenizer)
        if theirs != self.manifest.tokenizer_hash:
            raise CacheMismatchError(
                f"cache {self.dir} was captured with tokenizer {self.manifest.tokenizer_hash}, "
                f"the student's is {theirs}: the teacher's top-k ids index another vocabulary; "
                f"use train.objective.cross_tokenizer (logit_kd across tokenizers) or capture "
                f"again with the student's tokenizer")
