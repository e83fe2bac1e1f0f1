"""The ``reward`` objective: policy gradient with a group baseline (GRPO-style, arXiv 2402.03300).

Per batch of "messages" records, the student samples ``G = group_size`` completions of each
prompt (the tokens before the record's first trained position); every completion gets a
scalar reward from a :class:`RewardFn` (or, for ``teacher_logprob``, from the teacher model).
The advantage of completion i of a group is its reward minus the group's mean (divided by the
group's std with ``scale_rewards``), and the loss is the REINFORCE estimator, averaged over
completion tokens (the token-level mean of DAPO, arXiv 2503.14476):

    L = −(1/N) Σ_i Σ_t A_i · log π(o_i,t | q, o_i,<t)  +  β · (1/N) Σ_i Σ_t k3_i,t,   N = Σ_i |o_i|

with k3 = exp(ref − logp) − (ref − logp) − 1 against a frozen reference policy. Samples are
used for one gradient step only, so GRPO's ratio is 1 and its clipping never acts: the
gradient is exactly the one of this loss. See docs/training/reward.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distillery.config import ModelConfig, RewardConfig, TrainJobConfig
from distillery.elicit.engine import MalformedOutput
from distillery.elicit.feedback import parse_grade
from distillery.elicit.self_knowledge import verify_answer
from distillery.elicit.templates import builtin, render
from distillery.losses.forms import cross_entropy_per_token
from distillery.teachers import SamplingParams, Teacher, build_teacher
from distillery.train.data import IGNORE, Collator, tokenize_messages
from distillery.train.objectives import teacher_inputs
from distillery.train.reference import Reference, reference_for, reference_model
from distillery.train.sampling import (
    batch_prompts,
    continuation_batch,
    sample_continuations,
    unwrap,
)

JUDGE_MAX_SCORE = 10  # the shipped rubric grades 1..10; reward = (score − 1) / 9
ADV_EPS = 1e-4  # added to the group std before dividing (Dr.GRPO / TRL use the same order)


# --------------------------------------------------------------------------- reward sources


class RewardFn(Protocol):
    """Scores completions as text: one float per completion, higher is better.

    ``prompts[i]``, ``completions[i]`` and ``records[i]`` belong together (a prompt and its
    record repeat once per sample of its group). After each call ``metrics`` holds the
    source's own figures for that call (e.g. ``reward/judge_unparsed``).
    """

    metrics: dict[str, float]

    def score(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[float]: ...


def record_name(record: dict, index: int) -> str:
    return f"record {record['id']!r}" if record.get("id") is not None else f"record #{index}"


def record_reference(record: dict, index: int = 0) -> str:
    """The record's ``reference`` answer, or an error naming the record and the fix."""
    ref = record.get("reference")
    if ref is None or (isinstance(ref, str) and not ref.strip()):
        raise ValueError(
            f"{record_name(record, index)} has no 'reference': train.reward.source 'verifier' compares "
            "each completion's final answer with it; add reference to every record, or pick "
            "another train.reward.source (function, judge, teacher_logprob)")
    return str(ref)


class VerifierReward:
    """1.0 when the completion's final answer equals the record's ``reference``, else 0.0.

    The answer is read as the elicitation filters read it (``Final answer:``, ``\\boxed{}``,
    ``#N``, "the answer is N") and compared with :func:`~distillery.elicit.filters.answers_equivalent`
    (numbers, fractions, percentages, simple algebra). No answer counts as wrong.
    """

    def __init__(self, answer_pattern: str | None = None) -> None:
        self.answer_pattern = answer_pattern
        self.metrics: dict[str, float] = {}

    def score(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
        rewards, missing = [], 0
        for i, (completion, record) in enumerate(zip(completions, records, strict=True)):
            right, answer = verify_answer(completion, record_reference(record, i), self.answer_pattern)
            rewards.append(float(right))
            missing += answer is None
        self.metrics = {"reward/no_answer": missing / max(len(completions), 1)}
        return rewards


def import_callable(spec: str, key: str = "train.reward.function") -> Callable[..., Any]:
    """``module:callable`` (dotted attribute paths allowed after the colon), imported by name."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key} is {spec!r}: write it as 'module:callable', e.g. 'my_rewards:is_short'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{key}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{key}: {spec!r} is not callable")
    return obj


class FunctionReward:
    """A user's function ``fn(prompt, completion, record) -> float``, called once per completion."""

    def __init__(self, fn: Callable[[str, str, dict], float] | str) -> None:
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = import_callable(fn) if isinstance(fn, str) else fn
        self.metrics: dict[str, float] = {}

    def score(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
        rewards = []
        for prompt, completion, record in zip(prompts, completions, records, strict=True):
            value = self.fn(prompt, completion, record)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"reward function {self.name} returned {value!r}, not a number") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"reward function {self.name} returned {value} for {record_name(record, 0)}")
            rewards.append(value)
        return rewards


def judge_score_to_reward(text: str) -> float | None:
    """(score − 1)/9 for a grader's reply with a 1..10 score; None when it has none (or out of range).

    The reply is read by the feedback elicitation's parser (``Score: 7``, ``7/10``, JSON).
    """
    try:
        score, _ = parse_grade(text, JUDGE_MAX_SCORE)
    except MalformedOutput:
        return None
    return (float(score) - 1.0) / (JUDGE_MAX_SCORE - 1)


class JudgeReward:
    """A teacher backend grades each completion with a rubric; unparseable grades score 0.

    One ``teacher.generate`` call per batch (all ``batch × group_size`` gradings, greedy), so
    a remote teacher answers them concurrently. ``reward/judge_unparsed`` is the share of
    replies without a 1..10 score; the replies of the last call stay in ``last_replies``.
    """

    def __init__(self, teacher: Teacher, template: str | None = None, max_new_tokens: int = 128) -> None:
        self.teacher = teacher
        self.template = template or builtin("reward_judge")
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.metrics: dict[str, float] = {}
        self.last_replies: list[str] = []

    def requests(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[list[dict]]:
        """The grading conversations: one user turn each, the rendered rubric."""
        return [[{"role": "user", "content": render(
            self.template, "train.reward.judge_template", prompt=p, answer=c,
            reference=r.get("reference"), max_score=JUDGE_MAX_SCORE)}]
            for p, c, r in zip(prompts, completions, records, strict=True)]

    def score(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
        replies = self.teacher.generate(self.requests(prompts, completions, records), self.params)
        self.last_replies = [gens[0].text for gens in replies]
        parsed = [judge_score_to_reward(text) for text in self.last_replies]
        self.metrics = {"reward/judge_unparsed": sum(p is None for p in parsed) / max(len(parsed), 1)}
        return [0.0 if p is None else p for p in parsed]


class TeacherLogprobReward:
    """The teacher model's mean log-prob per completion token (temperature 1), under no_grad.

    Scores token ids, not text: teacher and student must share the tokenizer (as logit_kd).
    """

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    @torch.no_grad()
    def score_batch(self, batch: dict[str, torch.Tensor], teacher: nn.Module) -> list[float]:
        """Per row of a :func:`continuation_batch` ``[rows, seq]``: mean teacher log-prob of its labels."""
        vocab = unwrap(teacher).config.vocab_size
        if int(batch["input_ids"].max()) >= vocab:
            raise ValueError(f"the student's token ids exceed the teacher's vocabulary ({vocab}): "
                             "train.reward.source 'teacher_logprob' needs a shared tokenizer")
        logp, mask = token_logprobs(teacher, {**teacher_inputs(batch, teacher),
                                              "labels": batch["labels"]})
        mask = mask.to(logp.dtype)
        return ((logp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()


# --------------------------------------------------------------------------- the estimator


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """A = r − mean_group(r), ÷ (std_group(r) + 1e-4) with ``scale``; zero for a group of equal rewards.

    ``rewards`` ``[groups · group_size]``, grouped (``[g0s0, g0s1, ..., g1s0, ...]``); the std is
    the sample std (Bessel's correction, as TRL's GRPO). Returns the same shape and dtype.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + ADV_EPS)
    # a group whose rewards are all equal teaches nothing: exactly 0, not a rounding residue
    flat = (r == r[:, :1]).all(1, keepdim=True)
    return adv.masked_fill(flat, 0.0).view(-1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per sampled token: e^x − x − 1, x = ref − logp (≥ 0)."""
    x = ref_logp - logp
    return torch.expm1(x) - x  # expm1 keeps precision when the policies are close


def token_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_{t+1} | x_≤t) of every next token ``[rows, seq-1]`` and its mask (labels ≠ IGNORE).

    ``model`` sees ``input_ids``/``attention_mask`` ``[rows, seq]``; logits are divided by
    ``temperature`` (the distribution the samples were drawn from) and taken in float32 at least,
    at the labeled positions only (``[labeled tokens, vocab]``, not ``[rows, seq, vocab]``).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:].to(logits.device)
    mask = targets != IGNORE
    logp = logits.new_zeros(targets.shape, dtype=torch.promote_types(logits.dtype, torch.float32))
    logp[mask] = -cross_entropy_per_token(logits[mask] / temperature, targets[mask])
    return logp, mask


def policy_gradient_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``−Σ A_i·logp_i,t / N + β·Σ k3_i,t / N`` over the masked tokens (N of them); and the mean k3.

    ``logp``/``mask``/``ref_logp`` ``[rows, seq]``, ``advantages`` ``[rows]``.
    """
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1)
    loss = -(advantages.to(logp.dtype).unsqueeze(1) * logp * m).sum() / n
    kl = None
    if ref_logp is not None:
        kl = (k3(logp, ref_logp.to(logp.dtype)) * m).sum() / n
        loss = loss + kl_weight * kl
    return loss, kl


# --------------------------------------------------------------------------- data


class RewardDataset(torch.utils.data.Dataset):
    """"messages" records tokenized as SFT does, each kept with its record and prompt text.

    Items: ``input_ids``/``labels`` lists (the prompt is what precedes the first labeled token)
    and ``index`` into ``records``. ``prompts[i]`` is the content of the last message before
    the record's first assistant turn (the question a judge or function sees). With
    ``require_reference`` every record needs a ``reference``. Records with no assistant token
    left after truncation to ``max_len`` are dropped, as in SFT.
    """

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int,
                 require_reference: bool = False) -> None:
        self.records, self.prompts, self.items = [], [], []
        for i, record in enumerate(records):
            if require_reference:
                record_reference(record, i)
            item = tokenize_messages(record["messages"], tokenizer, max_len)
            if all(x == IGNORE for x in item["labels"]):
                continue
            item["index"] = len(self.records)
            self.items.append(item)
            self.records.append(record)
            self.prompts.append(_question(record["messages"]))
        if not self.items:
            raise ValueError("no record has an assistant token left after truncation to max_seq_len")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _question(messages: list[dict]) -> str:
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[first_answer - 1]["content"] if first_answer else ""


class RewardCollator(Collator):
    """The SFT collator plus ``index`` ``[batch]`` (long): which dataset record each row is.

    Records travel as indices, not lists, so the batch stays a dict of tensors that any
    device move or split handles.
    """

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- the objective


class RewardObjective:
    """Sample groups, score them, step along the group-baseline policy gradient (see module doc).

    ``reference``: the KL anchor, a :data:`~distillery.train.reference.Reference` (a frozen
    model, or ``"adapters_off"``: the peft student's base with adapters disabled), or None (no
    KL term). ``loss`` is a mean over the batch's completion tokens (``metrics["count"]``).
    """

    def __init__(self, cfg: RewardConfig, tokenizer: PreTrainedTokenizerBase, dataset: RewardDataset,
                 reward: RewardFn | TeacherLogprobReward, reference: Reference | None = None,
                 max_seq_len: int = 1 << 30) -> None:
        if cfg.kl_weight > 0 and reference is None:
            raise ValueError("train.reward.kl_weight > 0 needs a reference model")
        self.cfg, self.tokenizer, self.dataset, self.reward = cfg, tokenizer, dataset, reward
        self.max_seq_len = max_seq_len  # prompt + completion; nothing past it is generated or scored
        self.reference = reference if cfg.kl_weight > 0 else None
        self.needs_teacher = isinstance(reward, TeacherLogprobReward)
        self.trainable: list[nn.Module] = []

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
            if teacher is None:
                raise ValueError("train.reward.source 'teacher_logprob' needs a teacher model")
            return self.reward.score_batch(cbatch, teacher)
        texts = [self.tokenizer.decode([t for t in row if t != IGNORE], skip_special_tokens=True)
                 for row in cbatch["labels"].tolist()]
        prompts = [self.dataset.prompts[i] for i in index]
        records = [self.dataset.records[i] for i in index]
        return self.reward.score(prompts, texts, records)

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
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
            "count": float(n_tokens),
            **getattr(self.reward, "metrics", {}),
        }
        if kl is not None:
            metrics["kl"] = kl.item()
        return loss, {"loss": loss.item(), **metrics}

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
    return reference_for(student, cfg.reference_path, "train.reward.reference_path", model_cfg, vocab_size)


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
    rc = cfg.train.reward
    if cfg.train.packing:
        raise ValueError("train.packing is not supported by objective 'reward' (each prompt is sampled "
                         "and scored on its own): set train.packing: false")
    if rc.source == "teacher_logprob" and teacher is None:
        raise ValueError("train.reward.source is 'teacher_logprob' but no teacher model was given")
    dataset = RewardDataset(records, tokenizer, cfg.train.max_seq_len, require_reference=rc.source == "verifier")
    objective = RewardObjective(rc, tokenizer, dataset, build_reward_fn(rc),
                                build_reference(rc, student, cfg.model, len(tokenizer)), cfg.train.max_seq_len)
    return dataset, RewardCollator(tokenizer.pad_token_id), objective
