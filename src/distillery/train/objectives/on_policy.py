"""``on_policy``: distillation on text the student writes itself (GKD, MiniLLM-style, seq_kd).

Off-policy distillation (``logit_kd``) only shows the student text someone else wrote, so at
inference it meets prefixes of its own making that it never learned from (exposure bias).
GKD (arXiv 2306.13649) fixes that by mixing in the student's own samples: on each call, with
probability λ the student samples continuations of the batch's prompts and the teacher scores
them token by token; otherwise the continuation is the record's own (teacher-written) text, or
with ``seq_kd`` one the teacher generates now. MiniLLM (arXiv 2306.08543) trains reverse
KL(student‖teacher) on student samples; here that is the token-level form: λ = 1 and the
``reverse_kl`` divergence (MiniLLM's sequence-level policy gradient is not implemented).

The divergence is any :class:`~distillery.losses.LossSpec` (``dense`` or ``fused``; ``sparse``
needs a logit cache, and a cache cannot score text sampled during training).

With ``scoring`` the teacher may sit off the training machine, or be several teachers
(:class:`~distillery.teachers.scoring.TeacherScoringConfig`): each batch's sequences are scored
as top-k log-probs plus the tail mass (any backend: in process, or an OpenAI-compatible server
such as ``distillery serve``, vLLM, SGLang) and the loss takes the sparse form, the tail handled
as for a logit cache (:mod:`distillery.train.teacher_scores`). With ``scoring.staleness`` s > 0
the next s batches are sampled and scored while the student updates
(:mod:`distillery.train.scoring_queue`); the train log says how much scoring time was hidden. On on-policy
batches the CE term of the spec is dropped: CE on the student's own samples would only raise
the probability of whatever it happened to write, mistakes included. Gradients do not flow
through sampling (as in GKD): the samples are data, the divergence on them is the loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from distillery.config import ObjectiveConfig
from distillery.losses import LossSpec
from distillery.teachers.scoring import (
    ModelScorer,
    TeacherPanel,
    TeacherScoringConfig,
    build_panel,
    check_scoring_tokenizers,
    write_with_client,
)
from distillery.train.objectives.base import (
    BuildContext,
    LossOutput,
    ObjectiveNeeds,
    register_objective,
)
from distillery.train.objectives.logit_kd import check_loss_shorthand, live_kd_loss, loss_count
from distillery.train.objectives.sft import sft_data
from distillery.train.rollouts import RolloutConfig, RolloutEngine, RolloutParams, Rollouts
from distillery.train.sampling import (
    batch_prompts,
    continuation_batch,
    sample_continuations,
    unwrap,
)
from distillery.train.scoring_queue import BatchSchedule, ScoringQueue, Ticket
from distillery.train.teacher_scores import (
    ScoredLoss,
    routed_data,
    score_tensors,
    scored_spec,
    sequences,
)


class OnPolicyConfig(ObjectiveConfig):
    """``train.objective: {name: on_policy, ...}``: GKD (arXiv 2306.13649) and MiniLLM-style
    reverse KL on student samples.

    Each step, with probability ``lmbda`` the student samples the continuations of the batch's
    prompts and the teacher scores them token by token; otherwise the continuation is the
    record's own (teacher-written) text, or with ``seq_kd`` one the teacher generates now.
    ``temperature``/``top_p`` are the sampling's. The divergence is ``loss`` (default:
    generalized JSD, β = 0.5, as GKD; ``variant: minillm``: reverse KL(student‖teacher) and
    λ = 1), at ``loss.temperature``; ``kd_ratio`` adds ``(1 − kd_ratio)·CE`` off-policy.
    ``scoring``: the teacher(s) score as top-k, in process or remote (see the module doc);
    null: the job's live teacher, full logits. ``rollout``: the engine that writes the student's
    samples (:mod:`distillery.train.rollouts`; default ``hf``, its own ``generate``).
    """

    name: Literal["on_policy"] = "on_policy"
    variant: Literal["gkd", "minillm"] = "gkd"
    lmbda: float | None = Field(None, ge=0, le=1)  # null: 0.5 for gkd, 1.0 for minillm
    seq_kd: bool = False
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)  # sampling; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    kd_ratio: float | None = Field(None, ge=0, le=1)
    loss: LossSpec | None = None
    scoring: TeacherScoringConfig | None = None
    # which engine writes the student's samples (hf: its own generate; vllm: a synced copy)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)

    @model_validator(mode="after")
    def _one_way_to_say_the_loss(self) -> OnPolicyConfig:
        check_loss_shorthand(self.loss, self.kd_ratio, None)
        if self.seq_kd and self.scoring is not None and self.scoring.mixture is not None:
            raise ValueError("train.objective.seq_kd has a teacher write the off-policy continuations, and a "
                             "scoring.mixture names no one teacher to write them: use route_by, or drop seq_kd")
        return self

    def resolve_needs(self, declared: ObjectiveNeeds) -> ObjectiveNeeds:
        # teachers configured under scoring stand in for the job's live teacher
        if self.scoring is not None and self.scoring.remote:
            return ObjectiveNeeds(**{**declared.__dict__, "live_teacher": "no"})
        return declared

    @property
    def resolved_lmbda(self) -> float:
        if self.lmbda is not None:
            return self.lmbda
        return 1.0 if self.variant == "minillm" else 0.5

    def resolved_loss(self) -> LossSpec:
        """``loss`` as given, else GKD's JSD (β = 0.5) or MiniLLM's reverse KL, no CE unless kd_ratio."""
        if self.loss is not None:
            return self.loss
        div = {"divergence": "reverse_kl"} if self.variant == "minillm" else {"divergence": "jsd", "beta": 0.5}
        return LossSpec(**div, kd_ratio=self.kd_ratio, temperature=1.0)


class OnPolicyObjective:
    """GKD / MiniLLM-style / seq_kd distillation with a live teacher (see the module doc).

    ``eos_token_id`` (one id or several) ends a sampled continuation (the EOS is kept, so the
    student learns to stop); ``pad_token_id`` pads generation and the rebuilt batches. The
    on/off-policy coin comes from a ``random.Random`` seeded with ``cfg.seed``: runs with the
    same seed flip the same coins, and :meth:`state_dict` lets a resumed run continue them.
    """

    def __init__(self, cfg: OnPolicyConfig, eos_token_id: int | list[int] | None, pad_token_id: int, *,
                 max_seq_len: int, seed: int = 0, grad_accum_steps: int = 1,
                 engine: RolloutEngine | None = None) -> None:
        spec = cfg.resolved_loss()
        if spec.form == "sparse" and cfg.scoring is None:
            raise ValueError(
                "train.objective.loss.form 'sparse' reads teacher top-k from a logit cache, but on_policy "
                "needs a live teacher to score text sampled during training: use form 'dense' or 'fused' "
                "(or train.objective.scoring: the teacher's top-k)"
            )
        if pad_token_id is None:
            raise ValueError("on_policy needs a pad token id to batch sampled continuations "
                             "(the tokenizer's pad_token_id)")
        self.spec = spec
        self.on_policy_spec = _without_ce(spec)
        self.lmbda = cfg.resolved_lmbda
        self.seq_kd = cfg.seq_kd
        self.max_seq_len = max_seq_len
        self.max_new_tokens = cfg.max_new_tokens
        self.sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                         "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        self.rng = random.Random(seed)
        self.trainable: list[nn.Module] = []
        # the student's samples (``engine``: an engine instance instead of cfg.rollout's)
        self.rollouts = Rollouts(cfg.rollout, grad_accum_steps, engine)
        self.scoring = cfg.scoring
        self.panel: TeacherPanel | None = None
        self.queue: ScoringQueue | None = None
        self.schedule: BatchSchedule | None = None
        self._calls = 0  # loss calls so far (scoring): the BatchSchedule index of the next one
        self._pending: dict[int, _Prepared] = {}  # look-ahead batches, sampled and submitted

    def attach_scoring(self, panel: TeacherPanel, schedule: BatchSchedule | None = None) -> None:
        """Score with ``panel``; ``schedule`` predicts the next batches (needed for staleness > 0)."""
        assert self.scoring is not None
        self.panel, self.schedule = panel, schedule
        self.queue = ScoringQueue(lambda job: panel.score(*job), self.scoring.staleness + 1,
                                  self.scoring.retry_for_s)

    # ------------------------------------------------------------------ the coin and its state

    def draw_on_policy(self) -> bool:
        """Flip the next coin: True (probability λ) = the student writes this batch's continuations."""
        return self.rng.random() < self.lmbda

    def state_dict(self) -> dict:
        """The coin generator's state as JSON values (``random.Random.getstate`` with lists).

        With look-ahead batches pending, the state before their coins (a resumed run draws
        them again), and the number of loss calls made."""
        rng = self._pending[min(self._pending)].rng_before if self._pending else self.rng.getstate()
        version, internal, gauss_next = rng
        out: dict = {"rng": [version, list(internal), gauss_next]}
        if self.scoring is not None:
            out["calls"] = self._calls
        return out

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss_next = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss_next))
        self._calls, self._pending = int(state.get("calls", 0)), {}

    # ------------------------------------------------------------------ the loss

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
             ) -> LossOutput:
        """Divergence (and CE off-policy) on the continuations chosen by this call's coin.

        ``batch``: a collated "messages" batch (``input_ids``/``attention_mask``/``labels``
        ``[batch, seq]``, prompt tokens unlabeled). Metrics: ``loss``, ``kd/<divergence>``,
        ``ce`` (off-policy, when the spec has CE), ``on_policy``
        (1.0 / 0.0) and ``gen_tokens`` (mean generated length; 0 when nothing was generated).
        With ``scoring`` also ``scoring/*`` (see :meth:`ScoringQueue.metrics`) and, with
        several teachers, ``teacher/<name>/loss``.
        """
        self.rollouts.tick()
        if self.scoring is not None:
            return self._scored_loss(batch, student, teacher)
        if teacher is None:
            raise ValueError("on_policy needs a teacher model: it scores every continuation")
        _check_vocab(unwrap(student), unwrap(teacher))
        on_policy = self.draw_on_policy()
        gen_tokens = 0.0
        if on_policy or self.seq_kd:
            prompts = _prompts(batch)
            writer = student if on_policy else teacher
            continuations = self._sample(writer, prompts, by_student=on_policy)
            gen_tokens = sum(map(len, continuations)) / len(continuations)
            device = next(student.parameters()).device
            rebuilt = continuation_batch(prompts, continuations, self.sampling["pad_token_id"], self.max_seq_len)
            batch = {k: v.to(device) for k, v in rebuilt.items()}
        spec = self.on_policy_spec if on_policy else self.spec
        loss, metrics = live_kd_loss(spec, batch, student, teacher)
        metrics.update(on_policy=float(on_policy), gen_tokens=gen_tokens, **self.rollouts.metrics)
        return LossOutput(loss, loss_count(batch, spec), metrics)

    def _sample(self, model: nn.Module, prompts: list[list[int]], by_student: bool = False) -> list[list[int]]:
        """Continuations by ``model``; the student's go through the rollout engine (:mod:`distillery.train.rollouts`)."""
        # tokens past max_seq_len are cut from every row anyway: do not generate them
        room = self.max_seq_len - min(map(len, prompts))
        new_tokens = max(1, min(self.max_new_tokens, room))
        if by_student:
            params = RolloutParams(max_new_tokens=new_tokens, **self.sampling)
            return self.rollouts.sample(model, prompts, params, self.max_seq_len)
        return sample_continuations(model, prompts, max_new_tokens=new_tokens, **self.sampling)

    # ------------------------------------------------------------------ scored top-k (scoring)

    def _scored_loss(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
                     ) -> LossOutput:
        """The loss against the scorer's top-k; the next ``staleness`` batches are sampled and
        submitted first, so their scoring runs during this call's forward, backward and update."""
        if self.queue is None:  # built outside a job (tests): score with the teacher given here
            assert self.scoring is not None
            self.attach_scoring(build_panel(self.scoring, teacher, self.sampling["pad_token_id"]))
        call, self._calls = self._calls, self._calls + 1
        prepared = self._pending.pop(call, None)
        prefetched = prepared is not None and torch.equal(prepared.source, batch["input_ids"].cpu())
        if not prefetched:
            # not predicted (or another batch came): drop the look-ahead and its coins, sample now
            first = prepared or (self._pending[min(self._pending)] if self._pending else None)
            if first is not None:
                self.rng.setstate(first.rng_before)
            self._pending = {}
            prepared = self._prepare(batch, student, teacher)
        for ahead in range(call + 1, call + 1 + self.scoring.staleness):  # type: ignore[union-attr]
            if ahead in self._pending:
                continue
            nxt = self.schedule.batch(ahead) if self.schedule is not None else None
            if nxt is None:
                break
            self._pending[ahead] = self._prepare(nxt, student, teacher)
        out = self._loss_from_scores(prepared, student)
        out.metrics["scoring/prefetched"] = float(prefetched)
        return out

    def _prepare(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
                 ) -> _Prepared:
        """Flip the batch's coin, sample its continuations (if on-policy), submit them for scoring."""
        assert self.queue is not None and self.panel is not None
        rng_before = self.rng.getstate()
        on_policy = self.draw_on_policy()
        gen_tokens = 0.0
        rebuilt = {k: batch[k].cpu() for k in ("input_ids", "attention_mask", "labels")}
        if on_policy or self.seq_kd:
            prompts = _prompts(batch)
            if on_policy or teacher is not None:
                continuations = self._sample(student if on_policy else teacher, prompts, by_student=on_policy)
            else:  # seq_kd, the teacher(s) under scoring write
                continuations = self._teacher_writes(prompts, batch)
            gen_tokens = sum(map(len, continuations)) / len(continuations)
            rebuilt = continuation_batch(prompts, continuations, self.sampling["pad_token_id"], self.max_seq_len)
        routes = None
        if "route" in batch:
            routes = [self.panel.names[int(r)] for r in batch["route"]]
        ticket = self.queue.submit((sequences(rebuilt), routes))
        return _Prepared(batch["input_ids"].cpu(), rebuilt, on_policy, gen_tokens, routes, ticket, rng_before)

    def _teacher_writes(self, prompts: list[list[int]], batch: dict[str, torch.Tensor]) -> list[list[int]]:
        """seq_kd continuations from the scoring teachers: each row's (routed) teacher writes it."""
        assert self.panel is not None
        names = self.panel.names
        routes = [names[int(r)] for r in batch["route"]] if "route" in batch else [names[0]] * len(prompts)
        room = max(1, min(self.max_new_tokens, self.max_seq_len - min(map(len, prompts))))
        eos = self.sampling["eos_token_id"]
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        out: list[list[int]] = [[] for _ in prompts]
        for name in names:
            rows = [i for i, r in enumerate(routes) if r == name]
            if not rows:
                continue
            scorer, mine = self.panel.scorers[name], [prompts[i] for i in rows]
            if isinstance(scorer, ModelScorer):
                conts = self._sample(scorer.model, mine)
            else:
                conts = write_with_client(getattr(scorer, "teacher", None), mine, room, self.sampling["temperature"],
                                          self.sampling["top_p"], eos_ids, seed=self._calls)
            for i, c in zip(rows, conts):
                out[i] = c
        return out

    def _loss_from_scores(self, prepared: _Prepared, student: nn.Module) -> LossOutput:
        assert self.queue is not None and self.panel is not None and self.scoring is not None
        scores, per = self.queue.result(prepared.ticket)
        device = next(student.parameters()).device
        batch = {k: v.to(device) for k, v in prepared.batch.items()}
        vocab, k, names = unwrap(student).config.vocab_size, self.scoring.top_k, self.panel.names
        teacher_names = prepared.routes or [names[0] if len(names) == 1 else "mixture"] * len(scores)
        tensors = score_tensors(batch, scores, k, vocab, teacher_names)
        per_teacher: dict = {}
        if len(names) > 1 and prepared.routes is not None:
            per_teacher = {n: torch.tensor([r == n for r in prepared.routes]) for n in names}
        elif len(names) > 1:
            per_teacher = {n: score_tensors(batch, [per[n][i] for i in range(len(scores))], k, vocab, [n] * len(scores))
                           for n in names}
        spec = scored_spec(self.on_policy_spec if prepared.on_policy else self.spec)
        loss, metrics = ScoredLoss(spec)(batch, student, tensors, per_teacher)
        metrics.update(on_policy=float(prepared.on_policy), gen_tokens=prepared.gen_tokens,
                       **self.queue.metrics(prepared.ticket), **self.rollouts.metrics)
        return LossOutput(loss, loss_count(batch, spec), metrics)


@dataclass
class _Prepared:
    """A batch sampled and submitted for scoring: the loop's ``input_ids`` it came from, the
    scored batch, its coin and generated length, each row's teacher, and the coin state before it."""

    source: torch.Tensor
    batch: dict[str, torch.Tensor]
    on_policy: bool
    gen_tokens: float
    routes: list[str] | None
    ticket: Ticket
    rng_before: tuple


def _without_ce(spec: LossSpec) -> LossSpec:
    """``spec`` with its CE weight set to 0 and its divergence weights unchanged."""
    if spec.kd_ratio is not None:
        return spec.model_copy(update={"kd_ratio": None, "kd_weight": spec.kd_ratio, "ce_weight": 0.0})
    return spec.model_copy(update={"ce_weight": 0.0})


def _prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    prompts = batch_prompts(batch)
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(
                f"on_policy: batch row {row} has no prompt tokens (its first token is already a "
                "trained assistant token): the student continues a prompt, so every record needs "
                "a user (or system) turn before the assistant's"
            )
    return prompts


def _check_vocab(student: nn.Module, teacher: nn.Module) -> None:
    # checked before any sampling: a mismatch would otherwise surface only after generation
    s_vocab, t_vocab = student.config.vocab_size, teacher.config.vocab_size
    if s_vocab != t_vocab:
        raise ValueError(
            f"on_policy: teacher vocabulary ({t_vocab}) differs from the student's ({s_vocab}): the "
            "teacher scores the student's tokens, so both need the same tokenizer (give the "
            "student tokenizer.path: <teacher dir>)"
        )


def build(ctx: BuildContext) -> tuple[Dataset, Callable, OnPolicyObjective]:
    """The records' batches (their prompts are continued); eos/pad from the tokenizer or model."""
    model_cfg = unwrap(ctx.student).config
    tok = ctx.tokenizer
    eos = getattr(tok, "eos_token_id", None) or getattr(model_cfg, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else getattr(model_cfg, "pad_token_id", None)
    if eos is None or pad is None:
        raise ValueError("on_policy samples continuations and needs the tokenizer's eos and pad tokens")
    objective = OnPolicyObjective(ctx.config, eos_token_id=eos, pad_token_id=pad,
                                  max_seq_len=ctx.train.max_seq_len, seed=ctx.train.seed,
                                  grad_accum_steps=ctx.train.grad_accum_steps)
    if ctx.config.rollout.engine != "hf":  # a missing vllm / GPU fails here, not at the first rollout
        objective.rollouts.start(ctx.student, ctx.train.max_seq_len)
    scoring: TeacherScoringConfig | None = ctx.config.scoring
    if scoring is None:
        return (*sft_data(ctx), objective)
    if scoring.remote:
        check_scoring_tokenizers(scoring, tok)
    panel = build_panel(scoring, ctx.teacher, pad)
    if scoring.route_by is not None:
        dataset, collate = routed_data(ctx.records, tok, ctx.train.max_seq_len, scoring.route_by, panel.names)
    else:
        dataset, collate = sft_data(ctx)
    objective.attach_scoring(panel, BatchSchedule(dataset, collate, ctx.train))
    return dataset, collate, objective


register_objective("on_policy", OnPolicyConfig, ObjectiveNeeds(live_teacher="required", samples=True), build)
