"""Pitfall checks: the ways a distillation result misleads, caught and printed in the report.

Four checks, each returning a :class:`Pitfall` (``severity`` "warning" when it fires, "ok"
otherwise, so the report can say what was checked as well as what went wrong):

* :func:`check_contamination`: eval items that share a word n-gram with the training data
  (the synthetic records) — the student may have seen the answer, not learned the skill;
* :func:`check_eval_size`: an observed difference between two models smaller than the one
  ``n`` paired items can resolve at 95% — the ranking may be noise;
* :func:`check_format_failures`: answers the extractor could not find, counted apart from wrong
  answers — a low score may be a formatting problem, not a knowledge problem;
* :func:`check_position_bias`: how often the pairwise judge's verdict follows the position of a
  reply rather than the reply (same position named in both orders) — above ~20% it is
  grading the layout.

:func:`run_pitfall_checks` runs those whose inputs are given; :func:`format_pitfalls` writes
the markdown block for report.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any, Literal

from distillery.evaluate.stats import items_needed, min_detectable_difference
from distillery.records import record_text, word_tokens

Severity = Literal["ok", "warning"]

__all__ = [
    "Pitfall", "check_contamination", "check_eval_size", "check_format_failures",
    "check_position_bias", "format_counts", "format_pitfalls", "ngram_overlap",
    "paired_outcomes", "run_pitfall_checks",
]

@dataclass(frozen=True)
class Pitfall:
    """One check's outcome: ``kind`` (which check), ``severity``, a sentence, and its numbers."""

    kind: str
    severity: Severity
    message: str
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def warning(self) -> bool:
        return self.severity == "warning"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for metrics.json."""
        return asdict(self)


# --------------------------------------------------------------------------- contamination


def _eval_grams(text: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of an eval text, with the decontamination filter's rule for short
    texts: one shorter than ``n`` tokens is a single gram of its own length (so a short
    arithmetic problem counts as contaminated when it appears whole in the training data)."""
    toks = word_tokens(text)
    size = min(n, len(toks))
    return {tuple(toks[i : i + size]) for i in range(len(toks) - size + 1)} if toks else set()


def ngram_overlap(train_texts: Iterable[str], eval_texts: Sequence[str], n: int = 13) -> list[float]:
    """Per eval text, the share of its word ``n``-grams found in any training text.

    Tokens and grams are those of :func:`distillery.elicit.filters.decontaminate` (lowercase
    words and single punctuation/operator signs): an item has overlap > 0 exactly when that
    filter, given the item, rejects a record whose prompt is one of ``train_texts``. (The
    filter looks at prompts only; pass prompt and response here to catch restated problems.)
    Training texts are streamed once; memory is the eval side's grams.
    """
    if n < 1:
        raise ValueError(f"contamination n must be >= 1, got {n}")
    per_item = [_eval_grams(text, n) for text in eval_texts]
    wanted: dict[int, set[tuple[str, ...]]] = {}  # gram length -> the eval grams of that length
    for grams in per_item:
        for gram in grams:
            wanted.setdefault(len(gram), set()).add(gram)
    found: set[tuple[str, ...]] = set()
    for text in train_texts:
        toks = word_tokens(text)
        for size, grams in wanted.items():
            found.update(g for i in range(len(toks) - size + 1) if (g := tuple(toks[i : i + size])) in grams)
    return [len(grams & found) / len(grams) if grams else 0.0 for grams in per_item]


def check_contamination(
    train_texts: Iterable[str],
    eval_items: Sequence[str] | Mapping[str, str],
    n: int = 13,
    threshold: float = 0.0,
) -> Pitfall:
    """Warn when more than ``threshold`` of the eval items share an ``n``-gram with training.

    ``eval_items``: the eval texts (problem statements, not the templated prompts: a shared
    instruction of ``n`` words would flag every item), as a list or as ``{id: text}``.
    ``train_texts``: e.g. ``record_text(r)`` of each synthetic record (prompt and response:
    a teacher that restates an eval problem in its answer contaminates too).
    Figures: ``items``, ``contaminated``, ``share``, ``flagged`` (ids, or list positions) and
    ``overlap`` (per item, the share of its grams seen in training).
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"contamination threshold is a share of eval items in [0, 1), got {threshold}")
    ids = list(eval_items) if isinstance(eval_items, Mapping) else list(range(len(eval_items)))
    texts = [eval_items[i] for i in ids]
    if not texts:
        raise ValueError("check_contamination needs at least one eval item")
    overlap = ngram_overlap(train_texts, texts, n)
    flagged = [i for i, o in zip(ids, overlap) if o > 0]
    share = len(flagged) / len(texts)
    figures = {"n": n, "items": len(texts), "contaminated": len(flagged), "share": share,
               "threshold": threshold, "flagged": flagged, "overlap": overlap}
    if share > threshold:
        shown = ", ".join(map(str, flagged[:5])) + (", ..." if len(flagged) > 5 else "")
        message = (f"{len(flagged)} of {len(texts)} eval items ({share:.1%}) share a {n}-gram (a shorter "
                   f"item: its whole text) with the training data (e.g. {shown}): their scores may "
                   "measure recall, not skill. Decontaminate the training data (generate's "
                   "filters.decontaminate_n) or drop these items.")
        return Pitfall("contamination", "warning", message, figures)
    return Pitfall("contamination", "ok",
                   f"{len(flagged)} of {len(texts)} eval items share a {n}-gram with the training data.",
                   figures)


# --------------------------------------------------------------------------- eval size


def check_eval_size(
    n: int, acc_a: float, acc_b: float, discordance: float | None = None, names: tuple[str, str] = ("a", "b")
) -> Pitfall:
    """Warn when ``|acc_a - acc_b|`` is smaller than what ``n`` paired items resolve at 95%.

    The resolvable difference is ``1.96 * sqrt(discordance / n)``: for paired 0/1 outcomes the
    per-item difference is ±1 on discordant items and 0 elsewhere, so near "no difference" its
    standard error is ``sqrt(discordance / n)`` (McNemar's test in normal form). A smaller
    observed difference has a 95% interval that includes 0 (``min_detectable_difference`` with
    ``power=0.5``). ``discordance``: the share of items exactly one model gets right (from per-item results).
    Without it, the models' errors are taken as independent, ``a(1-b) + b(1-a)``: an upper
    bound for models that fail on the same hard items, so the warning then errs towards firing.
    Figures include ``n_needed``: the items at which this difference would be resolved.
    """
    if n < 1:
        raise ValueError(f"check_eval_size needs n >= 1 items, got {n}")
    for name, acc in zip(names, (acc_a, acc_b)):
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"accuracy of {name} must be in [0, 1], got {acc}")
    if discordance is None:
        discordance = acc_a * (1 - acc_b) + acc_b * (1 - acc_a)
    diff = abs(acc_a - acc_b)
    mdd = min_detectable_difference(n, paired=True, discordance=discordance, power=0.5)
    resolvable = diff > 0 and discordance > 0
    n_needed = items_needed(diff, paired=True, discordance=discordance, power=0.5) if resolvable else None
    figures = {"n": n, "models": list(names), "difference": diff, "min_detectable": mdd,
               "discordance": discordance, "n_needed": n_needed}
    pair = f"{names[0]} vs {names[1]}"
    if diff < mdd:
        need = f"about {n_needed} items would" if n_needed else "no number of items can"
        message = (f"{pair}: the difference {diff:.1%} is below the {mdd:.1%} that {n} items resolve "
                   f"at 95%; {need} separate them. Treat the two as tied or evaluate on more items.")
        return Pitfall("eval_size", "warning", message, figures)
    return Pitfall("eval_size", "ok",
                   f"{pair}: the difference {diff:.1%} exceeds the {mdd:.1%} that {n} items resolve.", figures)


def paired_outcomes(items_a: Sequence[Mapping], items_b: Sequence[Mapping]) -> tuple[int, float, float, float]:
    """``(n, acc_a, acc_b, discordance)`` over the items two models share by ``id``.

    Items carry ``correct`` flags (``evaluate_model``'s ``items``); ``discordance`` is the share
    of shared items exactly one of the two models gets right.
    """
    b_by_id = {it["id"]: bool(it["correct"]) for it in items_b}
    pairs = [(bool(it["correct"]), b_by_id[it["id"]]) for it in items_a if it["id"] in b_by_id]
    if not pairs:
        raise ValueError("the two models share no eval item ids: nothing to compare")
    n = len(pairs)
    return n, sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n, sum(x != y for x, y in pairs) / n


# --------------------------------------------------------------------------- format failures


def format_counts(result: Mapping[str, Any]) -> dict[str, int]:
    """``{"n", "correct", "wrong", "no_answer"}`` from an ``evaluate_model`` result's items:
    ``wrong`` is an answer found and wrong, ``no_answer`` the extractor finding none."""
    items = result.get("items")
    if not items:
        raise ValueError("format_counts needs the per-item results ('items' with 'answer' and 'correct')")
    no_answer = sum(it.get("answer") is None for it in items)
    correct = sum(bool(it["correct"]) for it in items)
    return {"n": len(items), "correct": correct, "wrong": len(items) - correct - no_answer,
            "no_answer": no_answer}


def check_format_failures(per_model_counts: Mapping[str, Mapping[str, int]], threshold: float = 0.05) -> Pitfall:
    """Warn for models whose no-answer share (extractor found nothing) exceeds ``threshold``.

    ``per_model_counts``: ``{model: {"n", "no_answer", "wrong"}}`` (see :func:`format_counts`).
    Figures per model: both counts and shares, and the share of its failures that are format
    failures — a model failing mostly by format needs a prompt or extractor fix, not more data.
    """
    if not per_model_counts:
        raise ValueError("check_format_failures needs counts for at least one model")
    figures: dict[str, Any] = {"threshold": threshold, "models": {}}
    flagged = []
    for name, c in per_model_counts.items():
        missing = {"n", "no_answer", "wrong"} - set(c)
        if missing:
            raise ValueError(f"format counts of model {name!r} lack {sorted(missing)}")
        n, none, wrong = c["n"], c["no_answer"], c["wrong"]
        if n < 1 or none < 0 or wrong < 0 or none + wrong > n:
            raise ValueError(f"format counts of model {name!r} are inconsistent: {dict(c)}")
        failures = none + wrong
        figures["models"][name] = {"n": n, "no_answer": none, "wrong": wrong, "no_answer_share": none / n,
                                   "format_share_of_failures": none / failures if failures else 0.0}
        if none / n > threshold:
            flagged.append(f"{name} gave no extractable answer on {none} of {n} items ({none / n:.1%}; "
                           f"{wrong} answers were found and wrong)")
    if flagged:
        message = ("; ".join(flagged) + ". These count as wrong in the accuracy: check the answer "
                   "format the prompt asks for and the extractor before comparing knowledge.")
        return Pitfall("format_failures", "warning", message, figures)
    return Pitfall("format_failures", "ok",
                   f"every model's no-answer share is at most {threshold:.0%}.", figures)


# --------------------------------------------------------------------------- judge position bias


def check_position_bias(rate: float, threshold: float = 0.2, n: int | None = None) -> Pitfall:
    """Warn when the pairwise judge's position-bias ``rate`` exceeds ``threshold``.

    ``rate``: :func:`distillery.evaluate.judge.position_bias_rate`, the share of pairs (judged
    in both orders) where the judge named the same position both times, i.e. followed the
    position rather than the reply; ``n``: how many pairs it is measured on (the judge's
    ``position_bias_n``).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"position-bias rate must be in [0, 1], got {rate}")
    figures = {"rate": rate, "threshold": threshold, "n": n}
    pairs = f"{n} pairs" if n is not None else "pairs"
    if rate > threshold:
        message = (f"the judge named the same position in both orders (followed the position, not the reply) on {rate:.1%} of {pairs} "
                   f"(above {threshold:.0%}): its single-order verdicts say more about position than "
                   "quality; trust only win rates averaged over both orders, or use a stronger judge "
                   "or a reference-guided rubric.")
        return Pitfall("position_bias", "warning", message, figures)
    return Pitfall("position_bias", "ok", f"judge position-bias rate {rate:.1%} of {pairs}.", figures)


# --------------------------------------------------------------------------- all checks, and the report block


def run_pitfall_checks(
    *,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    train_records: Iterable[Mapping[str, Any]] | None = None,
    eval_items: Sequence[str] | Mapping[str, str] | None = None,
    position_bias_rate: float | None = None,
    position_bias_n: int | None = None,
    n: int = 13,
    contamination_threshold: float = 0.0,
    format_threshold: float = 0.05,
    position_bias_threshold: float = 0.2,
) -> list[Pitfall]:
    """Every check whose inputs are given, in report order.

    ``models``: ``evaluate_model`` results by name (need ``items`` with ``id``, ``answer``,
    ``correct``): format failures per model and the eval-size check for every pair of models.
    ``train_records``: synthetic SFT/preference records (their prompt and response texts) and
    ``eval_items``: the eval problems' texts, for contamination.
    """
    pitfalls: list[Pitfall] = []
    if train_records is not None and eval_items is not None:
        texts = (record_text(dict(r)) for r in train_records)
        pitfalls.append(check_contamination(texts, eval_items, n, contamination_threshold))
    if models:
        for a, b in combinations(models, 2):
            size, acc_a, acc_b, disc = paired_outcomes(models[a]["items"], models[b]["items"])
            pitfalls.append(check_eval_size(size, acc_a, acc_b, disc, names=(a, b)))
        counts = {name: format_counts(m) for name, m in models.items()}
        pitfalls.append(check_format_failures(counts, format_threshold))
    if position_bias_rate is not None:
        pitfalls.append(check_position_bias(position_bias_rate, position_bias_threshold, position_bias_n))
    return pitfalls


def format_pitfalls(pitfalls: Sequence[Pitfall]) -> str:
    """The report.md block: warnings first (as a quote each), then the checks that passed."""
    lines = ["## Pitfall checks", ""]
    warnings = [p for p in pitfalls if p.warning]
    passed = [p for p in pitfalls if not p.warning]
    if not pitfalls:
        lines.append("No pitfall checks ran (no training data, per-item results or judge given).")
    for p in warnings:
        lines += [f"> **Warning ({p.kind.replace('_', ' ')})**: {p.message}", ""]
    if passed:
        lines.append("Passed:" if warnings else "All checks passed:")
        lines += [f"- {p.kind.replace('_', ' ')}: {p.message}" for p in passed]
    return "\n".join(lines).rstrip() + "\n"
