"""Filters for synthetic data: small, named, composable checks that keep or reject records.

Two kinds of filter:

* a **record filter** looks at one record and returns a rejection reason, or ``None`` to keep it:
  :func:`length_filter`, :func:`format_filter`, :func:`refusal_filter`,
  :func:`judge_score_filter`, :func:`verify_filter`;
* a **dataset filter** looks at all records at once and returns ``(kept, rejected)``, where
  ``rejected`` holds ``(record, reason)`` pairs: :func:`exact_dedup`, :func:`near_dedup`
  (MinHash LSH), :func:`decontamination_filter` (n-gram overlap with evaluation texts).

:func:`apply_filters` runs record filters first (so deduplication keeps the first *valid* copy),
then dataset filters in order, and returns a :class:`FilterReport`: kept records, rejects with
the filter's name and reason, and rejection counts per filter. Kept records carry the names of
the filters they passed in ``meta["filters"]`` (appended; the rest of ``meta`` is untouched).
:class:`FilterConfig` and :func:`build_filters` build the same filters from a config section.

Filters work on SFT records (prompt = user turns, response = final assistant turn) and on
preference records (prompt = the prompt's user turns, response = the chosen reply); see
:func:`prompt_of` and :func:`response_of`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distillery.answers import GradeItem, Grader, GraderOptions, build_grader
from distillery.config import StrictModel
from distillery.records import prompt_of, record_text, response_of, word_tokens

Record = dict[str, Any]
Rejected = list[tuple[Record, str]]

__all__ = [
    "DEFAULT_REFUSAL_PHRASES", "DatasetFilter", "FilterConfig", "FilterReport", "RecordFilter",
    "apply_filters", "build_filters", "decontaminate",
    "decontamination_filter", "exact_dedup", "format_filter",
    "judge_score_filter", "length_filter", "near_dedup", "prompt_of", "refusal_filter",
    "response_of", "run_filters", "verify_filter",
]


# --------------------------------------------------------------------------- record accessors


def _normalize_text(text: str) -> str:
    return " ".join(text.casefold().split())


# --------------------------------------------------------------------------- filter types


@dataclass(frozen=True)
class RecordFilter:
    """A named per-record check: ``check(record)`` returns a rejection reason or ``None``."""

    name: str
    check: Callable[[Record], str | None]

    def __call__(self, record: Record) -> str | None:
        return self.check(record)


@dataclass(frozen=True)
class DatasetFilter:
    """A named whole-dataset check: ``run(records)`` returns ``(kept, [(record, reason)])``."""

    name: str
    run: Callable[[list[Record]], tuple[list[Record], Rejected]]

    def __call__(self, records: list[Record]) -> tuple[list[Record], Rejected]:
        return self.run(records)


# --------------------------------------------------------------------------- record filters


def length_filter(
    min_chars: int | None = None,
    max_chars: int | None = None,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> RecordFilter:
    """Reject responses outside ``[min, max]`` characters and/or tokens (bounds inclusive).

    ``count_tokens`` counts the tokens of a text (e.g. ``lambda t: len(tok(t).input_ids)``);
    without one, tokens are whitespace-separated words.
    """
    counter = count_tokens or (lambda text: len(text.split()))
    use_tokens = min_tokens is not None or max_tokens is not None

    def check(record: Record) -> str | None:
        text = response_of(record)
        sizes = [("chars", len(text), min_chars, max_chars)]
        if use_tokens:
            sizes.append(("tokens", counter(text), min_tokens, max_tokens))
        for unit, size, lo, hi in sizes:
            if lo is not None and size < lo:
                return f"response has {size} {unit}, fewer than min_{unit}={lo}"
            if hi is not None and size > hi:
                return f"response has {size} {unit}, more than max_{unit}={hi}"
        return None

    return RecordFilter("length", check)


def format_filter(pattern: str | re.Pattern[str]) -> RecordFilter:
    """Reject responses in which the regular expression ``pattern`` is not found (re.search)."""
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern

    def check(record: Record) -> str | None:
        if regex.search(response_of(record)):
            return None
        return f"response does not match the required pattern {regex.pattern!r}"

    return RecordFilter("format", check)


DEFAULT_REFUSAL_PHRASES: tuple[str, ...] = (
    "i cannot", "i can't", "i can not", "i won't", "i will not", "i'm sorry, but",
    "i am sorry, but", "i apologize, but", "as an ai", "as a language model",
    "i'm not able to", "i am not able to", "i'm unable to", "i am unable to",
    "i must decline", "i'm not comfortable", "against my guidelines",
)


def refusal_filter(
    phrases: Iterable[str] = DEFAULT_REFUSAL_PHRASES, head_chars: int | None = None
) -> RecordFilter:
    """Reject responses containing a refusal phrase (case-insensitive; ’ counts as ').

    ``head_chars`` looks only at the beginning of the response, where refusals usually are, so
    that a reasoning chain saying "I cannot divide by zero, so ..." is not taken for one.
    """
    wanted = [p.casefold().replace("\u2019", "'") for p in phrases]

    def check(record: Record) -> str | None:
        text = response_of(record)
        if head_chars is not None:
            text = text[:head_chars]
        text = text.casefold().replace("\u2019", "'")
        found = [(text.find(p), p) for p in wanted if p in text]
        if found:
            return f"refusal phrase {min(found)[1]!r} in the response"  # the earliest one
        return None

    return RecordFilter("refusal", check)


def judge_score_filter(min_score: float, key: str = "judge") -> RecordFilter:
    """Reject records whose ``meta["scores"][key]`` is missing, not a number, or < ``min_score``."""

    def check(record: Record) -> str | None:
        scores = (record.get("meta") or {}).get("scores") or {}
        score = scores.get(key) if isinstance(scores, dict) else None
        if score is None:
            return f"no score {key!r} in meta.scores"
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return f"score {key!r} is not a number: {score!r}"
        if score < min_score:
            return f"score {key!r} is {score}, below min_score={min_score}"
        return None

    return RecordFilter("judge_score", check)


def verify_filter(
    grader: Grader | GraderOptions | str | dict | None = None, keep_unreferenced: bool = False
) -> RecordFilter:
    """Reject records whose response does not answer ``record["reference"]`` correctly.

    ``grader`` is the task's grader (:mod:`distillery.answers`); None: ``symbolic`` (numbers,
    fractions, percentages, then simple algebra), which suits references of any kind. Records
    without a reference are rejected unless ``keep_unreferenced``.
    """
    judge = grader if isinstance(grader, Grader) else build_grader(grader or "symbolic")

    def check(record: Record) -> str | None:
        reference = record.get("reference")
        if reference is None or str(reference).strip() == "":
            return None if keep_unreferenced else "no reference to verify against"
        result = judge.grade(GradeItem(response_of(record), str(reference), prompt_of(record)))
        if result.status == "no_answer":
            return "no final answer found in the response"
        if result.correct:
            return None
        return f"answer {_clip(result.answer or '')!r} does not match reference {_clip(str(reference))!r}"

    return RecordFilter("verify", check)


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------- dataset filters


def exact_dedup(key: Callable[[Record], str] = record_text) -> DatasetFilter:
    """Drop records whose normalized ``key`` text (casefold, collapsed whitespace) was seen."""

    def run(records: list[Record]) -> tuple[list[Record], Rejected]:
        seen: dict[str, Any] = {}
        kept: list[Record] = []
        rejected: Rejected = []
        for rec in records:
            text = _normalize_text(key(rec))
            if text in seen:
                rejected.append((rec, f"exact duplicate of {seen[text]!r}"))
            else:
                seen[text] = rec.get("id")
                kept.append(rec)
        return kept, rejected

    return DatasetFilter("exact_dedup", run)


def _shingles(text: str, ngram: int, unit: str) -> set[str]:
    if unit == "word":
        words = text.split()
        return {" ".join(words[i : i + ngram]) for i in range(max(len(words) - ngram + 1, 1))}
    return {text[i : i + ngram] for i in range(max(len(text) - ngram + 1, 1))}


def near_dedup(
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    shingle: Literal["char", "word"] = "char",
    key: Callable[[Record], str] = record_text,
    seed: int = 1,
) -> DatasetFilter:
    """Drop near-duplicates: MinHash of ``ngram``-shingles, LSH candidates, estimated Jaccard.

    The first record of a cluster is kept; a later one whose estimated Jaccard similarity to a
    kept record is at least ``threshold`` is rejected, naming the record it duplicates.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near_dedup threshold must be in (0, 1], got {threshold}")
    if shingle not in ("char", "word") or ngram < 1:
        raise ValueError("near_dedup needs shingle 'char' or 'word' and ngram >= 1")

    # LSH (bands, rows), optimized by datasketch once per filter. Weighted for recall: a missed
    # near-duplicate stays in the data, while a false candidate only costs one Jaccard check.
    bands: list[tuple[int, int]] = []

    def run(records: list[Record]) -> tuple[list[Record], Rejected]:
        from datasketch import MinHash, MinHashLSH

        if bands:
            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=bands[0])
        else:
            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
            bands.append((lsh.b, lsh.r))
        # one set of permutations for all (datasketch would draw them again per MinHash), and
        # crc32 (stable across runs, C speed) rather than the default sha1 for the shingles
        template = MinHash(num_perm=num_perm, seed=seed)
        shared: dict[str, Any] = {"hashfunc": zlib.crc32, "permutations": template.permutations}
        if hasattr(template, "scheme"):  # datasketch >= 2 wants the scheme with permutations
            shared["scheme"] = template.scheme
        hashes: dict[int, Any] = {}
        kept: list[Record] = []
        rejected: Rejected = []
        for i, rec in enumerate(records):
            mh = MinHash(num_perm=num_perm, seed=seed, **shared)
            mh.update_batch([s.encode("utf-8") for s in _shingles(_normalize_text(key(rec)), ngram, shingle)])
            best, best_sim = None, -1.0
            for j in lsh.query(mh):
                sim = mh.jaccard(hashes[j])
                if sim >= threshold and sim > best_sim:
                    best, best_sim = j, sim
            if best is not None:
                dup_of = records[best].get("id")
                rejected.append((rec, f"near duplicate of {dup_of!r} (estimated Jaccard {best_sim:.2f})"))
                continue
            lsh.insert(i, mh)
            hashes[i] = mh
            kept.append(rec)
        return kept, rejected

    return DatasetFilter("near_dedup", run)


def decontaminate(
    records: list[Record], eval_texts: Sequence[str], n: int = 13
) -> tuple[list[Record], Rejected]:
    """Reject records whose prompt shares a word ``n``-gram with any evaluation text.

    Texts are compared as lowercase tokens (words, and each punctuation or operator sign on its
    own: ``22+55*2`` is 5 tokens). An evaluation text shorter than ``n`` tokens counts as one
    gram of its own length, so short problems (arithmetic) are caught when they appear whole.
    """
    return decontamination_filter(eval_texts, n).run(records)


def decontamination_filter(eval_texts: Sequence[str], n: int = 13) -> DatasetFilter:
    """:func:`decontaminate` as a named dataset filter (the n-gram index is built once)."""
    if n < 1:
        raise ValueError(f"decontamination n must be >= 1, got {n}")
    index: dict[int, dict[tuple[str, ...], int]] = {}  # gram length -> gram -> eval text number
    for number, text in enumerate(eval_texts):
        toks = word_tokens(text)
        if not toks:
            continue
        size = min(n, len(toks))
        grams = index.setdefault(size, {})
        for i in range(len(toks) - size + 1):
            grams.setdefault(tuple(toks[i : i + size]), number)

    def run(records: list[Record]) -> tuple[list[Record], Rejected]:
        kept: list[Record] = []
        rejected: Rejected = []
        for rec in records:
            reason = _overlap(word_tokens(prompt_of(rec)))
            if reason is None:
                kept.append(rec)
            else:
                rejected.append((rec, reason))
        return kept, rejected

    def _overlap(toks: list[str]) -> str | None:
        for size, grams in sorted(index.items(), reverse=True):
            for i in range(len(toks) - size + 1):
                gram = tuple(toks[i : i + size])
                if gram in grams:
                    return (f"prompt shares the {size}-gram {_clip(' '.join(gram))!r} "
                            f"with evaluation text {grams[gram]}")
        return None

    return DatasetFilter("decontaminate", run)


# --------------------------------------------------------------------------- applying filters


@dataclass
class FilterReport:
    """What :func:`apply_filters` kept and rejected, and how many each filter rejected."""

    kept: list[Record]
    rejected: list[dict[str, Any]]  # {"record", "reason", "filter"}
    counts: dict[str, int]  # filter name -> records it rejected (0 included), in run order
    total: int = 0
    filters: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line per filter, then the total: what the CLI prints."""
        width = max([len(name) for name in self.counts] + [4])
        lines = [f"{name:<{width}}  rejected {count}" for name, count in self.counts.items()]
        lines.append(f"{'kept':<{width}}  {len(self.kept)} of {self.total}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Counts only (JSON-ready): ``{"total", "kept", "rejected": {filter: n}}``."""
        return {"total": self.total, "kept": len(self.kept), "rejected": dict(self.counts)}


def _name_of(f: Any) -> str:
    return getattr(f, "name", None) or getattr(f, "__name__", None) or type(f).__name__


def apply_filters(
    records: Iterable[Record],
    record_filters: Sequence[Callable[[Record], str | None]] = (),
    dataset_filters: Sequence[Callable[[list[Record]], tuple[list[Record], Rejected]]] = (),
    eval_texts: Sequence[str] | None = None,
    decontaminate_n: int = 13,
) -> FilterReport:
    """Run record filters (first rejection wins), then dataset filters in order.

    ``eval_texts`` adds a decontamination filter (word ``decontaminate_n``-grams) at the end,
    unless ``dataset_filters`` already holds one named "decontaminate". Kept records are new
    dicts whose ``meta["filters"]`` lists the filters they passed, after any names already
    there; input records are not modified.
    """
    records = list(records)
    dataset_filters = list(dataset_filters)
    if eval_texts is not None and "decontaminate" not in [_name_of(f) for f in dataset_filters]:
        dataset_filters.append(decontamination_filter(eval_texts, decontaminate_n))
    names = [_name_of(f) for f in (*record_filters, *dataset_filters)]
    if len(set(names)) != len(names):
        raise ValueError(f"filter names must be unique, got {names}")
    counts = dict.fromkeys(names, 0)
    rejects: list[dict[str, Any]] = []

    def reject(rec: Record, reason: str, name: str) -> None:
        rejects.append({"record": rec, "reason": reason, "filter": name})
        counts[name] += 1

    current: list[Record] = []
    for rec in records:
        for f in record_filters:
            reason = f(rec)
            if reason is not None:
                reject(rec, reason, _name_of(f))
                break
        else:
            current.append(rec)
    for f in dataset_filters:
        current, dropped = f(current)
        for rec, reason in dropped:
            reject(rec, reason, _name_of(f))
    kept = []
    for rec in current:
        meta = dict(rec.get("meta") or {})
        meta["filters"] = [*meta.get("filters", []), *names]
        kept.append({**rec, "meta": meta})
    return FilterReport(kept=kept, rejected=rejects, counts=counts, total=len(records), filters=names)


# --------------------------------------------------------------------------- config


class FilterConfig(StrictModel):
    """Which filters the generate stage runs on synthetic records (None / False = off)."""

    dedup: bool = True  # exact duplicates of prompt + response (normalized)
    near_dedup_threshold: float | None = Field(0.85, gt=0.0, le=1.0)  # MinHash Jaccard
    near_dedup_num_perm: int = Field(128, ge=16)
    near_dedup_ngram: int = Field(5, ge=1)
    near_dedup_shingle: Literal["char", "word"] = "char"
    min_chars: int | None = Field(None, ge=0)  # of the response
    max_chars: int | None = Field(None, ge=1)
    require_pattern: str | None = None  # regex the response must contain, e.g. "#-?\\d+"
    drop_refusals: bool = True
    refusal_phrases: list[str] | None = None  # None = DEFAULT_REFUSAL_PHRASES
    verify: bool = False  # final answer vs record["reference"]; needs references
    min_judge_score: float | None = None  # meta.scores[judge_key] >= this
    judge_key: str = "judge"
    decontaminate_n: int | None = Field(13, ge=1)  # word n-grams; needs eval texts

    @field_validator("require_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"require_pattern is not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> FilterConfig:
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError("min_chars must be <= max_chars")
        return self


def build_filters(
    cfg: FilterConfig, eval_texts: Sequence[str] | None = None,
    grader: GraderOptions | str | None = None,
) -> tuple[list[RecordFilter], list[DatasetFilter]]:
    """The record and dataset filters ``cfg`` asks for, cheapest first.

    Decontamination is built only when ``cfg.decontaminate_n`` is set and ``eval_texts`` given;
    ``grader`` (the seeds' task grader) is what ``verify`` checks answers with.
    """
    record_filters: list[RecordFilter] = []
    if cfg.min_chars is not None or cfg.max_chars is not None:
        record_filters.append(length_filter(cfg.min_chars, cfg.max_chars))
    if cfg.require_pattern is not None:
        record_filters.append(format_filter(cfg.require_pattern))
    if cfg.drop_refusals:
        phrases = DEFAULT_REFUSAL_PHRASES if cfg.refusal_phrases is None else cfg.refusal_phrases
        record_filters.append(refusal_filter(phrases))
    if cfg.min_judge_score is not None:
        record_filters.append(judge_score_filter(cfg.min_judge_score, cfg.judge_key))
    if cfg.verify:
        record_filters.append(verify_filter(grader))
    dataset_filters: list[DatasetFilter] = []
    if cfg.dedup:
        dataset_filters.append(exact_dedup())
    if cfg.near_dedup_threshold is not None:
        dataset_filters.append(near_dedup(cfg.near_dedup_threshold, cfg.near_dedup_num_perm,
                                          cfg.near_dedup_ngram, cfg.near_dedup_shingle))
    if cfg.decontaminate_n is not None and eval_texts is not None:
        dataset_filters.append(decontamination_filter(eval_texts, cfg.decontaminate_n))
    return record_filters, dataset_filters


def run_filters(
    records: Iterable[Record], cfg: FilterConfig | None = None, eval_texts: Sequence[str] | None = None,
    grader: GraderOptions | str | None = None,
) -> FilterReport:
    """``build_filters`` + ``apply_filters`` in one call: what the generate stage runs."""
    record_filters, dataset_filters = build_filters(cfg or FilterConfig(), eval_texts, grader)
    return apply_filters(records, record_filters, dataset_filters)
