"""Teachers that score token sequences: top-k log-probs at every position, for training.

On-policy distillation and the ``teacher_logprob`` reward need the teacher's next-token
distribution on text the student wrote during training. A *scorer* gives it for a list of token
sequences, from any teacher backend:

* an in-process model (the job's live teacher, or ``backend: hf``): one forward pass, top-k
  and the tail mass exactly as :func:`~distillery.teachers.hf.topk_logprobs` (the logit
  cache's form), in the model's own dtype;
* ``backend: openai``: ``/v1/completions`` with the token ids as prompt, ``echo`` and
  ``logprobs: k`` (vLLM, SGLang, ``distillery serve``), through :class:`OpenAITeacher` (bounded
  concurrency, retries, backoff, rate limits);
* any other backend with ``logprobs(token_ids, k)``.

For a sequence of ``T`` ids a :class:`ScoredSequence` has ``T − 1`` rows: row ``t`` is the
distribution of token ``t + 1`` given tokens ``0..t`` (aligned with ``logits[:, :-1]``).

Several named teachers (:class:`TeacherScoringConfig`) score either their own records (routing
by a record field) or together, as a weighted mixture of their distributions at each position
(:func:`mix_scores`). The student's token ids are scored, so every teacher must share its
tokenizer (:func:`check_scoring_tokenizers`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import Field, model_validator
from torch import nn

from distillery.config import ConfigError, StrictModel, TeacherConfig
from distillery.logits.topk import TeacherTopK, teacher_log_tail

# --------------------------------------------------------------------------- config


class ScoringTeacherConfig(TeacherConfig):
    """A teacher that scores the student's tokens; ``tokenizer``: its tokenizer (a directory or
    hub id), to check it against the student's; null: the model directory for ``hf``, unchecked
    for a server (a mixture needs it)."""

    tokenizer: str | None = None


class TeacherScoringConfig(StrictModel):
    """``train.objective.scoring``: the teacher(s) that score the student's text, as top-k.

    ``teacher``: one teacher of any backend (e.g. ``{backend: openai, model: demo_teacher,
    base_urls: [http://127.0.0.1:8000/v1]}``); ``teachers``: several, by name, with ``route_by``
    (a record field, ``meta.teacher``, naming each record's teacher) or ``mixture`` (a weight
    per teacher name: the positions' distributions are mixed). Neither: the job's live
    ``teacher`` model, scored in process as top-k. ``top_k``: log-probs per position (at most
    20 from ``distillery serve``). ``staleness``: 0 = each batch is sampled with the current
    weights and scored before its update; ``s`` > 0 = the samples of the next ``s`` batches are
    taken and scored while the current update runs (so up to ``s`` steps old).
    ``retry_for_s``: how long training waits, retrying, for a teacher that is down.
    """

    teacher: ScoringTeacherConfig | None = None
    teachers: dict[str, ScoringTeacherConfig] = Field(default_factory=dict)
    route_by: str | None = None
    mixture: dict[str, float] | None = None
    top_k: int = Field(20, ge=1)
    staleness: int = Field(0, ge=0, le=8)
    retry_for_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> TeacherScoringConfig:
        where = "train.objective.scoring"
        if self.teacher is not None and self.teachers:
            raise ValueError(f"{where}: give one teacher (teacher) or several (teachers), not both")
        if self.teachers and len(self.teachers) > 1 and (self.route_by is None) == (self.mixture is None):
            raise ValueError(f"{where}.teachers names {len(self.teachers)} teachers ({', '.join(self.teachers)}): "
                             "say how they share the work, route_by: meta.teacher (a record field naming "
                             "each record's teacher) or mixture: {name: weight, ...}, not both")
        if not self.teachers and (self.route_by is not None or self.mixture is not None):
            raise ValueError(f"{where}.route_by/mixture choose among named teachers: give {where}.teachers")
        if self.mixture is not None:
            if set(self.mixture) != set(self.teachers):
                raise ValueError(f"{where}.mixture weights teachers {sorted(self.mixture)} but "
                                 f"{where}.teachers names {sorted(self.teachers)}: give one weight per teacher")
            if any(w <= 0 for w in self.mixture.values()):
                raise ValueError(f"{where}.mixture weights must be > 0")
        return self

    @property
    def remote(self) -> bool:
        """Whether the scoring teachers are configured here (False: the job's live teacher)."""
        return self.teacher is not None or bool(self.teachers)

    def named(self) -> dict[str, ScoringTeacherConfig]:
        """The configured teachers by name (one ``teacher`` is named ``teacher``)."""
        return {"teacher": self.teacher} if self.teacher is not None else dict(self.teachers)

    def weights(self) -> dict[str, float]:
        """Mixture weights normalized to sum to 1 (empty without a mixture)."""
        if self.mixture is None:
            return {}
        total = sum(self.mixture.values())
        return {k: v / total for k, v in self.mixture.items()}


# --------------------------------------------------------------------------- scores


@dataclass
class ScoredSequence:
    """A teacher's view of one sequence of ``T`` tokens: ``top`` (ids/logprobs ``[T-1, k]``,
    log_tail ``[T-1]``; row ``t`` predicts token ``t + 1``) and ``token_logprobs`` ``[T-1]``
    (log p of the actual token ``t + 1``, float64)."""

    top: TeacherTopK
    token_logprobs: torch.Tensor


class Scorer(Protocol):
    name: str

    def score(self, sequences: list[list[int]], k: int) -> list[ScoredSequence]: ...


class ModelScorer:
    """A model in this process: one forward pass per chunk of sequences, under ``no_grad``."""

    def __init__(self, model: nn.Module, pad_id: int, name: str = "teacher", batch_size: int = 16) -> None:
        self.model, self.pad_id, self.name, self.batch_size = model, pad_id, name, batch_size

    @torch.no_grad()
    def score(self, sequences: list[list[int]], k: int) -> list[ScoredSequence]:
        """Top-k (and tail, in float64 as the logit cache) in the model's dtype; see module doc."""
        device = next(self.model.parameters()).device
        out: list[ScoredSequence] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, seq in enumerate(chunk):  # right padding: positions stay 0..T-1
                ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
            logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1]
            if k > logits.shape[-1]:
                raise ValueError(f"scoring top_k={k} exceeds teacher {self.name!r}'s vocabulary ({logits.shape[-1]})")
            log_z = logits.logsumexp(-1, keepdim=True)
            top, top_ids = logits.topk(k, dim=-1)
            top_lp = top - log_z
            tok_lp = (logits.gather(-1, ids[:, 1:, None].to(device)) - log_z)[..., 0].double()
            tail = teacher_log_tail(top_lp.double()).to(top_lp.dtype)
            for i, seq in enumerate(chunk):
                n = len(seq) - 1
                out.append(ScoredSequence(TeacherTopK(top_ids[i, :n].cpu(), top_lp[i, :n].cpu(), tail[i, :n].cpu()),
                                          tok_lp[i, :n].cpu()))
        return out


class ClientScorer:
    """A teacher backend with ``score_sequences`` (OpenAI-compatible servers) or ``logprobs``."""

    def __init__(self, teacher: Any, name: str) -> None:
        self.teacher, self.name = teacher, name

    def score(self, sequences: list[list[int]], k: int) -> list[ScoredSequence]:
        if hasattr(self.teacher, "score_sequences"):
            pairs = self.teacher.score_sequences(sequences, k)
            return [ScoredSequence(_rows(top, len(s) - 1), tok[1:len(s)]) for s, (top, tok) in zip(sequences, pairs)]
        tops = self.teacher.logprobs(sequences, k)
        return [ScoredSequence(_rows(top, len(s) - 1), _token_logprobs_from_topk(_rows(top, len(s) - 1), s))
                for s, top in zip(sequences, tops)]


def write_with_client(teacher: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                      top_p: float, eos_ids: list[int], seed: int = 0) -> list[list[int]]:
    """A server's continuations of token-id prompts (``continue_ids``), each ending with the end
    token when it stopped at one (servers may leave it out; the student must learn to stop)."""
    from distillery.teachers.base import SamplingParams

    if not hasattr(teacher, "continue_ids"):
        raise ConfigError(f"seq_kd: teacher {type(teacher).__name__} cannot continue token-id prompts (an "
                          "OpenAI-compatible server or an in-process model can): drop train.objective.seq_kd")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    out = []
    for ids, reason in teacher.continue_ids(prompts, params):
        if reason == "stop" and eos_ids and not (ids and ids[-1] in eos_ids):
            ids = [*ids, eos_ids[0]]
        out.append(ids)
    return out


def _rows(top: TeacherTopK, n: int) -> TeacherTopK:
    """The first ``n`` rows (a server adds a row for the token it generates after the prompt)."""
    tail = None if top.log_tail is None else top.log_tail[:n]
    return TeacherTopK(top.ids[:n], top.logprobs[:n], tail)


def _token_logprobs_from_topk(top: TeacherTopK, seq: list[int]) -> torch.Tensor:
    """log p of each actual next token where it is in the top-k, else NaN (unknown)."""
    nxt = torch.tensor(seq[1:], dtype=torch.long)[:, None]
    hit = top.ids == nxt
    lp = torch.where(hit, top.logprobs.double(), torch.full_like(top.logprobs, -math.inf, dtype=torch.float64))
    return torch.where(hit.any(-1), lp.max(-1).values, torch.full_like(lp[:, 0], math.nan))


def build_scorer(name: str, cfg: TeacherConfig) -> Scorer:
    """The scorer of one configured teacher (a local ``hf`` model is loaded here)."""
    from distillery.teachers import build_teacher

    teacher = build_teacher(cfg)
    model = getattr(teacher, "model", None)
    if isinstance(model, nn.Module):  # in process: one forward pass, no serialization
        tok = getattr(teacher, "tokenizer", None)
        return ModelScorer(model.eval(), getattr(tok, "pad_token_id", None) or 0, name, cfg.batch_size)
    if not (hasattr(teacher, "score_sequences") or hasattr(teacher, "logprobs")):
        raise ConfigError(f"scoring teacher {name!r} (backend {cfg.backend}) cannot return log-probs")
    return ClientScorer(teacher, name)


# --------------------------------------------------------------------------- several teachers


def mix_scores(parts: list[list[ScoredSequence]], weights: list[float], k: int) -> list[ScoredSequence]:
    """The weighted mixture ``Σ_i w_i p_i`` of several teachers' scores of the same sequences.

    At each position the union of the teachers' top-k ids is weighed; an id outside a teacher's
    top-k counts 0 for it (its mass stays in that teacher's tail), so the mixture's tail is
    ``Σ_i w_i tail_i`` plus what falls outside the mixture's own top ``k``. Exact when every
    teacher's top-k holds the ids the others list. Token log-probs mix exactly (float64).
    """
    out = []
    for per_teacher in zip(*parts):
        ids = torch.cat([s.top.ids for s in per_teacher], -1)  # [T-1, n·k]
        probs = torch.cat([w * s.top.logprobs.double().exp() for s, w in zip(per_teacher, weights)], -1)
        ids_sorted, order = ids.sort(-1)
        p_sorted = probs.gather(-1, order)
        first = torch.ones_like(ids_sorted, dtype=torch.bool)
        first[:, 1:] = ids_sorted[:, 1:] != ids_sorted[:, :-1]
        group = first.long().cumsum(-1) - 1  # equal ids → one group, summed
        summed = torch.zeros_like(p_sorted).scatter_add(-1, group, p_sorted)
        group_ids = torch.zeros_like(ids_sorted).scatter(-1, group, ids_sorted)
        present = torch.arange(ids.shape[-1]) < first.sum(-1, keepdim=True)
        top_p, pick = summed.masked_fill(~present, -1.0).topk(k, dim=-1)
        logprobs = top_p.clamp_min(1e-300).log()
        tok = torch.stack([w * s.token_logprobs.exp() for s, w in zip(per_teacher, weights)]).sum(0).log()
        dtype = per_teacher[0].top.logprobs.dtype
        out.append(ScoredSequence(TeacherTopK(group_ids.gather(-1, pick), logprobs.to(dtype),
                                              teacher_log_tail(logprobs).to(dtype)), tok))
    return out


class TeacherPanel:
    """The named scorers of a :class:`TeacherScoringConfig` and how they share the sequences.

    ``score(sequences, routes)`` returns the scores the loss uses and, per teacher, the scores
    it gave (``{name: {row: ScoredSequence}}``), for the loss per teacher. Teachers are called
    concurrently (a server's requests release the GIL).
    """

    def __init__(self, scorers: dict[str, Scorer], k: int, weights: dict[str, float] | None = None,
                 route_by: str | None = None) -> None:
        self.scorers, self.k, self.weights, self.route_by = scorers, k, weights or {}, route_by
        self.pool = ThreadPoolExecutor(max(1, len(scorers)), thread_name_prefix="teacher-scoring")

    @property
    def names(self) -> list[str]:
        return list(self.scorers)

    def score(self, sequences: list[list[int]], routes: list[str] | None = None
              ) -> tuple[list[ScoredSequence], dict[str, dict[int, ScoredSequence]]]:
        if self.route_by is not None:
            if routes is None or len(routes) != len(sequences):
                raise ValueError("routed scoring needs one teacher name per sequence")
            rows = {name: [i for i, r in enumerate(routes) if r == name] for name in self.scorers}
        else:
            rows = {name: list(range(len(sequences))) for name in self.scorers}
        futures = {name: self.pool.submit(self.scorers[name].score, [sequences[i] for i in idx], self.k)
                   for name, idx in rows.items() if idx}
        per: dict[str, dict[int, ScoredSequence]] = {
            name: dict(zip(rows[name], fut.result())) for name, fut in futures.items()}
        if self.weights:
            names = list(self.weights)
            mixed = mix_scores([[per[n][i] for i in range(len(sequences))] for n in names],
                               [self.weights[n] for n in names], self.k)
            return mixed, per
        merged: dict[int, ScoredSequence] = {}
        for scores in per.values():
            merged.update(scores)
        return [merged[i] for i in range(len(sequences))], per

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def build_panel(cfg: TeacherScoringConfig, live_teacher: nn.Module | None = None, pad_id: int = 0) -> TeacherPanel:
    """The panel of ``cfg``'s teachers, or of the job's live teacher (scored in process)."""
    if cfg.remote:
        scorers = {name: build_scorer(name, t) for name, t in cfg.named().items()}
    elif live_teacher is not None:
        scorers = {"teacher": ModelScorer(live_teacher, pad_id)}
    else:
        raise ConfigError("train.objective.scoring names no teacher and the job has no live teacher: set "
                          "train.objective.scoring.teacher (e.g. backend: openai, base_urls: [...]) or teacher")
    return TeacherPanel(scorers, cfg.top_k, cfg.weights(), cfg.route_by)


def check_scoring_tokenizers(cfg: TeacherScoringConfig, student_tok: Any) -> None:
    """Every scoring teacher whose tokenizer is known must share the student's (it scores the
    student's token ids); a mixture needs every teacher's tokenizer known. Errors name the teachers."""
    from distillery.models import load_tokenizer
    from distillery.models.vocab import compare_tokenizers

    where = "train.objective.scoring"
    unknown, differ = [], []
    for name, t in cfg.named().items():
        source = t.tokenizer or (t.model if t.backend in ("hf", "vllm") else None)
        if source is None:
            unknown.append(name)
            continue
        cmp = compare_tokenizers(load_tokenizer(source, trust_remote_code=t.trust_remote_code), student_tok)
        if cmp.kind == "different":
            differ.append(f"{name} ({cmp.reason})")
    if differ:
        raise ConfigError(f"{where}: teacher(s) {', '.join(differ)} have another tokenizer than the student: "
                          "the teachers score the student's token ids, so all must share its tokenizer")
    if cfg.mixture is not None and unknown:
        raise ConfigError(f"{where}.mixture mixes distributions over the same token ids, so every teacher needs "
                          f"a known tokenizer: set {', '.join(f'{where}.teachers.{n}.tokenizer' for n in unknown)} "
                          "(the directory or hub id of its tokenizer)")
