"""LLM-as-judge through any :class:`~distillery.teachers.base.Teacher`: grades and win rates.

Two ways to judge, both as phases of the elicitation engine
(:func:`~distillery.teachers.phases.run_phase`): every judge call is written to
``<out_dir>/<name>.jsonl`` as it completes and answered from a
:class:`~distillery.teachers.phases.ResponseCache` when it was paid for before, so a re-run costs
no judge calls and a killed run resumes where it stopped.

- **Pointwise** (:func:`grade_pointwise`): the judge rates one answer on ``1..max_score`` with a
  rationale (MT-Bench's single-answer grading); items with a reference get the reference-guided
  template. Replies are read by :func:`~distillery.teachers.replies.parse_grade`; a reply without
  a score gives ``score=None`` and is counted, never guessed.
- **Pairwise** (:func:`compare_pairwise`): the judge sees the same question with model A's and
  model B's answers and answers ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). Every pair is judged
  twice, once with each answer first. The two verdicts, mapped back to the models, combine as
  in MT-Bench: equal verdicts stand (win, loss, tie); different ones — the verdict followed the
  position, or one order said tie — are ``inconsistent`` and count as a tie. A pair with a
  verdict missing in either order (unparsable reply, failed call) is ``None``: counted, and left
  out of every rate, because a single-order verdict carries the position bias the swap removes.

Rates: :func:`win_rate` (win 1, tie or inconsistent ½, loss 0; bootstrap interval),
:func:`position_bias_rate` (share of pairs whose two verdicts named the same *position*) and
:func:`length_controlled_win_rate` (AlpacaEval 2's idea: a logistic regression of the per-pair
preference on the length difference, read off at equal lengths).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from distillery.chat import builtin, render
from distillery.config import ConfigError
from distillery.errors import DataError
from distillery.evaluate.stats import bootstrap_ci
from distillery.records import RecordError
from distillery.teachers.base import GenerationRequest, GenerationResult, SamplingParams, Teacher
from distillery.teachers.phases import (
    MalformedOutput,
    Outcome,
    PhaseFiles,
    ResponseCache,
    read_phase,
    run_phase,
)
from distillery.teachers.replies import json_objects, parse_grade

Verdict = Literal["A", "B", "tie"]  # the judge's verdict about *positions*
PairOutcome = Literal["win", "loss", "tie", "inconsistent"]  # for model A, both orders combined

JUDGE_PARAMS = SamplingParams(max_new_tokens=512, temperature=0.0)  # greedy: a judge is reproducible


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge: the question, the model's answer, the reference if one exists."""

    id: str
    prompt: str
    answer: str
    reference: str | None = None


def as_items(rows: Iterable[JudgeItem | Mapping]) -> list[JudgeItem]:
    """Judge items from :class:`JudgeItem` objects or dicts.

    A dict is ``{"id", "prompt", "answer" (or "output", preferred: ``evaluate_model``'s items),
    "reference"?}`` or an SFT record ``{"id", "messages", "reference"?}`` whose last user
    message is the question and last assistant message the answer. Ids must be unique.
    """
    items = [row if isinstance(row, JudgeItem) else _item_from_dict(row, i) for i, row in enumerate(rows)]
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise RecordError(f"judge items: id {item.id!r} appears twice; ids name the judge calls "
                              "and must be unique")
        seen.add(item.id)
    return items


def _item_from_dict(row: Mapping, index: int) -> JudgeItem:
    where = f"judge item {index} (id {row.get('id')!r})"
    if "id" not in row:
        raise RecordError(f"{where}: no 'id' key; every item needs a unique id")
    if "messages" in row:
        msgs = row["messages"]
        user = [m["content"] for m in msgs if m.get("role") == "user"]
        reply = [m["content"] for m in msgs if m.get("role") == "assistant"]
        if not user or not reply:
            raise RecordError(f"{where}: 'messages' needs a user and an assistant message")
        prompt, answer = user[-1], reply[-1]
    else:
        # evaluate_model's items hold both: "output" (the reply, what is judged) and "answer"
        # (what the extractor found in it, None when nothing)
        prompt, answer = row.get("prompt"), row["output"] if "output" in row else row.get("answer")
        if prompt is None or answer is None:
            raise RecordError(f"{where}: needs 'prompt' and 'answer' (or 'output'), or 'messages'; "
                              f"has {sorted(row)}")
    return JudgeItem(str(row["id"]), str(prompt), str(answer), row.get("reference"))


# --------------------------------------------------------------------------- phase plumbing


def _judged(out_dir: str | Path, name: str, expected: list[str]) -> dict[str, dict]:
    """Judge lines of a finished phase by item and order: records, and rejects with a reason.

    ``expected``: the ``<item id>:<order>`` keys this call asked for. A finished phase is never
    run again, so keys it lacks mean ``out_dir`` holds an earlier run over other items.
    """
    files = PhaseFiles(out_dir, name)
    rows = {}
    for row in read_phase(files.records) + read_phase(files.rejects):
        meta = row["meta"]
        rows[f"{meta['item_id']}:{meta.get('order', '')}"] = row
    missing = sorted({k.rsplit(":", 1)[0] for k in expected if k not in rows})
    if missing:
        raise ConfigError(f"{files.records} is a finished judge phase without {len(missing)} of these "
                          f"items (e.g. {missing[0]!r}): it judged other items. Use a new "
                          "out_dir or name; a shared ResponseCache still skips the calls already paid for")
    return rows


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- pointwise


@dataclass
class Grade:
    """The judge's grade of one answer: ``score`` on ``1..max_score``, or None with ``error``."""

    id: str
    score: float | None
    rationale: str
    raw: str
    error: str | None = None  # "malformed: ..." (no score in the reply) or "teacher_error: ..."


def grade_pointwise(
    judge: Teacher,
    items: Iterable[JudgeItem | Mapping],
    out_dir: str | Path,
    *,
    template: str | None = None,
    reference_template: str | None = None,
    max_score: int = 10,
    params: SamplingParams = JUDGE_PARAMS,
    cache: ResponseCache | None = None,
    name: str = "judge_pointwise",
    show_progress: bool = True,
) -> list[Grade]:
    """Grade every answer with ``judge``; one :class:`Grade` per item, in item order.

    ``template`` (items without a reference) and ``reference_template`` (items with one) are
    Jinja2 text or ``@file`` with the variables ``prompt``, ``answer``, ``reference`` and
    ``max_score``; the defaults are ``judge_pointwise.j2`` and ``judge_pointwise_reference.j2``.
    Judge calls land in ``<out_dir>/<name>.jsonl`` (grades) and ``<name>.rejects.jsonl``
    (replies without a score, failed calls); see the module docstring for caching and resume.
    """
    items = as_items(items)
    plain = template or builtin("judge_pointwise")
    guided = reference_template or builtin("judge_pointwise_reference")

    def requests() -> Iterator[GenerationRequest]:
        for item in items:
            source, label = (guided, "reference_template") if item.reference else (plain, "template")
            text = render(source, f"judge pointwise {label}", prompt=item.prompt, answer=item.answer,
                          reference=item.reference, max_score=max_score)
            yield GenerationRequest(f"{name}:{item.id}", _user(text), params,
                                    meta={"item_id": item.id, "guided": bool(item.reference)})

    def handle(result: GenerationResult) -> Outcome:
        text = result.generations[0].text
        score, rationale = parse_grade(text, max_score)  # MalformedOutput -> a reject
        meta = {k: result.request.meta[k] for k in ("item_id", "guided")}
        return Outcome(records=[{"id": meta["item_id"], "score": score, "rationale": rationale,
                                 "raw": text, "meta": {**meta, "judge": judge.name}}])

    run_phase(name, requests(), judge, handle, out_dir, cache=cache, total=len(items),
              show_progress=show_progress)
    rows = _judged(out_dir, name, [f"{item.id}:" for item in items])
    grades = []
    for item in items:
        row = rows[f"{item.id}:"]
        if "score" in row:
            grades.append(Grade(item.id, row["score"], row["rationale"], row["raw"]))
        else:  # a reject: "malformed: ..." (no score in the reply) or "teacher_error: ..."
            grades.append(Grade(item.id, None, "", row["raw"], row["reason"]))
    return grades


def grade_summary(grades: Sequence[Grade], resamples: int = 10000, seed: int = 0) -> dict:
    """Mean score with its bootstrap 95% interval over the graded items, and what was not graded.

    ``unparsed`` counts replies without a score, ``failed`` judge calls that errored; neither
    enters the mean.
    """
    scores = [g.score for g in grades if g.score is not None]
    errors = [g.error or "" for g in grades if g.score is None]
    mean, lo, hi = bootstrap_ci(scores, resamples, seed=seed) if scores else (None, None, None)
    return {"mean_score": mean, "ci95": [lo, hi], "n": len(grades), "graded": len(scores),
            "unparsed": sum(e.startswith("malformed") for e in errors),
            "failed": sum(not e.startswith("malformed") for e in errors)}


# --------------------------------------------------------------------------- pairwise verdicts

_BRACKET = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_NAMED = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}


def parse_pairwise_verdict(text: str) -> Verdict:
    """"A", "B" or "tie" from a judge's reply; :class:`MalformedOutput` when there is none.

    Reads the last ``[[A]]`` / ``[[B]]`` / ``[[C]]`` (``[[tie]]`` too), MT-Bench's format; else a
    JSON object with ``winner`` or ``verdict`` set to ``"A"``, ``"B"``, ``"C"`` or ``"tie"``.
    """
    found = _BRACKET.findall(text)
    if found:
        return _NAMED[found[-1].lower()]  # type: ignore[return-value]
    for obj in json_objects(text):
        value = obj.get("winner", obj.get("verdict"))
        if isinstance(value, str) and value.strip().lower() in _NAMED:
            return _NAMED[value.strip().lower()]  # type: ignore[return-value]
    raise MalformedOutput(f"no verdict ([[A]], [[B]] or [[C]]) in the judge's reply: {text[:80]!r}")


def _for_model_a(verdict: Verdict | None, a_shown_first: bool) -> str | None:
    """A position verdict as a model verdict: 'a', 'b', 'tie' (None stays None)."""
    if verdict is None or verdict == "tie":
        return verdict
    return "a" if (verdict == "A") == a_shown_first else "b"


def combine_verdicts(a_first: Verdict | None, b_first: Verdict | None) -> PairOutcome | None:
    """Model A's outcome from the verdicts with A's answer shown first and with B's shown first.

    Both orders agree on the model: win / loss / tie. They disagree (the verdict followed the
    position, or one order said tie): ``inconsistent``, scored as a tie. Either missing: None.
    """
    one, two = _for_model_a(a_first, True), _for_model_a(b_first, False)
    if one is None or two is None:
        return None
    if one != two:
        return "inconsistent"
    return {"a": "win", "b": "loss", "tie": "tie"}[one]  # type: ignore[return-value]


_SCORE = {"win": 1.0, "tie": 0.5, "inconsistent": 0.5, "loss": 0.0}


@dataclass
class Comparison:
    """One pair judged in both orders; verdicts are about positions, ``outcome`` about model A."""

    id: str
    a_first: Verdict | None  # verdict when A's answer was shown as "Assistant A"
    b_first: Verdict | None  # verdict when B's answer was shown as "Assistant A"
    outcome: PairOutcome | None
    raw_a_first: str = ""
    raw_b_first: str = ""
    error: str | None = None  # why a verdict is missing

    @property
    def score(self) -> float | None:
        """Model A's preference: 1 win, ½ tie or inconsistent, 0 loss, None unjudged."""
        return None if self.outcome is None else _SCORE[self.outcome]


def _pair_up(items_a: list[JudgeItem], items_b: list[JudgeItem]) -> list[tuple[JudgeItem, JudgeItem]]:
    by_id = {b.id: b for b in items_b}
    missing = [a.id for a in items_a if a.id not in by_id]
    extra = sorted(set(by_id) - {a.id for a in items_a})
    if missing or extra:
        raise DataError(f"pairwise judging needs the same item ids for both models: only in A "
                        f"{missing[:5]}, only in B {extra[:5]}")
    pairs = []
    for a in items_a:
        b = by_id[a.id]
        if a.prompt != b.prompt:
            raise DataError(f"item {a.id!r}: the two models answered different prompts "
                            f"({a.prompt[:40]!r} vs {b.prompt[:40]!r})")
        pairs.append((a, b))
    return pairs


def compare_pairwise(
    judge: Teacher,
    items_a: Iterable[JudgeItem | Mapping],
    items_b: Iterable[JudgeItem | Mapping],
    out_dir: str | Path,
    *,
    template: str | None = None,
    params: SamplingParams = JUDGE_PARAMS,
    cache: ResponseCache | None = None,
    name: str = "judge_pairwise",
    show_progress: bool = True,
) -> list[Comparison]:
    """Judge model A's answers against model B's on the same items, each pair in both orders.

    Items are matched by id (same ids and prompts on both sides); the reference, when either
    side has one, goes into the prompt (reference-guided comparison). ``template`` is Jinja2
    text or ``@file`` with ``prompt``, ``answer_a``, ``answer_b``, ``reference``; the default is
    ``judge_pairwise.j2``. Two judge calls per pair (``<id>:ab``, ``<id>:ba``) land in
    ``<out_dir>/<name>.jsonl``; returns one :class:`Comparison` per pair in A's item order.
    """
    pairs = _pair_up(as_items(items_a), as_items(items_b))
    source = template or builtin("judge_pairwise")

    def requests() -> Iterator[GenerationRequest]:
        for a, b in pairs:
            reference = a.reference or b.reference
            for order, first, second in (("ab", a, b), ("ba", b, a)):
                text = render(source, "judge pairwise template", prompt=a.prompt, answer_a=first.answer,
                              answer_b=second.answer, reference=reference)
                yield GenerationRequest(f"{name}:{a.id}:{order}", _user(text), params,
                                        meta={"item_id": a.id, "order": order})

    def handle(result: GenerationResult) -> Outcome:
        text = result.generations[0].text
        meta = dict(result.request.meta)
        return Outcome(records=[{"id": f"{meta['item_id']}:{meta['order']}",
                                 "verdict": parse_pairwise_verdict(text), "raw": text,
                                 "meta": {**meta, "judge": judge.name}}])

    run_phase(name, requests(), judge, handle, out_dir, cache=cache, total=2 * len(pairs),
              show_progress=show_progress)
    rows = _judged(out_dir, name, [f"{a.id}:{order}" for a, _ in pairs for order in ("ab", "ba")])
    out = []
    for a, _b in pairs:
        ab, ba = rows[f"{a.id}:ab"], rows[f"{a.id}:ba"]
        v_ab, v_ba = ab.get("verdict"), ba.get("verdict")
        errors = [f"{order}: {r['reason']}" for order, r in (("ab", ab), ("ba", ba)) if "reason" in r]
        out.append(Comparison(a.id, v_ab, v_ba, combine_verdicts(v_ab, v_ba), ab["raw"], ba["raw"],
                              "; ".join(errors) or None))
    return out


# --------------------------------------------------------------------------- rates


@dataclass
class WinRate:
    """Model A's win rate over the judged pairs (ties and inconsistent pairs count ½)."""

    rate: float | None
    lo: float | None
    hi: float | None
    n: int  # judged pairs (the rate's denominator)
    wins: int
    losses: int
    ties: int
    inconsistent: int
    unjudged: int  # pairs with a verdict missing in either order

    def to_dict(self) -> dict:
        return asdict(self)


def win_rate(comparisons: Sequence[Comparison], resamples: int = 10000, level: float = 0.95,
             seed: int = 0) -> WinRate:
    """Mean of the per-pair scores (1 / ½ / 0) and its percentile-bootstrap interval."""
    scores = [c.score for c in comparisons if c.score is not None]
    count = {k: sum(c.outcome == k for c in comparisons) for k in ("win", "loss", "tie", "inconsistent")}
    rate, lo, hi = bootstrap_ci(scores, resamples, level, seed) if scores else (None, None, None)
    return WinRate(rate, lo, hi, len(scores), count["win"], count["loss"], count["tie"],
                   count["inconsistent"], len(comparisons) - len(scores))


def position_bias_rate(comparisons: Sequence[Comparison]) -> float | None:
    """Share of pairs (both verdicts present) whose verdict named the same position both times.

    ``[[A]]`` in both orders (or ``[[B]]`` in both) means the judge chose a position, not an
    answer: 1.0 for a judge that always says A, 0.0 for one that never contradicts itself.
    """
    both = [c for c in comparisons if c.a_first is not None and c.b_first is not None]
    if not both:
        return None
    return sum(c.a_first == c.b_first != "tie" for c in both) / len(both)


# --------------------------------------------------------------------------- length control


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-4, iters: int = 100,
                 tol: float = 1e-10) -> np.ndarray:
    """(intercept, slope) maximizing Σ y·log p + (1−y)·log(1−p), p = σ(b0 + b1·x), by Newton.

    ``x``, ``y``: ``[n]`` float; ``y`` may be fractional (a tie is ½). ``ridge`` is a small L2
    penalty on the slope only, so a judge that always picks the longer answer (separable data)
    gives a large finite slope instead of diverging; the intercept is not penalized.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)  # [n, 2]
    penalty = np.diag([0.0, ridge * len(x)])
    theta = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (y - p) - penalty @ theta
        hess = (design * (p * (1 - p))[:, None]).T @ design + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta + step
        if np.max(np.abs(step)) < tol:
            break
    return theta


def length_feature(len_a: Sequence[float], len_b: Sequence[float]) -> np.ndarray:
    """``tanh((len_a − len_b) / std)``, AlpacaEval 2's normalized length difference: ``[n]``.

    The std is over these pairs; all differences equal (std 0) gives a zero feature, where the
    length-controlled rate equals the raw one.
    """
    delta = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    std = delta.std()
    return np.tanh(delta / std) if std > 0 else np.zeros_like(delta)


@dataclass
class LengthControlled:
    """Model A's win rate at equal answer lengths, with its bootstrap interval."""

    rate: float | None
    lo: float | None
    hi: float | None
    raw: float | None  # the plain win rate over the same pairs
    slope: float | None  # preference logit per unit of the normalized length feature
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def length_controlled_win_rate(
    comparisons: Sequence[Comparison], len_a: Sequence[float], len_b: Sequence[float],
    resamples: int = 1000, level: float = 0.95, seed: int = 0, ridge: float = 1e-4,
) -> LengthControlled:
    """AlpacaEval 2's length-controlled win rate for model A (without its per-item term).

    Fits ``P(A preferred) = σ(b0 + b1·tanh(Δlen / std(Δlen)))`` to the per-pair scores
    (1 / ½ / 0; unjudged pairs left out) and reports ``σ(b0)``, the predicted win rate when both
    answers have the same length. ``len_a``/``len_b`` are aligned with ``comparisons``
    (characters or tokens). The interval resamples pairs and refits.
    """
    if not len(comparisons) == len(len_a) == len(len_b):
        raise ValueError(f"length-controlled win rate: {len(comparisons)} comparisons but "
                         f"{len(len_a)} / {len(len_b)} lengths; pass one length per comparison")
    keep = [i for i, c in enumerate(comparisons) if c.score is not None]
    if not keep:
        return LengthControlled(None, None, None, None, None, 0)
    x = length_feature(len_a, len_b)[keep]
    y = np.array([comparisons[i].score for i in keep])
    b0, b1 = fit_logistic(x, y, ridge)
    rng = np.random.default_rng(seed)
    boot = [fit_logistic(x[idx], y[idx], ridge)[0]
            for idx in rng.integers(0, len(y), size=(resamples, len(y)))]
    alpha = (1 - level) / 2
    lo, hi = 1.0 / (1.0 + np.exp(-np.quantile(boot, [alpha, 1 - alpha])))
    return LengthControlled(float(1 / (1 + np.exp(-b0))), float(lo), float(hi), float(y.mean()),
                            float(b1), len(y))


def pairwise_summary(comparisons: Sequence[Comparison], len_a: Sequence[float] | None = None,
                     len_b: Sequence[float] | None = None, resamples: int = 10000, seed: int = 0) -> dict:
    """Everything a report shows about one pairwise comparison, JSON-able."""
    out = {"win_rate": win_rate(comparisons, resamples, seed=seed).to_dict(),
           "position_bias_rate": position_bias_rate(comparisons),
           "position_bias_n": sum(c.a_first is not None and c.b_first is not None for c in comparisons)}
    if len_a is not None and len_b is not None:
        out["length_controlled"] = length_controlled_win_rate(
            comparisons, len_a, len_b, min(resamples, 1000), seed=seed).to_dict()
    return out
