"""Trained tokenizers (BPE and unigram), what their ids stand for, and how two vocabularies relate.

The tokenizers are trained here on a mixed corpus (arithmetic chains, words, accents, CJK,
emoji, tabs/newlines/space runs, "−" negatives), saved and loaded back through AutoTokenizer.
"""

from __future__ import annotations

import json
import random
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from distillery.config import TaskConfig
from distillery.models import train_tokenizer
from distillery.models.tokenizer import ASSISTANT, EOS, PAD
from distillery.models.vocab import (
    VocabMismatchError,
    build_vocab_mapping,
    compare_tokenizers,
    require_shared_vocab,
    token_bytes,
    token_strings,
)
from distillery.records import ground_truth_records
from distillery.tasks import load_problems

WORDS = "the answer is total step naïve café 東京 😀 e\u0301 minus plus carry".split()
# what hypothesis draws texts from: pieces the tokenizers were trained on, and some they were not
PIECES = WORDS + ["1234", "77", "0", "+", "=", ";#", "−5", " ", "  ", "\t", "\n", "Ω", "ß", "🎉", "x"]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        chain = f"{a}+{b}={a + b};{a + b}-{b}={a};#{a}"
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        tail = rng.choice(["\t", "\n", "   ", f" −{b}", " 1234"])
        lines.append(f"{chain} {words}{tail}")
    return lines


@cache
def saved_tokenizer(root: str, algorithm: str, vocab_size: int, split_digits: bool):
    """Trained, saved and loaded back the way a user's tokenizer is."""
    path = f"{root}/{algorithm}_{vocab_size}_{split_digits}"
    train_tokenizer(corpus(), vocab_size, algorithm=algorithm, split_digits=split_digits).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toks"))
    return {
        "bpe": saved_tokenizer(root, "bpe", 320, True),
        "bpe_merged": saved_tokenizer(root, "bpe", 420, False),
        "uni": saved_tokenizer(root, "unigram", 400, False),
        "uni_split": saved_tokenizer(root, "unigram", 300, True),
    }


def test_default_bpe_is_the_demo_teachers_tokenizer():
    """The default path stays byte for byte what trained the shipped demo teacher."""
    cfg = json.load(open("assets/demo_teacher/distillery.json"))["config"]
    records = ground_truth_records(load_problems(TaskConfig(**cfg["data"]["task"]), "train", 200, seed=0), "chain")
    tok = train_tokenizer((m["content"] for r in records for m in r["messages"]), cfg["tokenizer"]["vocab_size"])
    assert json.loads(tok.backend_tokenizer.to_str()) == json.load(open("assets/demo_teacher/tokenizer.json"))


def test_reloaded_tokenizers_keep_specials_template_and_offsets(toks):
    text = "12+34=46;#46 naïve 😀\t東京  −7"
    for name, tok in toks.items():
        assert tok.convert_tokens_to_ids([PAD, EOS]) == [0, 1] and tok.eos_token == EOS, name
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert rendered == "<|user|>hi" + ASSISTANT, name
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert len(enc["offset_mapping"]) == len(enc["input_ids"]) and enc["offset_mapping"][-1][1] == len(text)
        assert tok.decode(enc["input_ids"]) == text, name


def test_split_digits(toks):
    digit_tokens = {n: [s for s in token_strings(t) if s and s.strip().isdigit()] for n, t in toks.items()}
    for name in ("bpe", "uni_split"):
        assert all(len(s.strip()) == 1 for s in digit_tokens[name]), name
        assert toks[name].tokenize("1234") == list("1234")
    for name in ("bpe_merged", "uni"):
        assert any(len(s.strip()) > 1 for s in digit_tokens[name]), name


def test_unknown_algorithm_and_too_small_unigram_are_named():
    with pytest.raises(ValueError, match="'bpe' or 'unigram'"):
        train_tokenizer(["a"], algorithm="wordpiece")
    with pytest.raises(ValueError, match="at least 263"):
        train_tokenizer(["a"], vocab_size=262, algorithm="unigram")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12))
def test_token_bytes_and_strings_round_trip(toks, pieces):
    text = "".join(pieces)
    for name, tok in toks.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        table = token_bytes(tok)
        assert b"".join(table[i] for i in ids) == text.encode(), name
        strings = token_strings(tok)
        if all(strings[i] is not None for i in ids):
            assert "".join(strings[i] for i in ids) == text, name


def test_token_string_conventions(toks):
    bpe, uni = toks["bpe"], toks["uni"]
    b_str, u_str = token_strings(bpe), token_strings(uni)
    for i, piece in enumerate(bpe.convert_ids_to_tokens(list(range(len(bpe))))):
        if piece.startswith("Ġ") and b_str[i] is not None:
            assert b_str[i].startswith(" ")
    pieces = uni.convert_ids_to_tokens(list(range(len(uni))))
    assert u_str[pieces.index("<0x41>")] == "A"
    assert u_str[pieces.index("<0xCE>")] is None  # the first byte of a two-byte character
    assert u_str[pieces.index("▁")] == " "
    assert all(u_str[i] == p.replace("▁", " ") for i, p in enumerate(pieces) if "▁" in p)
    assert u_str[uni.eos_token_id] == b_str[bpe.eos_token_id] == EOS


def test_compare_identical_and_padded_rows(toks):
    bpe = toks["bpe"]
    same = compare_tokenizers(bpe, bpe)
    assert (same.kind, same.shared, same.differing) == ("identical", len(bpe), [])
    rows = compare_tokenizers(bpe, bpe, teacher_vocab_size=len(bpe) + 64)
    assert (rows.kind, rows.shared, rows.teacher_size, rows.student_size) == ("padded", len(bpe), len(bpe) + 64, len(bpe))
    assert require_shared_vocab(rows) == len(bpe)


def test_compare_padded_by_an_appended_special_token(toks, tmp_path):
    bpe = toks["bpe"]
    bpe.save_pretrained(tmp_path)
    more = AutoTokenizer.from_pretrained(tmp_path)
    more.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    cmp = compare_tokenizers(bpe, more)
    assert (cmp.kind, cmp.shared) == ("padded", len(bpe))
    assert cmp.differing == [(len(bpe), None, "<|tool|>")]
    assert compare_tokenizers(more, bpe).differing == [(len(bpe), "<|tool|>", None)]


def test_compare_different_names_ids_and_objectives(toks):
    cmp = compare_tokenizers(toks["bpe"], toks["uni"])
    assert cmp.kind == "different" and 0 < len(cmp.differing) <= 10
    first_id, t_piece, s_piece = cmp.differing[0]
    assert toks["bpe"].convert_ids_to_tokens(first_id) == t_piece != s_piece
    with pytest.raises(VocabMismatchError, match="cross_tokenizer") as err:
        require_shared_vocab(cmp)
    assert f"id {first_id}: teacher {t_piece!r} vs student {s_piece!r}" in str(err.value)
    assert "vocab_map|uld|hybrid" in str(err.value) and "sft" in str(err.value)


def test_compare_same_vocab_other_pre_tokenizer_is_different(toks, tmp_path):
    """A lowercasing normalizer on one side only: same pieces, other encodings."""
    from tokenizers import normalizers

    toks["bpe"].save_pretrained(tmp_path)
    other = AutoTokenizer.from_pretrained(tmp_path)
    other.backend_tokenizer.normalizer = normalizers.Lowercase()
    cmp = compare_tokenizers(toks["bpe"], other)
    assert cmp.kind == "different" and cmp.differing == [] and "normalizer" in cmp.reason
    with pytest.raises(VocabMismatchError, match="probe text"):
        require_shared_vocab(cmp)


def test_vocab_mapping_maps_equal_strings_and_roles(toks):
    for t_name, s_name in [("bpe", "uni"), ("uni", "bpe_merged"), ("bpe", "bpe_merged")]:
        teacher, student = toks[t_name], toks[s_name]
        m = build_vocab_mapping(teacher, student, len(teacher) + 8, len(student) + 3)
        t_str, s_str = token_strings(teacher), token_strings(student)
        pairs = [(t, int(s)) for t, s in enumerate(m.teacher_to_student.tolist()) if s >= 0]
        assert all(t_str[t] == s_str[s] for t, s in pairs), (t_name, s_name)
        assert m.teacher_to_student[teacher.eos_token_id] == student.eos_token_id
        assert (m.teacher_to_student[len(teacher) :] == -1).all()  # padded rows
        assert sorted({s for _, s in pairs}) == m.student_mapped.nonzero().flatten().tolist()
        assert m.n_mapped == len(pairs) and 0.3 < m.coverage <= 1.0
        # every teacher token whose text is a whole student token maps
        student_texts = set(s_str) - {None}
        assert all(m.teacher_to_student[t] >= 0 for t, s in enumerate(t_str) if s in student_texts), (t_name, s_name)


def test_prefix_mapping_sends_the_rest_to_the_longest_student_prefix(toks):
    """With prefix=True the exact matches stay; each other teacher token with a text maps to the
    longest student token its text starts with (a plain loop over the student's strings)."""
    for t_name, s_name in [("bpe_merged", "uni"), ("uni", "bpe"), ("bpe_merged", "bpe")]:
        teacher, student = toks[t_name], toks[s_name]
        exact = build_vocab_mapping(teacher, student, len(teacher), len(student))
        m = build_vocab_mapping(teacher, student, len(teacher), len(student), prefix=True)
        t_str, s_str = token_strings(teacher), token_strings(student)
        special = {i for i, t in teacher.added_tokens_decoder.items() if t.special}
        s_index = {text: i for i, text in enumerate(s_str) if text is not None}
        n_prefix = 0
        for t, text in enumerate(t_str):
            if exact.teacher_to_student[t] >= 0:
                assert m.teacher_to_student[t] == exact.teacher_to_student[t]
                continue
            heads = [h for h in s_index if text is not None and t not in special and len(h) < len(text)
                     and text.startswith(h)]
            if not heads:
                assert m.teacher_to_student[t] == -1
                continue
            n_prefix += 1
            got = s_str[int(m.teacher_to_student[t])]
            assert text.startswith(got) and len(got) == max(len(h) for h in heads), (t_name, s_name, text, got)
        assert m.n_prefix == n_prefix > 0 and m.n_mapped == exact.n_mapped + n_prefix
        assert sorted(set(m.teacher_to_student[m.teacher_to_student >= 0].tolist())) == \
            m.student_mapped.nonzero().flatten().tolist()


def test_vocab_mapping_merges_and_prefers_the_students_own_token(toks):
    """Unigram has "e" twice (a piece and its byte piece): teacher side they merge,
    student side the id the student produces for the text wins."""
    bpe, uni = toks["bpe"], toks["uni"]
    u_pieces = uni.convert_ids_to_tokens(list(range(len(uni))))
    byte_x, piece_x = u_pieces.index("<0x65>"), u_pieces.index("e")
    m = build_vocab_mapping(uni, bpe, len(uni), len(bpe))
    assert m.teacher_to_student[byte_x] == m.teacher_to_student[piece_x] == bpe.convert_tokens_to_ids("e")
    back = build_vocab_mapping(bpe, uni, len(bpe), len(uni))
    assert back.teacher_to_student[bpe.convert_tokens_to_ids("e")] == uni("e", add_special_tokens=False)["input_ids"][0] == piece_x


def test_vocab_mapping_pairs_eos_by_role_when_texts_differ(toks, tmp_path):
    toks["bpe"].save_pretrained(tmp_path)
    student = AutoTokenizer.from_pretrained(tmp_path)
    student.add_special_tokens({"eos_token": "<|eot|>"})
    m = build_vocab_mapping(toks["uni"], student, len(toks["uni"]), len(student))
    assert m.teacher_to_student[toks["uni"].eos_token_id] == student.convert_tokens_to_ids("<|eot|>")
    assert m.teacher_to_student[toks["uni"].pad_token_id] == student.pad_token_id
