"""The ``reward`` objective's parts (rewards, datasets, the estimator; the objective itself is
:mod:`distillery.train.objectives.reward`): policy gradient with a group baseline (GRPO-style,
arXiv 2402.03300).

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

from distillery.answers import GradeItem, build_grader
from distillery.chat import IGNORE, builtin, render
from distillery.config import ConfigError
from distillery.losses.forms import cross_entropy_per_token
from distillery.models.vocab import VocabMismatchError
from distillery.records import RecordError
from distillery.teachers import SamplingParams, Teacher
from distillery.teachers.phases import MalformedOutput
from distillery.teachers.replies import parse_grade
from distillery.train.data import Collator, tokenize_records
from distillery.train.sampling import unwrap
from distillery.train.targets import teacher_inputs

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
        raise RecordError(
            f"{record_name(record, index)} has no 'reference': train.objective.source 'verifier' compares "
            "each completion's final answer with it; add reference to every record, or pick "
            "another train.objective.source (function, judge, teacher_logprob)")
    return str(ref)


class VerifierReward:
    """1.0 when the completion's final answer equals the record's ``reference``, else 0.0.

    Graded by :mod:`distillery.answers` (the verify filter's grader: ``symbolic``, i.e. numbers,
    fractions, percentages, simple algebra). No answer counts as wrong.
    """

    def __init__(self, answer_pattern: str | None = None) -> None:
        self.answer_pattern = answer_pattern
        self.metrics: dict[str, float] = {}

    def score(self, prompts: list[str], completions: list[str], records: list[dict]) -> list[float]:
        rewards, missing = [], 0
        grader = build_grader("symbolic", answer_pattern=self.answer_pattern)
        for i, (completion, record) in enumerate(zip(completions, records, strict=True)):
            result = grader.grade(GradeItem(completion, record_reference(record, i)))
            rewards.append(float(result.correct))
            missing += result.answer is None
        self.metrics = {"reward/no_answer": missing / max(len(completions), 1)}
        return rewards


def import_callable(spec: str, key: str = "train.objective.function") -> Callable[..., Any]:
    """``module:callable`` (dotted attribute paths allowed after the colon), imported by name."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key} is {spec!r}: write it as 'module:callable', e.g. 'my_rewards:is_short'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {spec!r} is not callable")
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
            self.template, "train.objective.judge_template", prompt=p, answer=c,
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
            raise VocabMismatchError(f"the student's token ids exceed the teacher's vocabulary ({vocab}): "
                                     "train.objective.source 'teacher_logprob' needs a shared tokenizer")
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
        if require_reference:
            for i, record in enumerate(records):
                record_reference(record, i)
        items, kept = tokenize_records(records, tokenizer, max_len)
        for item, i in zip(items, kept):
            item["index"] = len(self.records)
            self.items.append(item)
            self.records.append(records[i])
            self.prompts.append(_question(records[i]["messages"]))

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
