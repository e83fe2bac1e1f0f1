"""Ground-truth metrics: exact match, numeric and symbolic equivalence, token F1, multiple choice
by log-likelihood, and pass@k over sampled answers.

Per-item scores come out as floats (1.0 / 0.0, or F1 in [0, 1]) so that
:func:`distillery.evaluate.stats.bootstrap_ci` gives every metric its interval.
:func:`score_item` keeps answer-format failures apart from wrong answers: an output whose
answer cannot be found is ``"no_answer"``, not ``"wrong"``.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from distillery.elicit.filters import _as_number, _light_normalize, answers_equivalent
from distillery.evaluate.extract import ExtractedAnswer, extract_final_answer

__all__ = [
    "METRICS", "ItemScore", "MultipleChoice", "exact_match", "multiple_choice_loglik",
    "normalize_text", "numeric_match", "pass_at_1", "pass_at_k", "score_item",
    "symbolic_match", "token_f1",
]

# --------------------------------------------------------------------------- text metrics

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
        " " if i not in keep and (ch in string.punctuation or unicodedata.category(ch).startswith("P")) else ch
        for i, ch in enumerate(s)
    )
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str | None, ref: str) -> bool:
    """Whether ``pred`` and ``ref`` are the same text after :func:`normalize_text`."""
    return pred is not None and normalize_text(pred) == normalize_text(ref)


def token_f1(pred: str | None, ref: str) -> float:
    """SQuAD token F1 between the normalized texts, in [0, 1].

    Precision and recall over the multiset of tokens; two empty texts score 1, one empty 0.
    """
    p, r = normalize_text(pred).split(), normalize_text(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- math metrics


def numeric_match(pred: str | None, ref: str, rel_tol: float = 0.0) -> bool:
    """Both are numbers (``3/4``, ``0.75``, ``\\frac{3}{4}``, ``1,000``, ``50%``) of equal value
    (exactly, or within ``rel_tol``); text that is not a number never matches.
    """
    if pred is None or not (_is_numeric(pred) and _is_numeric(ref)):
        return False
    return answers_equivalent(pred, ref, symbolic=False, rel_tol=rel_tol)


def _is_numeric(text: str) -> bool:
    s = _light_normalize(text)
    return _as_number(s[:-1] if s.endswith("%") else s) is not None


def symbolic_match(pred: str | None, ref: str, rel_tol: float = 0.0) -> bool:
    """Math equivalence: numeric, then sympy (``x*(x+1)`` = ``x^2+x``, with a restricted parser
    and a timeout), then normalized text: :func:`distillery.elicit.filters.answers_equivalent`.
    """
    return answers_equivalent(pred, ref, rel_tol=rel_tol)


# name -> per-item score in [0, 1]; "symbolic" is the default for math tasks
METRICS: dict[str, Callable[[str | None, str], float]] = {
    "exact_match": lambda p, r: float(exact_match(p, r)),
    "numeric": lambda p, r: float(numeric_match(p, r)),
    "symbolic": lambda p, r: float(symbolic_match(p, r)),
    "token_f1": token_f1,
}
_TEXT_METRICS = {"exact_match", "token_f1"}


@dataclass(frozen=True)
class ItemScore:
    """One output scored against its reference.

    ``status`` is "correct" (score 1), "wrong" (an answer was found and scores below 1) or
    "no_answer" (the output states no answer: a format failure, scored 0).
    """

    status: Literal["correct", "wrong", "no_answer"]
    score: float
    answer: str | None
    how: str


def score_item(
    pred_text: str | None,
    reference: str,
    metric: str = "symbolic",
    extract: Callable[[str | None], ExtractedAnswer] = extract_final_answer,
) -> ItemScore:
    """Extract the final answer of ``pred_text`` and score it with ``metric`` (a :data:`METRICS`
    name). For the text metrics (exact_match, token_f1) an output without an answer marker is
    its own answer (short-answer QA: the whole reply is the answer).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {sorted(METRICS)}")
    found = extract(pred_text)
    if found.answer is None and metric in _TEXT_METRICS and isinstance(pred_text, str) and pred_text.strip():
        found = ExtractedAnswer(pred_text.strip(), "whole_text", pred_text)
    if found.answer is None:
        return ItemScore("no_answer", 0.0, None, found.how)
    score = METRICS[metric](found.answer, str(reference))
    return ItemScore("correct" if score >= 1.0 else "wrong", score, found.answer, found.how)


# --------------------------------------------------------------------------- sampled answers


def pass_at_k(samples_correct: Sequence[Sequence[bool]], k: int) -> list[float]:
    """Per item, the unbiased pass@k estimate from its n samples (c of them correct):
    ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021), the chance that k samples drawn without
    replacement from the n include a correct one.
    """
    out = []
    for i, samples in enumerate(samples_correct):
        n, c = len(samples), sum(bool(s) for s in samples)
        if n < k:
            raise ValueError(f"item {i} has {n} samples; pass@{k} needs at least {k}")
        out.append(1.0 - math.comb(n - c, k) / math.comb(n, k))
    return out


def pass_at_1(samples_correct: Sequence[Sequence[bool]]) -> list[float]:
    """Per item, the fraction of its n samples that are correct: open-r1's pass@1 (averaged
    over n samples per problem); the benchmark figure is the mean of these, with
    ``bootstrap_ci`` over items for its interval.
    """
    if any(len(s) == 0 for s in samples_correct):
        i = next(i for i, s in enumerate(samples_correct) if len(s) == 0)
        raise ValueError(f"item {i} has no samples: pass@1 needs at least one per item")
    return pass_at_k(samples_correct, 1)


# --------------------------------------------------------------------------- multiple choice


class MultipleChoice(NamedTuple):
    """The option picked, and each option's log-likelihood: summed over its tokens, and
    divided by the option's length in UTF-8 bytes (lm-evaluation-harness's ``acc_norm``)."""

    best_index: int
    logliks: list[float]
    normalized: list[float]


def multiple_choice_loglik(
    model: Any, tokenizer: Any, prompt: str, options: Sequence[str],
    select: Literal["sum", "normalized"] = "sum",
) -> MultipleChoice:
    """Score each option as a continuation of ``prompt`` under a causal LM; pick the best.

    As lm-evaluation-harness does, ``prompt + option`` is tokenized whole and the option's
    tokens are those past the prompt's own tokens (so merges at the boundary match what the
    model would read). ``select`` picks by summed ("sum", lm-eval ``acc``) or byte-normalized
    ("normalized", ``acc_norm``) log-likelihood; the latter does not favour short options.
    """
    if not options:
        raise ValueError("multiple_choice_loglik needs at least one option")
    if select not in ("sum", "normalized"):
        raise ValueError(f"select must be 'sum' or 'normalized', got {select!r}")
    context = tokenizer(prompt)["input_ids"]
    if not context:
        raise ValueError("the prompt encodes to no tokens and the tokenizer adds no BOS: "
                         "give a non-empty prompt, so the first option token has a context")
    rows, starts = [], []
    for j, option in enumerate(options):
        ids = tokenizer(prompt + option)["input_ids"]
        if len(ids) <= len(context) or not option:
            raise ValueError(f"option {j} ({option!r}) adds no tokens to the prompt")
        rows.append(ids)
        starts.append(len(context))
    logliks = _continuation_logliks(model, rows, starts, tokenizer.pad_token_id or 0)
    normalized = [ll / len(o.encode("utf-8")) for ll, o in zip(logliks, options)]
    scores = logliks if select == "sum" else normalized
    return MultipleChoice(max(range(len(options)), key=scores.__getitem__), logliks, normalized)


@torch.no_grad()
def _continuation_logliks(model: Any, rows: list[list[int]], starts: list[int], pad_id: int) -> list[float]:
    """Sum of log p(token | tokens before it) over ``row[start:]`` for each row (one batch,
    right-padded; logits ``[options, seq, vocab]`` are reduced in float32)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    token_lp = logprobs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
    return [float(token_lp[i, s - 1 : len(r) - 1].sum()) for i, (r, s) in enumerate(zip(rows, starts))]
