"""Char-offset alignment between two tokenizations of the same text, and of a chat example.

Checked against the bytes each token stands for (models.vocab.token_bytes), not against the
offsets the alignment itself uses: every group's student bytes equal its teacher bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors
from transformers import AutoTokenizer

from distillery.chat import IGNORE, NO_SPAN, tokenize_messages
from distillery.models.vocab import token_bytes
from distillery.train.alignment import align_messages, align_offsets, group_starts
from test_vocab import PIECES, saved_tokenizer

CRAFTED = [
    "1234+5678=6912;#6912",
    "naïve café 東京 😀🎉 e\u0301\u0301 Ω",
    "a  b   c\t\t d\n\n\ne",
    "   leading and trailing   ",
    "−12 − 3 = −15",
    "x",
]
PAIRS = [("bpe", "uni"), ("uni", "bpe_merged"), ("bpe_merged", "bpe"), ("uni_split", "uni")]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toks"))
    out = {
        "bpe": saved_tokenizer(root, "bpe", 320, True),
        "bpe_merged": saved_tokenizer(root, "bpe", 420, False),
        "uni": saved_tokenizer(root, "unigram", 400, False),
        "uni_split": saved_tokenizer(root, "unigram", 300, True),
    }
    # GPT-2 style offsets that leave a token's leading space out of its span
    out["bpe_trim"] = AutoTokenizer.from_pretrained(f"{root}/bpe_420_False")  # a copy to change
    out["bpe_trim"].backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return out


def encode(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def check_groups(groups, s_ids, t_ids, s_tok, t_tok, text):
    """Groups cover both sequences in order exactly once, and each spells the same bytes."""
    assert [k for g, _ in groups for k in g] == list(range(len(s_ids)))
    assert [k for _, g in groups for k in g] == list(range(len(t_ids)))
    s_bytes, t_bytes = token_bytes(s_tok), token_bytes(t_tok)
    spelled = b""
    for g_s, g_t in groups:
        piece = b"".join(s_bytes[s_ids[k]] for k in g_s)
        assert piece == b"".join(t_bytes[t_ids[k]] for k in g_t) and piece
        spelled += piece
    assert spelled == text.encode()


def test_hand_made_offsets():
    assert align_offsets([(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 2), (2, 4)]) == [([0, 1], [0]), ([2, 3], [1])]
    # byte pieces of one character share its span: they stay together
    assert align_offsets([(0, 1), (0, 1), (1, 2)], [(0, 2)]) == [([0, 1, 2], [0])]
    # a piece spanning the end of one character and the start of the next
    assert align_offsets([(0, 1), (0, 2), (1, 2)], [(0, 1), (1, 2)]) == [([0, 1, 2], [0, 1])]
    # a trailing special token at (0, 0) and a zero-width token join their neighbours
    assert align_offsets([(0, 2), (2, 2), (2, 3)], [(0, 1), (1, 3), (0, 0)]) == [([0, 1, 2], [0, 1, 2])]
    # " ab" with and without its space in the span: ends agree, so do the groups
    assert align_offsets([(0, 2), (2, 5)], [(0, 2), (3, 5)]) == [([0], [0]), ([1], [1])]
    assert align_offsets([], [(0, 1)]) == []


@pytest.mark.parametrize("text", CRAFTED)
def test_crafted_texts(toks, text):
    for s_name, t_name in PAIRS + [("bpe_trim", "uni"), ("uni_split", "bpe_trim")]:
        s_ids, s_off = encode(toks[s_name], text)
        t_ids, t_off = encode(toks[t_name], text)
        check_groups(align_offsets(s_off, t_off), s_ids, t_ids, toks[s_name], toks[t_name], text)


def test_digits_split_differently_align_as_one_group(toks):
    s_ids, s_off = encode(toks["bpe"], "1234")
    t_ids, t_off = encode(toks["bpe_merged"], "1234")
    assert len(s_ids) == 4 and len(t_ids) < 4
    assert align_offsets(s_off, t_off)[-1][0][-1] == 3


def test_trimmed_offsets_really_leave_the_space_out(toks):
    _, off = encode(toks["bpe_trim"], "is total")
    _, untrimmed = encode(toks["bpe_merged"], "is total")
    assert (off[-1], untrimmed[-1]) == ((3, 8), (2, 8))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14), st.sampled_from(PAIRS + [("bpe_trim", "uni")]))
def test_groups_spell_the_same_text(toks, pieces, pair):
    text = "".join(pieces)
    s_ids, s_off = encode(toks[pair[0]], text)
    t_ids, t_off = encode(toks[pair[1]], text)
    groups = align_offsets(s_off, t_off)
    if text:
        check_groups(groups, s_ids, t_ids, toks[pair[0]], toks[pair[1]], text)
    else:
        assert groups == []


def conversation(answer: str, second: str = "") -> list[dict]:
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "22+55?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "and −3?"},
        {"role": "assistant", "content": second},
    ]


@pytest.mark.parametrize("answer", CRAFTED[:3])
def test_align_messages_matches_tokenize_messages(toks, answer):
    messages = conversation(answer, "52 naïve 😀")
    for s_name, t_name in PAIRS:
        s_tok, t_tok = toks[s_name], toks[t_name]
        ex = align_messages(messages, s_tok, t_tok, max_len=512)
        s_ref, t_ref = tokenize_messages(messages, s_tok, 512), tokenize_messages(messages, t_tok, 512)
        assert (ex.student_input_ids, ex.student_labels) == (s_ref["input_ids"], s_ref["labels"])
        assert (ex.teacher_input_ids, ex.teacher_labels) == (t_ref["input_ids"], t_ref["labels"])
        # groups: assistant tokens only, each side's labeled tokens exactly once, in order
        assert [k for g, _ in ex.groups for k in g] == [k for k, lab in enumerate(ex.student_labels) if lab != IGNORE]
        assert [k for _, g in ex.groups for k in g] == [k for k, lab in enumerate(ex.teacher_labels) if lab != IGNORE]
        s_bytes, t_bytes = token_bytes(s_tok), token_bytes(t_tok)
        for g_s, g_t in ex.groups:
            assert b"".join(s_bytes[ex.student_input_ids[k]] for k in g_s) == b"".join(
                t_bytes[ex.teacher_input_ids[k]] for k in g_t
            )
        # one end-of-turn group per turn: the eos on both sides, offsets (-1, -1) there only
        ends = [g for g in ex.groups if ex.student_offsets[g[0][0]] == NO_SPAN]
        assert [(len(g_s), len(g_t)) for g_s, g_t in ends] == [(1, 1), (1, 1)]
        assert all(ex.teacher_input_ids[g_t[0]] == t_tok.eos_token_id for _, g_t in ends)
        content = [k for k, off in enumerate(ex.teacher_offsets) if off != NO_SPAN]
        assert content == [k for g in ex.groups if g not in ends for k in g[1]]


def test_teacher_offsets_index_the_turns_content(toks):
    turns = ["12+3=15 東京", "ok 😀"]
    ex = align_messages(conversation(*turns), toks["bpe"], toks["uni"], max_len=512)
    t_bytes = token_bytes(toks["uni"])
    runs: list[list[int]] = [[]]  # content tokens of one turn are contiguous, template tokens between
    for k, off in enumerate(ex.teacher_offsets):
        if off != NO_SPAN:
            runs[-1].append(k)
        elif runs[-1]:
            runs.append([])
    assert len(runs) == len(turns) + 1 and runs[-1] == []
    for text, ks in zip(turns, runs, strict=False):
        assert b"".join(t_bytes[ex.teacher_input_ids[k]] for k in ks) == text.encode()
        # each token's span, cut from the content, is its own text (whole characters here)
        spans = [ex.teacher_offsets[k] for k in ks]
        assert "".join(text[a:b] for a, b in spans) == text


def test_empty_content_and_truncation(toks):
    ex = align_messages(conversation("", "9"), toks["bpe"], toks["uni"], max_len=512)
    eos = toks["bpe"].eos_token_id
    first_end = ex.student_input_ids.index(eos)
    assert ex.groups[0][0] == [first_end]  # the empty turn has only its end-of-turn group
    full = align_messages(conversation("1234 naïve", "9"), toks["bpe"], toks["uni"], max_len=512)
    cut = len(full.student_input_ids) - 4
    short = align_messages(conversation("1234 naïve", "9"), toks["bpe"], toks["uni"], max_len=cut)
    assert len(short.student_input_ids) == cut and len(short.teacher_offsets) == min(cut, len(full.teacher_input_ids))
    assert short.groups == [g for g in full.groups if max(g[0]) < cut and max(g[1]) < cut]
    assert len(short.groups) < len(full.groups)


@pytest.mark.parametrize("pair", PAIRS)
def test_group_starts_chain_ends(toks, pair):
    """teacher_chain_end is where the teacher tokens from the group's first spell the student's
    first token (exact) or first reach past it (not exact), checked on the bytes."""
    s_tok, t_tok = toks[pair[0]], toks[pair[1]]
    ex = align_messages(conversation(CRAFTED[0] + " " + CRAFTED[1], CRAFTED[2]), s_tok, t_tok, max_len=512)
    starts = group_starts(ex)
    assert {len(v) for v in starts.values()} == {len(ex.groups)}
    s_bytes, t_bytes = token_bytes(s_tok), token_bytes(t_tok)
    for n, (g_s, g_t) in enumerate(ex.groups):
        assert (starts["student_pos"][n], starts["teacher_pos"][n]) == (g_s[0], g_t[0])
        assert starts["student_token"][n] == ex.student_input_ids[g_s[0]]
        end, exact = starts["teacher_chain_end"][n], starts["teacher_chain_exact"][n]
        if ex.student_offsets[g_s[0]] == NO_SPAN:
            assert (end, exact) == (g_t[0], True)
            continue
        target = s_bytes[ex.student_input_ids[g_s[0]]]
        spelled = [b"".join(t_bytes[ex.teacher_input_ids[k]] for k in g_t[: i + 1]) for i in range(len(g_t))]
        at = g_t.index(end)
        if exact:
            assert spelled[at] == target
        elif _utf8(target):  # reaches past: the shorter prefixes stay inside the student's token
            assert target not in spelled
            assert spelled[at].startswith(target) and len(spelled[at]) > len(target)
            assert all(len(x) < len(target) for x in spelled[:at])
        else:  # a byte piece of a character: the teacher's first token covers the character
            assert at == 0


def test_chain_when_the_teacher_splits_digits_finer(toks):
    ex = align_messages(conversation("1234"), toks["bpe_merged"], toks["bpe"], max_len=512)
    starts = group_starts(ex)
    first_len = len(token_bytes(toks["bpe_merged"])[starts["student_token"][0]])
    assert first_len > 1
    assert starts["teacher_chain_end"][0] == starts["teacher_pos"][0] + first_len - 1
    assert starts["teacher_chain_exact"][0]


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
