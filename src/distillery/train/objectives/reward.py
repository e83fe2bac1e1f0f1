"""``reward``: policy gradient with a group baseline (GRPO-style, arXiv 2402.03300).

The rewards, datasets and the estimator are in :mod:`distillery.train.reward` (see its module
doc for the loss); this module holds the config, the objective and its build.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from distillery.chat import IGNORE
from distillery.config import ModelConfig, ObjectiveConfig, TeacherConfig, TrainJobConfig
from distillery.teachers import build_teacher
from distillery.teachers.scoring import (
    TeacherPanel,
    TeacherScoringConfig,
    build_panel,
    check_scoring_tokenizers,
)
from distillery.train.objectives.base import (
    BuildContext,
    LossOutput,
    ObjectiveNeeds,
    register_objective,
)
from distillery.train.reference import Reference, reference_for, reference_model
from distillery.train.reward import (
    FunctionReward,
    JudgeReward,
    RewardCollator,
    RewardDataset,
    RewardFn,
    TeacherLogprobReward,
    VerifierReward,
    group_advantages,
    policy_gradient_loss,
    record_name,
    token_logprobs,
)
from distillery.train.sampling import (
    batch_prompts,
    continuation_batch,
    sample_continuations,
    unwrap,
)
from distillery.train.teacher_scores import mean_token_logprobs, record_routes, sequences


class RewardConfig(ObjectiveConfig):
    """``train.objective: {name: reward, ...}``: GRPO-style policy gradient on sampled groups.

    For each prompt the student samples ``group_size`` completions; each gets a reward from
    ``source``: ``verifier`` (the final answer against the record's ``reference``),
    ``teacher_logprob`` (the teacher model's mean log-prob of the completion), ``judge`` (a
    teacher backend grades it with ``judge_template``) or ``function`` (``module:callable``
    called as ``fn(prompt, completion, record) -> float``). Advantages are rewards minus the
    group mean (divided by the group std with ``scale_rewards``). ``scoring`` (with
    ``teacher_logprob``): the teacher(s) that give the log-probs, any backend, e.g. a server
    (:class:`~distillery.teachers.scoring.TeacherScoringConfig`; ``route_by`` a record field
    picks each record's teacher); null: the job's live teacher model.
    """

    name: Literal["reward"] = "reward"
    source: Literal["verifier", "teacher_logprob", "judge", "function"] = "verifier"
    function: str | None = None
    judge: TeacherConfig | None = None
    judge_template: str | None = None  # Jinja2 text or @file; null: the shipped rubric
    group_size: int = Field(4, ge=2)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    scale_rewards: bool = True
    kl_weight: float = Field(0.0, ge=0)  # β·KL(student‖reference), k3 estimator
    reference_path: str | None = None  # the KL anchor; null: the student as training starts
    scoring: TeacherScoringConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.scoring is not None and self.source != "teacher_logprob":
            raise ValueError("train.objective.scoring gives the teacher of source 'teacher_logprob'; "
                             f"source is {self.source!r}: drop scoring")
        if self.source == "function" and not self.function:
            raise ValueError("train.objective.source is 'function': set train.objective.function to "
                             "'module:callable'")
        if self.source == "judge" and self.judge is None:
            raise ValueError("train.objective.source is 'judge': set train.objective.judge (a teacher backend)")
        return self

    def resolve_needs(self, declared: ObjectiveNeeds) -> ObjectiveNeeds:
        # only the teacher_logprob source reads the teacher model
        teacher = "required" if self.source == "teacher_logprob" else "no"
        if self.scoring is not None and self.scoring.remote:
            teacher = "no"  # the scoring teachers stand in for the job's
        return ObjectiveNeeds(**{**declared.__dict__, "live_teacher": teacher})


# --------------------------------------------------------------------------- the objective


class RewardObjective:
    """Sample groups, score them, step along the group-baseline policy gradient (see module doc).

    ``reference``: the KL anchor, a :data:`~distillery.train.reference.Reference` (a frozen
    model, or ``"adapters_off"``: the peft student's base with adapters disabled), or None (no
    KL term). ``loss`` is a mean over the batch's completion tokens (the output's ``count``).
    """

    def __init__(self, cfg: RewardConfig, tokenizer: PreTrainedTokenizerBase, dataset: RewardDataset,
                 reward: RewardFn | TeacherLogprobReward, reference: Reference | None = None,
                 max_seq_len: int = 1 << 30) -> None:
        if cfg.kl_weight > 0 and reference is None:
            raise ValueError("train.objective.kl_weight > 0 needs a reference model")
        self.cfg, self.tokenizer, self.dataset, self.reward = cfg, tokenizer, dataset, reward
        self.max_seq_len = max_seq_len  # prompt + completion; nothing past it is generated or scored
        self.reference = reference if cfg.kl_weight > 0 else None
        self.trainable: list[nn.Module] = []
        self.panel: TeacherPanel | None = None  # scoring: the teacher(s) that give teacher_logprob

    def rollout(self, batch: dict[str, torch.Tensor], student: nn.Module) -> tuple[dict, list[int]]:
        """``group_size`` sampled completions per prompt as a continuation batch, and their record indices.

        Each row is cut at ``max_seq_len`` before it is scored, so what is scored is what is trained.
        """
        prompts = batch_prompts(batch)
        for row, prompt in enumerate(prompts):
            if not prompt:
                name = record_name(self.dataset.records[int(batch["index"][row])], int(batch["index"][row]))
                raise ValueError(f"reward: {name} has no prompt tokens before its first assistant token; "
                                 "the student continues a prompt, so give it a user (or system) turn first")
        g = self.cfg.group_size
        room = self.max_seq_len - min(map(len, prompts))
        conts = sample_continuations(
            student, prompts, max_new_tokens=max(1, min(self.cfg.max_new_tokens, room)),
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, num_return_sequences=g)
        rows = [p for p in prompts for _ in range(g)]
        conts = [c[: max(1, self.max_seq_len - len(p))] for p, c in zip(rows, conts)]
        index = [int(i) for i in batch["index"] for _ in range(g)]
        return continuation_batch(rows, conts, self.tokenizer.pad_token_id), index

    def rewards(self, cbatch: dict[str, torch.Tensor], index: list[int], teacher: nn.Module | None) -> list[float]:
        """One reward per row of ``cbatch``; ``index`` = the dataset record of each row."""
        if isinstance(self.reward, TeacherLogprobReward):
            if self.cfg.scoring is not None:
                return self.scored_rewards(cbatch, index, teacher)
            if teacher is None:
                raise ValueError("train.objective.source 'teacher_logprob' needs a teacher model")
            return self.reward.score_batch(cbatch, teacher)
        texts = [self.tokenizer.decode([t for t in row if t != IGNORE], skip_special_tokens=True)
                 for row in cbatch["labels"].tolist()]
        prompts = [self.dataset.prompts[i] for i in index]
        records = [self.dataset.records[i] for i in index]
        return self.reward.score(prompts, texts, records)

    def scored_rewards(self, cbatch: dict[str, torch.Tensor], index: list[int], teacher: nn.Module | None
                       ) -> list[float]:
        """``teacher_logprob`` from the scoring teacher(s): each row's mean log-prob of its labels."""
        scoring = self.cfg.scoring
        assert scoring is not None
        if self.panel is None:
            self.panel = build_panel(scoring, teacher, self.tokenizer.pad_token_id)
        routes = None
        if scoring.route_by is not None:
            names = self.panel.names
            routes = [names[r] for r in record_routes([self.dataset.records[i] for i in index],
                                                      scoring.route_by, names)]
        scores, _ = self.panel.score(sequences(cbatch), routes)
        return mean_token_logprobs(cbatch, scores, routes)

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
             ) -> LossOutput:
        cbatch, index = self.rollout(batch, student)
        rewards = torch.tensor(self.rewards(cbatch, index, teacher), dtype=torch.float64)
        adv = group_advantages(rewards, self.cfg.group_size, self.cfg.scale_rewards)
        device = next(unwrap(student).parameters()).device
        cbatch = {k: v.to(device) for k, v in cbatch.items()}
        # the reference first: an adapters-off pass must not interleave with the policy's graph
        ref_logp = self.reference_logprobs(cbatch, student) if self.reference is not None else None
        logp, mask = token_logprobs(student, cbatch, self.cfg.temperature)
        loss, kl = policy_gradient_loss(logp, mask, adv.to(device), ref_logp, self.cfg.kl_weight)
        groups = rewards.view(-1, self.cfg.group_size)
        n_tokens = int(mask.sum())
        metrics = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std(correction=0).item(),
            "reward/zero_std_groups": (groups == groups[:, :1]).all(1).double().mean().item(),
            "gen_tokens": n_tokens / len(rewards),
            **getattr(self.reward, "metrics", {}),
        }
        if kl is not None:
            metrics["kl"] = kl.item()
        return LossOutput(loss, float(n_tokens), metrics)

    @torch.no_grad()
    def reference_logprobs(self, cbatch: dict[str, torch.Tensor], student: nn.Module) -> torch.Tensor:
        """log π_ref of the sampled tokens ``[rows, seq-1]`` (same temperature as the policy)."""
        ref = self.reference
        device = cbatch["input_ids"].device
        if isinstance(ref, nn.Module) and next(ref.parameters()).device != device:
            ref.to(device)  # the loop may move the student after we copied it
        # adapters off: the unwrapped peft model runs the forward, not a DDP wrapper around it
        with reference_model(ref, unwrap(student)) as model:
            return token_logprobs(model, cbatch, self.cfg.temperature)[0]


# --------------------------------------------------------------------------- wiring


def build_reward_fn(cfg: RewardConfig) -> RewardFn | TeacherLogprobReward:
    """The reward source ``cfg.source`` names (a judge backend is started here)."""
    if cfg.source == "verifier":
        return VerifierReward()
    if cfg.source == "function":
        assert cfg.function is not None
        return FunctionReward(cfg.function)
    if cfg.source == "judge":
        assert cfg.judge is not None
        return JudgeReward(build_teacher(cfg.judge), cfg.judge_template)
    return TeacherLogprobReward()


def build_reference(cfg: RewardConfig, student: nn.Module, model_cfg: ModelConfig,
                    vocab_size: int) -> Reference | None:
    """The KL anchor (None without a KL term): ``reference_path`` on the student's device, the peft
    student's base (:data:`~distillery.train.reference.ADAPTERS_OFF`), or a frozen copy."""
    if cfg.kl_weight == 0:
        return None
    return reference_for(student, cfg.reference_path, "train.objective.reference_path", model_cfg, vocab_size)


def prepare_reward_training(
    cfg: TrainJobConfig,
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    student: nn.Module,
    teacher: nn.Module | None = None,
) -> tuple[RewardDataset, RewardCollator, RewardObjective]:
    """Dataset, collator and objective of ``train.objective: reward`` (call before training starts).

    ``teacher``: the live teacher model (``source: teacher_logprob`` only). The KL reference,
    when ``kl_weight > 0``, is taken from ``student`` now, as it starts.
    """
    rc = cfg.train.objective
    if cfg.train.packing:
        raise ValueError("train.packing is not supported by objective 'reward' (each prompt is sampled "
                         "and scored on its own): set train.packing: false")
    if rc.source == "teacher_logprob" and teacher is None and (rc.scoring is None or not rc.scoring.remote):
        raise ValueError("train.objective.source is 'teacher_logprob' but no teacher model was given")
    dataset = RewardDataset(records, tokenizer, cfg.train.max_seq_len, require_reference=rc.source == "verifier")
    objective = RewardObjective(rc, tokenizer, dataset, build_reward_fn(rc),
                                build_reference(rc, student, cfg.model, len(tokenizer)), cfg.train.max_seq_len)
    if rc.scoring is not None:
        if rc.scoring.remote:
            check_scoring_tokenizers(rc.scoring, tokenizer)
        if rc.scoring.route_by is not None:  # every record names a configured teacher, checked now
            record_routes(records, rc.scoring.route_by, list(rc.scoring.named()))
        objective.panel = build_panel(rc.scoring, teacher, tokenizer.pad_token_id)
    return dataset, RewardCollator(tokenizer.pad_token_id), objective


def build(ctx: BuildContext) -> tuple[Dataset, Callable, RewardObjective]:
    return prepare_reward_training(ctx.job, ctx.records, ctx.tokenizer, ctx.student, ctx.teacher)


register_objective("reward", RewardConfig, ObjectiveNeeds(live_teacher="optional", samples=True), build)
