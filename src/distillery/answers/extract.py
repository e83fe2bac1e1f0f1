"""Final-answer extraction: what a model's output says its answer is.

:func:`extract_final_answer` looks for explicit markers first, so the reasoning chain before an
answer (full of intermediate numbers) never decides it:

1. the last ``\\boxed{...}`` (nested braces kept whole) — the strongest marker, as in
   open-r1 / math-verify;
2. otherwise the **last** of: "the answer is X", "The answer: X", "Answer: X", "Final answer: X",
   a clause "answer X" that starts a line or follows ``;``/``,``/``.`` (a chain ending
   ``...; answer 45``), "#### X" (GSM8K) and ``#X`` (the arithmetic task's chains end
   ``...;#132``; GSM8K's ``#### 72`` is the same marker);
3. otherwise the final non-empty line, only when it is a bare number (units allowed), a
   fraction, or a whole-line LaTeX formula. A chain cut off mid-way is *no answer*, not the
   last number it happened to reach: format failures stay separate from wrong answers.

After "answer is" the whole answer is read, up to the end of its clause: ``The answer is 78-73``
gives ``78-73``, never ``78``. Whether that expression counts is the grader's business: ``numeric``
scores it wrong (it is not a number), ``symbolic`` evaluates it. After ``#`` only the number is read
(``#7<|end|>``, ``#132;...``), exactly as the demo task has always read its chains.

The answer found is cleaned into comparable text: unicode minus (``−5``) and thousands
separators (``1,234``) fixed, ``$``/``\\(``/``\\[`` delimiters, ``\\text{}``, ``\\left``/``\\right``
dropped, ``\\frac{3}{4}``/``\\dfrac`` turned into ``3/4``, a leading ``x =`` removed, currency
signs and trailing units or words dropped after a number (``42 apples.`` → ``42``, ``$5.00`` →
``5.00``, ``3 cm^2`` → ``3``), percentages kept as such (``75 percent`` → ``75%``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from distillery.answers.normalize import BOXED, braced, light_normalize

__all__ = ["ExtractedAnswer", "clean_answer", "extract_final_answer", "extract_with_pattern"]


@dataclass(frozen=True)
class ExtractedAnswer:
    """An output's final answer (None: the output states none) and how it was found.

    ``how`` is one of "boxed", "answer_is", "hash", "final_line", "pattern", "none"; ``raw`` is
    the text the answer was read from, before cleaning; ``start`` is where the marker begins in
    the output (the reasoning before it is ``output[:start]``).
    """

    answer: str | None
    how: str
    raw: str | None = None
    start: int | None = None


# one character for one character, so positions found in the translated text hold in the output
_UNICODE = str.maketrans({
    "\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-",  # minus signs
    "\u00d7": "*", "\u22c5": "*", "\u00b7": "*", "\u00f7": "/",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2007": " ",
})
_UNICODE_WIDE = str.maketrans({"\u00b2": "^2", "\u00b3": "^3", "\u00b0": " degrees"})
# "Answer:", "The answer is", "final answer =", markdown bold around the words allowed; the
# match starts at "the"/"final" so that what comes before it is the reasoning
_ANSWER_IS = re.compile(
    r"(?:[*_]*\b(?:the|my)\s+)?(?:[*_]*\bfinal\s+)?[*_]*\banswer\b[*_]*\s*(?:is\b\s*:?|[:=])[*_\s]*",
    re.IGNORECASE,
)
# "...; answer 45", "answer -3" on its own line: the word alone marks a clause that starts there
_ANSWER_CLAUSE = re.compile(
    r"(?:^|(?<=[;,.]))[ \t*_]*(?:(?:the|final)\s+)*answer[ \t]+(?=[-+$\\\d])", re.IGNORECASE | re.MULTILINE
)
# "#### 72" (GSM8K) and "...;#132" (ours): the number alone, commas as thousands separators
_HASH = re.compile(r"#\s*(-?\d[\d,]*(?:\.\d+)?)")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_CURRENCY = re.compile(r"^([-+]?)\s*(?:\\\$|\$|€|£|¥|USD\s*|EUR\s*)\s*(?=[\d.])")
_PERCENT = re.compile(r"^\s*(?:%|percent\b|per cent\b)", re.IGNORECASE)
_WORD = re.compile(r"^\s*([A-Za-z]+)")
# names that make "2 sqrt(3)" or "3pi" an expression, not a number followed by a unit
_MATH_NAMES = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "e", "i"}
_FRACTION = re.compile(r"[-+]?\d+\s*/\s*\d+")
_MATH_LINE = re.compile(r"^(?:\$\$?([^$]+)\$\$?|\\\[(.+?)\\\]|\\\((.+?)\\\))$", re.DOTALL)
# "(3)/(4)" from \frac{3}{4} → "3/4"; not "sqrt(3)", whose parentheses are a call
_PAREN_NUMBER = re.compile(r"(?<![A-Za-z])\(\s*([+-]?[\d.]+)\s*\)")
# x^{2} → x^(2) first, so \frac{1}{x^{2}} has no nested braces left for the \frac rule
_BRACED_EXPONENT = re.compile(r"([\^_])\{([^{}]*)\}")
_LATEX_NOISE = re.compile(r"\\displaystyle|\\!|\\,(?=\d{3})")


def extract_final_answer(text: str | None) -> ExtractedAnswer:
    """The final answer of ``text`` (see the module docstring for the order of markers)."""
    if not isinstance(text, str) or not text.strip():
        return ExtractedAnswer(None, "none")
    text = text.translate(_UNICODE)
    boxes = [(m.start(), braced(text, m.end())) for m in BOXED.finditer(text)]
    for start, raw in reversed([(s, b) for s, b in boxes if b is not None and b.strip()]):
        if (answer := clean_answer(raw)) is not None:
            return ExtractedAnswer(answer, "boxed", raw, start)
    for how, raw, start in _markers_last_first(text):
        if (answer := clean_answer(raw)) is not None:
            return ExtractedAnswer(answer, how, raw, start)
    return _final_line(text)


def extract_with_pattern(text: str | None, pattern: str | re.Pattern[str]) -> ExtractedAnswer:
    """The last match of a user's regular expression: its group "answer", else its first group
    (else the whole match), stripped; "none" when it does not match or the group is empty."""
    regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
    if not isinstance(text, str):
        return ExtractedAnswer(None, "none")
    matches = list(regex.finditer(text))
    if not matches:
        return ExtractedAnswer(None, "none")
    m = matches[-1]
    group: int | str = "answer" if "answer" in regex.groupindex else (1 if regex.groups else 0)
    raw = m.group(group)
    if raw is None or not raw.strip():
        return ExtractedAnswer(None, "none")
    return ExtractedAnswer(raw.strip(), "pattern", raw, m.start())


def _markers_last_first(text: str) -> list[tuple[str, str, int]]:
    """(how, answer span, marker start) of every marker, the last one in the text first."""
    found = [(m.end(), m.start(), "answer_is") for m in _ANSWER_IS.finditer(text)]
    found += [(m.end(), m.start(), "answer_is") for m in _ANSWER_CLAUSE.finditer(text)]
    hashes = {m.start(1): m for m in _HASH.finditer(text)}
    found += [(end, len(text[: m.start()].rstrip("#")), "hash") for end, m in hashes.items()]
    spans = []
    for end, start, how in sorted(found, reverse=True):
        if how == "hash":  # "#7<|end|>", "#132;...": the number alone is the answer
            spans.append((how, hashes[end].group(1).replace(",", ""), start))
        else:
            spans.append((how, _answer_span(text[end:]), start))
    return spans


def _answer_span(rest: str) -> str:
    """The answer that starts ``rest``: up to the end of its line, sentence or clause.

    Brackets and ``$..$`` math are kept whole (``(1, 2)``, ``$3.5$``); outside them a
    newline, ``;``, a sentence end (``.!?`` then a space) ends the answer, and so does
    ``, `` after a number ("12, since 3*4 = 12").
    """
    depth, in_math = 0, False
    for i, ch in enumerate(rest):
        if ch == "$" and (in_math or "$" in rest[i + 1 :]):
            in_math = not in_math
        elif in_math:
            continue
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and (ch in "\n;" or _sentence_end(rest, i)):
            return rest[:i]
        elif depth == 0 and ch == "," and rest[i + 1 : i + 2] == " " and _is_number(rest[:i]):
            return rest[:i]
    return rest


def _sentence_end(text: str, i: int) -> bool:
    return text[i] in ".!?" and (i + 1 == len(text) or text[i + 1].isspace())


def _is_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text.strip().lstrip("$").strip()))


def clean_answer(raw: str) -> str | None:
    """Comparable text of an answer span (see the module docstring); None when empty."""
    s = _LATEX_NOISE.sub("", raw.translate(_UNICODE).translate(_UNICODE_WIDE)).replace("{,}", ",")
    s = s.strip().strip("*_").strip().strip("*_")
    for _ in range(2):  # "\( x = 5 \)", "$$\frac{1}{2}$$"
        m = _MATH_LINE.match(s)
        if m:
            s = next(g for g in m.groups() if g is not None).strip()
    s = light_normalize(_BRACED_EXPONENT.sub(r"\1(\2)", s))
    s = _PAREN_NUMBER.sub(r"\1", s)
    s = re.sub(r"\^\s*\(?\\?circ\)?", " degrees", s)
    s = _strip_units(s).strip().rstrip(".,;:!?").strip().strip("*_$").strip()
    s = " ".join(s.split())
    return s or None


def _strip_units(s: str) -> str:
    """``$5.00`` → ``5.00``, ``75 percent`` → ``75%``, ``42 apples`` → ``42``; else ``s``."""
    s = _CURRENCY.sub(r"\1", s.strip())
    m = _NUMBER.match(s)
    if not m:
        return s
    number, rest = m.group(0).replace(",", ""), s[m.end() :].lstrip("$")  # "$3$ and $4$"
    if not rest.strip(" .,;:!?"):
        return number
    if p := _PERCENT.match(rest):
        tail = rest[p.end() :]
        return number + "%" if not tail.strip(" .,;:!?") or _WORD.match(tail) else s
    word = _WORD.match(rest)
    if word is None or word.group(1).lower() in _MATH_NAMES:
        return s  # "3/4", "10^5", "78-73", "2 sqrt(3)": an expression
    if len(word.group(1)) == 1 and not rest[0].isspace():
        return s  # "5x": a variable, glued to its coefficient
    return number  # a unit or a word follows the number


def _final_line(text: str) -> ExtractedAnswer:
    """The last non-empty line, when it is a bare number, fraction or whole-line formula."""
    stripped = text.rstrip()
    start = stripped.rfind("\n") + 1
    line = stripped[start:].translate(_UNICODE_WIDE).strip().strip("*_").strip()
    core = line.rstrip(".!").strip()
    if _MATH_LINE.match(core) or _FRACTION.fullmatch(core):
        answer = clean_answer(core)
    else:
        plain = _CURRENCY.sub(r"\1", core)
        m = _NUMBER.match(plain)
        words = plain[m.end() :].split() if m else []
        # "42", "42 apples", "3 square meters", "75%": a number and at most two unit words
        bare = m is not None and len(words) <= 2 and all(
            w.replace("^", "").isalnum() or w == "%" for w in words)
        answer = clean_answer(core) if bare else None
    if answer is None:
        return ExtractedAnswer(None, "none")
    return ExtractedAnswer(answer, "final_line", line, start)
