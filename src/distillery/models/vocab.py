"""What each token id of a tokenizer stands for, and how two tokenizers' vocabularies relate.

Logit distillation compares the teacher's and the student's distributions id by id, which is
only meaningful when an id means the same text on both sides. :func:`compare_tokenizers` says
whether that holds ("identical", "padded": same tokens plus extra rows on one side, or
"different"); :func:`build_vocab_mapping` maps teacher ids onto student ids that stand for the
same text, for the cross-tokenizer objectives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from distillery.errors import DistilleryError

# Encoded by both tokenizers: if their vocabularies agree but these ids do not, a normalizer
# or pre-tokenizer differs. Covers what tokenizers disagree on: case, accents and combining
# marks, CJK, emoji, runs of whitespace, tabs/newlines, digits, a non-ASCII minus.
PROBE_TEXT = (
    "Hello, World! naïve café Cafe\u0301 東京 😀 ünïcödé\tTab\n\nnew  line   spaces "
    "12345 + 678 = 7023; −42 × 3.14 #79 don't <b>x</b> {'k': [1, 2]}"
)
MAX_LISTED = 10  # differing ids kept in a comparison for the error message


@cache
def _byte_decoder() -> dict[str, int]:
    return {ch: b for b, ch in bytes_to_unicode().items()}


def _decoder_steps(tokenizer: PreTrainedTokenizerBase) -> tuple[dict, list[dict]]:
    """The backend tokenizer's model section and its decoders, flattened out of Sequences."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    spec = json.loads(backend.to_str())
    steps, todo = [], [spec.get("decoder") or {}]
    while todo:
        step = todo.pop(0)
        todo[:0] = step.get("decoders", [])
        steps.append(step)
    return spec["model"], steps


def _piece_bytes(piece: str, byte_level: bool, space_marks: list[str], byte_fallback: bool) -> bytes:
    """The bytes of one vocabulary piece under the decoder's conventions."""
    if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    if byte_level:
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    for mark in space_marks:
        piece = piece.replace(mark, " ")
    return piece.encode("utf-8")


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes each id stands for, ``[len(tokenizer)]``.

    Byte-level pieces ("Ġab") through GPT-2's byte alphabet, metaspace pieces ("▁ab") with the
    mark as a space, byte-fallback pieces ("<0x41>") as their byte; added tokens (special or
    not) as their content, since they are matched as text.
    """
    model, steps = _decoder_steps(tokenizer)
    kinds = {s.get("type") for s in steps}
    byte_level = "ByteLevel" in kinds
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in kinds
    space_marks = [s["replacement"] for s in steps if s.get("type") == "Metaspace"]
    space_marks += [
        s["pattern"]["String"]
        for s in steps
        if s.get("type") == "Replace" and s.get("content") == " " and "String" in s.get("pattern", {})
    ]
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        added[i].encode("utf-8") if i in added else _piece_bytes(p, byte_level, space_marks, byte_fallback)
        for i, p in enumerate(pieces)
    ]


def token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str | None]:
    """The text each id stands for, ``[len(tokenizer)]``; None for a piece of bytes that is not
    whole UTF-8 characters (part of a multi-byte character, to be completed by its neighbours)."""
    out: list[str | None] = []
    for raw in token_bytes(tokenizer):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out


@dataclass
class TokenizerComparison:
    """How a teacher's token ids relate to a student's.

    ``shared``: ids ``[0, shared)`` mean the same token on both sides. ``differing``: the first
    ids (at most 10) whose tokens differ, as ``(id, teacher_piece, student_piece)`` with the raw
    vocabulary pieces ("Ġab", "▁ab"), None where that side has no token for the id (an extra
    embedding row or an id past its vocabulary). ``reason``: one line for humans.
    """

    kind: Literal["identical", "padded", "different"]
    shared: int
    differing: list[tuple[int, str | None, str | None]]
    teacher_size: int
    student_size: int
    reason: str = ""
    # ids with a special role (eos, pad, bos, unk) that differ between the sides; logits still
    # line up when the vocabularies do, so this is a note, not a mismatch (base vs chat models)
    role_notes: list[str] = field(default_factory=list)


class VocabMismatchError(DistilleryError, ValueError):
    """Teacher and student token ids do not mean the same tokens."""


def _pieces(tokenizer: PreTrainedTokenizerBase, size: int) -> list[str | None]:
    """Raw pieces of ids ``[0, size)`` with the special flag folded in; None past the vocabulary."""
    n = min(len(tokenizer), size)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    return [f"{p} [special]" if i in special else p for i, p in enumerate(pieces)] + [None] * (size - n)


def _strip_flag(piece: str | None) -> str | None:
    return piece.removesuffix(" [special]") if piece is not None else None


def _role_notes(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> list[str]:
    notes = []
    for role in ("eos", "pad", "bos", "unk"):
        t, s = getattr(teacher_tok, f"{role}_token_id"), getattr(student_tok, f"{role}_token_id")
        if t != s:
            notes.append(f"{role}: teacher id {t}, student id {s}")
    return notes


def _probe_mismatch(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase, shared: int) -> str:
    """Where the two tokenizers encode a probe text (plus their shared special tokens) apart."""
    specials = [t.content for i, t in teacher_tok.added_tokens_decoder.items() if i < shared]
    text = PROBE_TEXT + "".join(specials)
    t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
    s_ids = student_tok(text, add_special_tokens=False)["input_ids"]
    if t_ids == s_ids:
        return ""
    at = next((i for i, (a, b) in enumerate(zip(t_ids, s_ids, strict=False)) if a != b), min(len(t_ids), len(s_ids)))
    return (
        f"same vocabulary, but the probe text encodes differently from token {at} on "
        f"(teacher {t_ids[at:at + 4]}, student {s_ids[at:at + 4]}): the normalizer or pre-tokenizer differs"
    )


def compare_tokenizers(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    teacher_vocab_size: int | None = None,
    student_vocab_size: int | None = None,
) -> TokenizerComparison:
    """Whether teacher and student ids mean the same tokens.

    ``*_vocab_size``: the model's logit width (embedding rows), which may exceed the
    tokenizer's length (Qwen2.5: 152064 rows for 151936 tokens); default ``len(tokenizer)``.
    Compared: the vocabulary piece of every id (and whether it is a special token), then the
    encoding of a probe text, which catches a normalizer or pre-tokenizer that differs.
    """
    t_size = teacher_vocab_size or len(teacher_tok)
    s_size = student_vocab_size or len(student_tok)
    t_pieces, s_pieces = _pieces(teacher_tok, t_size), _pieces(student_tok, s_size)
    width = max(t_size, s_size)
    t_pieces += [None] * (width - t_size)
    s_pieces += [None] * (width - s_size)
    diff = [i for i in range(width) if t_pieces[i] != s_pieces[i]]
    listed = [(i, _strip_flag(t_pieces[i]), _strip_flag(s_pieces[i])) for i in diff[:MAX_LISTED]]
    first = diff[0] if diff else width
    notes = _role_notes(teacher_tok, student_tok)
    one_sided = any(all(side[i] is None for i in range(first, width)) for side in (t_pieces, s_pieces))
    if diff and not one_sided:
        reason = f"{len(diff)} ids stand for different tokens"
        return TokenizerComparison("different", first, listed, t_size, s_size, reason, notes)
    mismatch = _probe_mismatch(teacher_tok, student_tok, first)
    if mismatch:
        return TokenizerComparison("different", first, listed, t_size, s_size, mismatch, notes)
    if not diff and t_size == s_size:
        return TokenizerComparison("identical", width, [], t_size, s_size, "same tokens and encoding", notes)
    # one side has no token past the shared ids: padded embedding rows or appended tokens
    shared = min(first, t_size, s_size)
    reason = f"same tokens on ids [0, {shared}); teacher has {t_size} ids, student {s_size}"
    return TokenizerComparison("padded", shared, listed, t_size, s_size, reason, notes)


def require_shared_vocab(cmp: TokenizerComparison) -> int:
    """The number of ids that mean the same on both sides; raises for different vocabularies."""
    if cmp.kind != "different":
        return cmp.shared
    shown = ", ".join(f"id {i}: teacher {t!r} vs student {s!r}" for i, t, s in cmp.differing)
    raise VocabMismatchError(
        f"teacher and student tokenizers differ ({cmp.reason}; teacher {cmp.teacher_size} ids, "
        f"student {cmp.student_size}); first differing ids: {shown or 'none in the vocabulary'}. "
        "Same-vocabulary logit distillation cannot compare them id by id: set "
        "train.objective.cross_tokenizer: {method: vocab_map|uld|hybrid} for logit_kd, or train with sft on "
        "teacher-written data"
    )


@dataclass
class VocabMapping:
    """Teacher ids mapped onto the student ids that stand for the same text.

    ``teacher_to_student``: ``[Vt]`` long, the student id of each teacher id or -1.
    ``student_mapped``: ``[Vs]`` bool, True where some teacher id maps. ``n_tokens``: the
    teacher tokenizer's length (ids past it are padded embedding rows). ``n_prefix``: how many
    of the ``n_mapped`` map by prefix (``build_vocab_mapping(prefix=True)``), not by equal text.
    """

    teacher_to_student: torch.Tensor
    student_mapped: torch.Tensor
    n_mapped: int
    n_tokens: int
    n_prefix: int = 0

    @property
    def coverage(self) -> float:
        """The fraction of the teacher's real tokens (ids < len(tokenizer)) that map."""
        return self.n_mapped / max(self.n_tokens, 1)


ROLES = ("eos", "pad", "bos", "unk")


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _student_index(student_tok: PreTrainedTokenizerBase) -> dict[str, int]:
    """Text → student id over the student's ordinary tokens (special ones map by role or content).

    Where several ids stand for one text (a unigram piece "A" and its byte piece "<0x41>"),
    the id the student itself produces for that text alone wins.
    """
    special = _special_ids(student_tok)
    by_text: dict[str, list[int]] = {}
    for i, text in enumerate(token_strings(student_tok)):
        if text is not None and i not in special:
            by_text.setdefault(text, []).append(i)
    index = {}
    for text, ids in by_text.items():
        if len(ids) > 1:
            own = student_tok(text, add_special_tokens=False)["input_ids"]
            ids = own if len(own) == 1 and own[0] in ids else ids
        index[text] = ids[0]
    return index


def _special_pairs(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> dict[int, int]:
    """Teacher special id → student special id: by role (eos↔eos even when their text differs),
    else by equal content."""
    # added_tokens_decoder is rebuilt on every access (22 ms on Gemma's 6,272): read each once
    t_added, s_added = teacher_tok.added_tokens_decoder, student_tok.added_tokens_decoder
    s_by_content = {t.content: i for i, t in s_added.items() if t.special}
    pairs = {i: s_by_content[t.content] for i, t in t_added.items() if t.special and t.content in s_by_content}
    for role in ROLES:
        t, s = getattr(teacher_tok, f"{role}_token_id"), getattr(student_tok, f"{role}_token_id")
        if t is not None and s is not None:
            pairs[t] = s
    return pairs


def build_vocab_mapping(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    teacher_vocab_size: int,
    student_vocab_size: int,
    prefix: bool = False,
) -> VocabMapping:
    """Map every teacher id whose text the student has as one token onto that student id.

    Several teacher ids may map to one student id (their probability mass merges); special
    tokens map by role (eos, pad, bos, unk), else by content; byte pieces that are not whole
    characters and padded rows (ids >= len(tokenizer)) stay unmapped.

    ``prefix``: a teacher token whose text the student has not as one token maps to the
    student's longest token that its text starts with (teacher ``=-`` onto student ``=``,
    ``ĠCONFIG`` onto ``ĠCON``): when the teacher writes that token, the student's next token
    is (most likely) that one, so its probability belongs there rather than to an unmapped
    bucket. The student's tokenization in context may cut differently; this is the static guess.
    """
    index = _student_index(student_tok)
    specials = _special_pairs(teacher_tok, student_tok)
    t_special = _special_ids(teacher_tok)
    n_tokens = min(len(teacher_tok), teacher_vocab_size)
    t2s = torch.full((teacher_vocab_size,), -1, dtype=torch.long)
    by_prefix = torch.zeros(teacher_vocab_size, dtype=torch.bool)
    for t_id, text in enumerate(token_strings(teacher_tok)[:n_tokens]):
        if t_id in specials:
            t2s[t_id] = specials[t_id]
        elif t_id not in t_special and text is not None:
            t2s[t_id] = index.get(text, -1)
            if prefix and t2s[t_id] < 0:
                # the longest proper prefix the student has as one token (none for one character)
                head = next((text[:n] for n in range(len(text) - 1, 0, -1) if text[:n] in index), None)
                if head is not None:
                    t2s[t_id], by_prefix[t_id] = index[head], True
    t2s[t2s >= min(len(student_tok), student_vocab_size)] = -1
    mapped = torch.zeros(student_vocab_size, dtype=torch.bool)
    mapped[t2s[t2s >= 0]] = True
    return VocabMapping(t2s, mapped, int((t2s >= 0).sum()), n_tokens, int((by_prefix & (t2s >= 0)).sum()))
