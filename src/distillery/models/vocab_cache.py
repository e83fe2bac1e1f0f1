"""The cross-tokenizer vocabulary mapping, built once per pair of tokenizers and kept on disk.

:func:`~distillery.models.vocab.build_vocab_mapping` walks every teacher token (10 to 20 s on
Gemma 3's 262,144 on a busy 2-core machine); it depends only on the two tokenizers and the
mapping options, so :func:`cached_vocab_mapping` keeps its result under
``<cache_root>/vocab_maps/`` and every later training start reads it back in about a second,
most of it hashing the tokenizers.

The key is a content hash, not a path: each tokenizer's full backend definition (vocabulary,
merges, normalizer, pre-tokenizer, decoder, added tokens with their special flags), its
length and its role ids (eos, pad, bos, unk map by role), plus the logit widths, the
``prefix`` option and :data:`FORMAT`. The same tokenizer saved elsewhere hits; any edit misses.
An entry is one safetensors file (two integer tensors and the counts as metadata; no pickle),
written to a temp file and renamed. An entry that cannot be read or does not match its key
is rebuilt, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from distillery.models.gguf import cache_root
from distillery.models.vocab import ROLES, VocabMapping, build_vocab_mapping

# bump when build_vocab_mapping changes what it computes: older entries then miss
FORMAT = 1
SUBDIR = "vocab_maps"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of everything :func:`build_vocab_mapping` reads from ``tokenizer``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; load it "
                        "with AutoTokenizer.from_pretrained(..., use_fast=True)")
    digest = hashlib.sha256(backend.to_str().encode("utf-8"))
    roles = {role: getattr(tokenizer, f"{role}_token_id") for role in ROLES}
    special = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    digest.update(json.dumps({"len": len(tokenizer), "roles": roles, "special": special}).encode())
    return digest.hexdigest()


def mapping_key(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                teacher_vocab_size: int, student_vocab_size: int, prefix: bool) -> dict[str, str]:
    """What an entry is valid for; its sha256 names the file."""
    return {"format": str(FORMAT), "teacher": tokenizer_fingerprint(teacher_tok),
            "student": tokenizer_fingerprint(student_tok), "teacher_vocab_size": str(teacher_vocab_size),
            "student_vocab_size": str(student_vocab_size), "prefix": str(bool(prefix))}


def _entry_path(root: Path, key: dict[str, str]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return root / SUBDIR / f"{name}.safetensors"


def _read(path: Path, key: dict[str, str]) -> VocabMapping:
    """The mapping stored at ``path``; ValueError if it is torn or not the entry for ``key``."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in ("teacher_to_student", "student_mapped")}
    if {k: meta.get(k) for k in key} != key:
        raise ValueError("its key does not match the tokenizers")
    t2s, mapped = tensors["teacher_to_student"], tensors["student_mapped"].bool()
    n_tokens, n_mapped, n_prefix = int(meta["n_tokens"]), int(meta["n_mapped"]), int(meta["n_prefix"])
    if (t2s.dtype != torch.long or tuple(t2s.shape) != (int(key["teacher_vocab_size"]),)
            or tuple(mapped.shape) != (int(key["student_vocab_size"]),) or int((t2s >= 0).sum()) != n_mapped):
        raise ValueError("its tensors do not have the shapes or counts it records")
    return VocabMapping(t2s, mapped, n_mapped, n_tokens, n_prefix)


def _write(path: Path, key: dict[str, str], mapping: VocabMapping) -> None:
    """``path`` written whole or not at all: a temp file in the same folder, then a rename. A
    cache that cannot be written (read-only, full disk) is a warning: training needs only the mapping."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes may build one entry at once
    meta = {**key, "n_tokens": str(mapping.n_tokens), "n_mapped": str(mapping.n_mapped),
            "n_prefix": str(mapping.n_prefix)}
    tensors = {"teacher_to_student": mapping.teacher_to_student.contiguous(),
               "student_mapped": mapping.student_mapped.to(torch.uint8).contiguous()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        warnings.warn(f"{path}: could not cache the vocabulary mapping ({exc}); the next start builds it "
                      "again", stacklevel=3)
    finally:
        with contextlib.suppress(OSError):  # gone after the rename, or its folder never made
            tmp.unlink(missing_ok=True)


def cached_vocab_mapping(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                         teacher_vocab_size: int, student_vocab_size: int, prefix: bool = False,
                         root: Path | None = None, say: Callable[[str], None] | None = None) -> VocabMapping:
    """:func:`build_vocab_mapping`'s result for these arguments, from ``<root>/vocab_maps/`` when
    an entry for the same tokenizer contents and options is there, else built and stored.

    ``root``: default :func:`distillery.models.gguf.cache_root` (``$DISTILLERY_CACHE``).
    ``say``: where the one line about hit or build goes (default: nowhere).
    """
    say = say or (lambda _msg: None)
    key = mapping_key(teacher_tok, student_tok, teacher_vocab_size, student_vocab_size, prefix)
    path = _entry_path(root if root is not None else cache_root(), key)
    if path.exists():
        try:
            mapping = _read(path, key)
            say(f"vocabulary mapping read from the cache ({path})")
            return mapping
        except (SafetensorError, OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
            warnings.warn(f"{path}: unreadable vocabulary mapping cache entry ({exc}); rebuilding it",
                          stacklevel=2)
    start = time.perf_counter()
    mapping = build_vocab_mapping(teacher_tok, student_tok, teacher_vocab_size, student_vocab_size, prefix=prefix)
    _write(path, key, mapping)
    say(f"vocabulary mapping built in {time.perf_counter() - start:.1f} s, cached at {path}")
    return mapping
