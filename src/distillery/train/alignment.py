"""Align a student's and a teacher's tokens of the same text by character offsets.

Two tokenizers cut one text differently ("1234" as 1|2|3|4 or 12|34, " ab" as "Ġab" or
"▁ab"). A *group* is the shortest run of consecutive student tokens and consecutive teacher
tokens that cover the same characters: cross-tokenizer losses compare the two sides group by
group.

Offset convention. Hugging Face offsets ``(start, end)`` are character positions in the text,
but tokenizers disagree at the edges: byte-level pieces of one multi-byte character all get
that character's span, some tokenizers leave a token's leading space out of its span, special
tokens appended by a post-processor get ``(0, 0)``. So only *ends* count: a token ends on a
character boundary at ``end`` when no later token starts before ``end``; the characters between
the previous boundary and that end belong to it (a trimmed leading space goes to the token after
it). Tokens that cover no character (``start >= end``) join the unit that follows them, or the
last one at the end of the text. A group closes where both sides end on the same boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from distillery.chat import NO_SPAN, Span, tokenize_with_offsets

Group = tuple[list[int], list[int]]  # (student token indices, teacher token indices)


def _units(offsets: list[Span]) -> list[tuple[list[int], int]]:
    """Consecutive tokens gathered into units that end on a character boundary.

    Returns ``(token indices, boundary)`` per unit, in order; every token is in exactly one.
    """
    later_start = [float("inf")] * (len(offsets) + 1)  # smallest start of a covering token after i
    for i in range(len(offsets) - 1, -1, -1):
        s, e = offsets[i]
        later_start[i] = min(later_start[i + 1], s) if e > s else later_start[i + 1]
    units: list[tuple[list[int], int]] = []
    current: list[int] = []
    end = 0
    for i, (s, e) in enumerate(offsets):
        current.append(i)
        if e <= s:
            continue  # covers nothing: rides with the next unit
        end = max(end, e)
        if later_start[i + 1] >= end:
            units.append((current, end))
            current = []
    if current and units:
        units[-1][0].extend(current)
    elif current:
        units.append((current, end))
    return units


def align_offsets(student_offsets: list[Span], teacher_offsets: list[Span]) -> list[Group]:
    """Groups of student and teacher token indices that cover the same characters of one text.

    Both offset lists refer to the same text (see the module's convention). Every token is in
    exactly one group, groups are in order and each has tokens on both sides; if one side has
    no token at all there is nothing to align and the result is empty. Should the two sides not
    end on a common boundary (texts that differ), the leftover tokens join the last group.
    """
    su, tu = _units(student_offsets), _units(teacher_offsets)
    if not su or not tu:
        return []
    groups: list[Group] = []
    s_ids: list[int] = []
    t_ids: list[int] = []
    s_end = t_end = i = j = 0
    while True:
        if s_ids and t_ids and s_end == t_end:
            groups.append((s_ids, t_ids))
            s_ids, t_ids = [], []
        elif (not s_ids or s_end < t_end) and i < len(su):
            s_ids, s_end, i = s_ids + su[i][0], su[i][1], i + 1
            continue
        elif (not t_ids or t_end < s_end) and j < len(tu):
            t_ids, t_end, j = t_ids + tu[j][0], tu[j][1], j + 1
            continue
        if i == len(su) or j == len(tu):
            break
    # tokens past the last common boundary (only when the two texts differ)
    s_left = s_ids + [k for unit, _ in su[i:] for k in unit]
    t_left = t_ids + [k for unit, _ in tu[j:] for k in unit]
    if s_left and t_left:
        groups.append((s_left, t_left))
    elif groups:
        groups[-1][0].extend(s_left)
        groups[-1][1].extend(t_left)
    return groups


@dataclass
class AlignedExample:
    """One conversation tokenized by the student and by the teacher, each with its own chat
    template, and the groups that align their assistant tokens.

    ``*_input_ids`` / ``*_labels``: ``[seq]`` each, exactly what
    :func:`~distillery.chat.tokenize_messages` gives that side. ``groups``: absolute token indices into each sequence, in order; per assistant
    turn the groups of its content, then one group of the tokens that close the turn.
    ``*_offsets``: ``[seq]`` each, the token's ``(start, end)`` relative to its turn's content,
    ``(-1, -1)`` for template and special tokens (what a logit cache stores for the teacher).
    """

    student_input_ids: list[int]
    student_labels: list[int]
    teacher_input_ids: list[int]
    teacher_labels: list[int]
    groups: list[Group]
    student_offsets: list[Span]
    teacher_offsets: list[Span]


def align_messages(
    messages: list[dict], student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, max_len: int
) -> AlignedExample:
    """Tokenize a conversation for both sides and align their assistant tokens.

    Inside each assistant turn the content's tokens are aligned by character offsets
    (:func:`align_offsets`); the tokens before the content (if a template puts any in the
    assistant piece) and after it (the end of turn) form one group each when both sides have
    some, else they stay out of the groups (they are still labeled). Sequences are cut to
    ``max_len`` from the right and groups reaching past the cut are dropped.
    """
    student = tokenize_with_offsets(messages, student_tok)
    teacher = tokenize_with_offsets(messages, teacher_tok)
    groups: list[Group] = []
    for index, (s_pre, s_body, s_post) in student.turns.items():
        t_pre, t_body, t_post = teacher.turns[index]
        if s_pre and t_pre:
            groups.append((s_pre, t_pre))
        rel = align_offsets([student.offsets[k] for k in s_body], [teacher.offsets[k] for k in t_body])
        groups += [([s_body[a] for a in g_s], [t_body[b] for b in g_t]) for g_s, g_t in rel]
        if s_post and t_post:
            groups.append((s_post, t_post))
    groups = [(g_s, g_t) for g_s, g_t in groups if g_s[-1] < max_len and g_t[-1] < max_len]
    return AlignedExample(
        student.ids[:max_len],
        student.labels[:max_len],
        teacher.ids[:max_len],
        teacher.labels[:max_len],
        groups,
        student.offsets[:max_len],
        teacher.offsets[:max_len],
    )


def _chain_end(example: AlignedExample, g_s: list[int], g_t: list[int]) -> tuple[int, bool]:
    """The teacher tokens that cover the student's first token, from the group's first:
    ``(last index, exact)``. Exact: they spell it exactly. Not exact: the last one reaches past
    its end (a teacher token that is coarser there), or the student's first token is a byte
    piece of a character (then the teacher's first token, which covers the whole character)."""
    if example.student_offsets[g_s[0]] == NO_SPAN:
        return g_t[0], True  # end of turn: the first closing tokens stand for each other
    s_units = _units([example.student_offsets[k] for k in g_s])
    if s_units[0][0][-1] != 0:
        return g_t[0], False  # the student's first token is part of a character, or covers none
    end = s_units[0][1]
    for unit, t_end in _units([example.teacher_offsets[k] for k in g_t]):
        if t_end >= end:
            return g_t[unit[-1]], t_end == end
    return g_t[-1], False  # unreachable: a group's two sides end on one boundary


def group_starts(example: AlignedExample) -> dict[str, list]:
    """Per group, where it starts on each side: lists of length ``[n_groups]``, ready for
    ``torch.tensor``.

    ``student_pos`` / ``teacher_pos``: the group's first token index on each side.
    ``student_token``: the student's first token id. ``teacher_chain_end``: the last teacher
    index ``k`` of the tokens ``teacher_pos..k`` that cover the student's first token, and
    ``teacher_chain_exact``: whether they spell exactly it (``k == teacher_pos`` when the
    teacher's first token is the same text; further when the teacher splits it finer) or the
    last of them reaches past it. In an end-of-turn group the two sides' first closing tokens
    correspond: ``teacher_pos``, exact.
    """
    out: dict[str, list] = {k: [] for k in ("student_pos", "teacher_pos", "teacher_chain_end",
                                            "teacher_chain_exact", "student_token")}
    for g_s, g_t in example.groups:
        end, exact = _chain_end(example, g_s, g_t)
        out["student_pos"].append(g_s[0])
        out["teacher_pos"].append(g_t[0])
        out["teacher_chain_end"].append(end)
        out["teacher_chain_exact"].append(exact)
        out["student_token"].append(example.student_input_ids[g_s[0]])
    return out
