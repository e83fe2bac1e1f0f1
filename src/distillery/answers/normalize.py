"""Normalize answers into comparable forms: light LaTeX clean-up, exact numbers, SQuAD text.

Pure functions of strings, shared by the extractor and every grader:

* :func:`light_normalize` strips ``$``/``\\boxed{}``, a leading ``x =``, and turns LaTeX
  fractions/roots into plain math (``\\frac{3}{4}`` → ``(3)/(4)``);
* :func:`as_number` is the exact value (a :class:`~fractions.Fraction`) of a plain number
  (``3``, ``-0.5``, ``1e3``, ``1,000``, ``3/4``), or None; :func:`number_values` adds the
  percentage reading (``50%`` is 50 or 1/2);
* :func:`normalize_text` is SQuAD's normalization (lowercase, no punctuation or articles), except
  that a minus sign before a digit and a decimal point between digits are kept (``-5`` ≠ ``5``);
  :func:`fold_text` only casefolds and collapses whitespace.
"""

from __future__ import annotations

import re
import string
import unicodedata
from fractions import Fraction

__all__ = [
    "BOXED", "as_number", "braced", "fold_text", "light_normalize", "normalize_text",
    "number_values",
]

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")

_LATEX_SUBS = [
    (re.compile(r"\\[,;:! ]|\\q?quad"), " "),
    (re.compile(r"\\left|\\right"), ""),
    (re.compile(r"\\(?:cdot|times)"), "*"),
    (re.compile(r"\\div"), "/"),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\pi\b"), "pi"),
    (re.compile(r"\\(?:text|mathrm|mathbf)\s*\{([^{}]*)\}"), r"\1"),
]
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,3}\s*=(?!=)\s*(?=\S)")
# the exponent is bounded (3 digits) so that "1e999999999" is not a number: a Fraction of it
# would be a billion-digit integer
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_RATIO = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_PAREN_NUMBER = re.compile(r"\(\s*([+-]?[\d.]+)\s*\)")
_MAX_DIGITS = 1000  # longer digit strings are not read as numbers (int() refuses > 4300)


def braced(text: str, start: int) -> str | None:
    """The text inside the braces that open at ``start - 1`` (braces balanced), or None."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def light_normalize(text: str) -> str:
    """Strip ``$``, ``\\boxed{}``, a leading ``x =``; turn LaTeX fractions/roots into plain math."""
    s = text.strip()
    for _ in range(3):  # unwrap nested \boxed{\boxed{..}} and $..$
        s = s.strip().strip("$").strip()
        m = BOXED.match(s)
        inner = braced(s, m.end()) if m else None
        if inner is None or m is None or m.end() + len(inner) + 1 != len(s):
            break
        s = inner
    for regex, repl in _LATEX_SUBS:
        s = regex.sub(repl, s)
    for _ in range(5):  # innermost first: \frac{\frac{1}{2}}{3}
        s, n_frac = _LATEX_FRAC.subn(r"(\1)/(\2)", s)
        s, n_sqrt = _LATEX_SQRT.subn(r"sqrt(\1)", s)
        if not (n_frac or n_sqrt):
            break
    s = s.replace("{", "(").replace("}", ")").strip()
    if s.count("=") == 1:
        s = _ASSIGNMENT.sub("", s)
    return s.rstrip(".").strip()


def as_number(text: str) -> Fraction | None:
    """The exact value of a plain number: int, decimal, 1e3, 1,000, 3/4, (3)/(4); else None."""
    s = _PAREN_NUMBER.sub(r"\1", text.replace(" ", ""))
    if len(s) > _MAX_DIGITS:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s)
        m = _RATIO.fullmatch(s)
        if m and int(m.group(2)) != 0:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except (ValueError, ZeroDivisionError, OverflowError):
        pass
    return None


def number_values(text: str, allow_percent: bool = True) -> set[Fraction]:
    """The values a (light-normalized) answer may stand for: "50%" is 50 or 1/2 with percentages
    allowed; empty when the text is not a plain number."""
    if allow_percent and text.endswith("%"):
        value = as_number(text[:-1].strip())
        return set() if value is None else {value, value / 100}
    value = as_number(text)
    return set() if value is None else {value}


def fold_text(text: str) -> str:
    """Casefolded, whitespace collapsed: the loosest text comparison that keeps every character."""
    return " ".join(text.casefold().split())


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# punctuation that belongs to a number stays: "-5" is not "5", "5.5" is not "55"
_NUMBER_PUNCT = re.compile(r"(?<!\w)-(?=\d)|(?<=\d)[.,](?=\d)")


def normalize_text(text: str | None) -> str:
    """SQuAD normalization: lowercase, punctuation and articles (a/an/the) removed, whitespace
    collapsed. Unlike SQuAD, a minus sign before a digit and a decimal point or comma between
    digits are kept, so ``-5`` ≠ ``5`` and ``5.5`` ≠ ``55``.
    """
    if text is None:
        return ""
    s = unicodedata.normalize("NFKC", text).lower().replace("\u2212", "-")
    keep = {m.start() for m in _NUMBER_PUNCT.finditer(s)}
    s = "".join(
        " " if i not in keep and (ch in string.punctuation or unicodedata.category(ch).startswith("P"))
        else ch
        for i, ch in enumerate(s)
    )
    return " ".join(_ARTICLES.sub(" ", s).split())
