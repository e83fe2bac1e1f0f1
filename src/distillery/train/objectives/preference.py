"""``preference``: DPO, IPO and SimPO on ``prompt/chosen/rejected`` records (teacher feedback).

The records, batches, sequence log-probs and reference scorers are in
:mod:`distillery.train.preference`; this module holds the config, the pair losses' wiring,
the objective and its build.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from distillery.config import ObjectiveConfig, TrainConfig, TrainJobConfig
from distillery.train.objectives.base import (
    BuildContext,
    LossOutput,
    ObjectiveNeeds,
    register_objective,
)
from distillery.train.preference import (
    AdapterOffReference,
    ModelReference,
    PreferenceCollator,
    PreferenceDataset,
    ReferenceScorer,
    dpo_loss,
    ipo_loss,
    precompute_reference_logps,
    sequence_logps,
    simpo_loss,
    validate_preference_records,
)
from distillery.train.reference import reference_for

console = Console(stderr=True)


class PreferenceConfig(ObjectiveConfig):
    """``train.objective: {name: preference, ...}``: ranking losses on preference records.

    ``dpo`` (arXiv 2305.18290), ``ipo`` (arXiv 2310.12036) and ``simpo`` (arXiv 2405.14734,
    reference-free, length-normalized, margin ``simpo_gamma``). The reference model of dpo/ipo
    is the student as training starts (with LoRA: the base model, adapters off) or
    ``reference_path``; ``reference: precompute`` scores every record with it once before
    training and frees it, ``live`` keeps it in memory and scores each batch.
    """

    name: Literal["preference"] = "preference"
    loss: Literal["dpo", "ipo", "simpo"] = "dpo"
    beta: float | None = Field(None, gt=0)  # null: 0.1 for dpo/ipo, 2.0 for simpo
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # conservative DPO
    simpo_gamma: float = Field(0.5, ge=0)
    reference: Literal["precompute", "live"] = "precompute"
    reference_path: str | None = None
    sft_weight: float = Field(0.0, ge=0)  # + NLL of the chosen response (RPO)

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return 2.0 if self.loss == "simpo" else 0.1


def pair_losses(cfg: PreferenceConfig, logps: torch.Tensor, tokens: torch.Tensor,
                ref_logps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards of each side, all ``[B]``.

    ``logps``/``tokens``/``ref_logps`` are ``[2B]`` (chosen rows first). Rewards are
    ``β·(π − r)`` for dpo/ipo and ``β·π/|y|`` for simpo.
    """
    beta = cfg.resolved_beta
    pc, pr = logps.chunk(2)
    nc, nr = tokens.chunk(2)
    if cfg.loss == "simpo":
        losses = simpo_loss(pc, pr, nc, nr, beta, cfg.simpo_gamma, cfg.label_smoothing)
        return losses, beta * pc / nc.clamp(min=1), beta * pr / nr.clamp(min=1)
    if ref_logps is None:
        raise ValueError(f"{cfg.loss} needs reference log-probs: build the objective with "
                         "prepare_preference_training (precomputed or live reference)")
    rc, rr = ref_logps.chunk(2)
    lc, lr = pc - rc, pr - rr
    if cfg.loss == "ipo":
        losses = ipo_loss(lc, lr, nc, nr, beta)
    else:
        losses = dpo_loss(lc, lr, beta, cfg.label_smoothing)
    return losses, beta * lc, beta * lr


# --------------------------------------------------------------------------- objective


class PreferenceObjective:
    """``mean over pairs of [pair loss + sft_weight · NLL(chosen)/|c|]``; see the module doc.

    Reference log-probs come from the batch (``ref_chosen_logps``/``ref_rejected_logps``,
    precomputed) or from ``reference`` (live); simpo needs neither. Metrics: ``loss``,
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (means over pairs),
    ``rewards/accuracy`` (share of pairs with margin > 0), ``logps/chosen``,
    ``logps/rejected`` (summed response log-probs) and ``nll`` (with ``sft_weight``); the
    count is the number of pairs.
    """

    def __init__(self, cfg: PreferenceConfig, reference: ReferenceScorer | None = None) -> None:
        self.cfg = cfg
        self.reference = reference
        self.trainable: list[nn.Module] = []

    def _reference_logps(self, batch: dict[str, torch.Tensor], student: nn.Module) -> torch.Tensor | None:
        if self.cfg.loss == "simpo":
            return None
        if "ref_chosen_logps" in batch:
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
        if self.reference is None:
            return None
        return self.reference(batch, student)

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module,
             teacher: nn.Module | None = None) -> LossOutput:
        # the reference first: the adapters-off pass must not interleave with the policy's graph
        ref = self._reference_logps(batch, student)
        logps, tokens = sequence_logps(student, batch["input_ids"], batch["attention_mask"], batch["labels"])
        losses, chosen, rejected = pair_losses(self.cfg, logps, tokens, ref)
        pc, pr = logps.detach().chunk(2)
        metrics: dict[str, float] = {}
        if self.cfg.sft_weight:
            nll = -(logps.chunk(2)[0] / tokens.chunk(2)[0].clamp(min=1))
            losses = losses + self.cfg.sft_weight * nll
            metrics["nll"] = nll.mean().item()
        loss = losses.mean()
        margin = (chosen - rejected).detach()
        metrics.update({
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(), "rewards/margin": margin.mean().item(),
            "rewards/accuracy": (margin > 0).float().mean().item(),
            "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item(),
        })
        return LossOutput(loss, float(len(losses)), metrics)


# --------------------------------------------------------------------------- wiring


def _check(train: TrainConfig) -> None:
    pref = train.objective
    if pref.loss == "ipo" and pref.label_smoothing:
        raise ValueError("train.objective.label_smoothing applies to dpo and simpo (a flipped-label "
                         "logistic loss); ipo's squared loss has none: set it to 0")
    if train.packing:
        raise ValueError("train.packing is not supported by objective 'preference' (each pair is two "
                         "rows scored side by side): set train.packing: false")


def build_reference(cfg: TrainJobConfig | TrainConfig, student: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    copy_student: bool) -> ReferenceScorer:
    """The dpo/ipo reference: ``reference_path`` if set, else the student as it starts.

    The student as it starts is, for a peft (LoRA) student, the student with adapters off;
    otherwise a frozen deep copy (``copy_student``, for a live reference that must not move
    while the student trains) or the student itself (a precompute pass before step 1).
    """
    train = cfg.train if isinstance(cfg, TrainJobConfig) else cfg
    model_cfg = cfg.model if isinstance(cfg, TrainJobConfig) else None
    ref = reference_for(student, train.objective.reference_path, "train.objective.reference_path",
                        model_cfg, len(tokenizer), copy_student=copy_student)
    return ModelReference(ref) if isinstance(ref, nn.Module) else AdapterOffReference()


def prepare_preference_training(
    cfg: TrainJobConfig | TrainConfig, records: list[dict], tokenizer: PreTrainedTokenizerBase,
    student: nn.Module, *, source: str | None = None, show_progress: bool = True,
) -> tuple[PreferenceDataset, PreferenceCollator, PreferenceObjective]:
    """Validate and tokenize preference records and set up the reference; returns what
    :func:`~distillery.train.loop.train_loop` takes: ``(dataset, collator, objective)``.

    Call it with the student as training starts (LoRA already applied, before any checkpoint
    weights are loaded into it). ``reference: precompute`` scores every pair with the
    reference now, stores the log-probs in the dataset items and frees the reference;
    ``live`` keeps it for the objective to score each batch. ``source`` names the records in
    errors (default: ``data.path`` of a job config).
    """
    train = cfg.train if isinstance(cfg, TrainJobConfig) else cfg
    pref = train.objective
    _check(train)
    if source is None:
        source = cfg.data.path if isinstance(cfg, TrainJobConfig) and cfg.data.path else "preference records"
    validate_preference_records(records, source)
    dataset = PreferenceDataset(records, tokenizer, train.max_seq_len)
    if dataset.dropped:
        console.print(f"preference: dropped {dataset.dropped} of {len(records)} pairs with no response "
                      f"token left after truncation to train.max_seq_len ({train.max_seq_len})")
    collator = PreferenceCollator(tokenizer.pad_token_id)
    reference = None
    if pref.loss != "simpo":
        reference = build_reference(cfg, student, tokenizer, copy_student=pref.reference == "live")
        if pref.reference == "precompute":
            batch_pairs = max(1, train.batch_size // train.grad_accum_steps)
            precompute_reference_logps(dataset, reference, student, tokenizer.pad_token_id,
                                       batch_pairs, show_progress)
            reference = None  # a loaded reference_path model is freed here
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return dataset, collator, PreferenceObjective(pref, reference)


def build(ctx: BuildContext) -> tuple[Dataset, Callable, PreferenceObjective]:
    return prepare_preference_training(ctx.job, ctx.records, ctx.tokenizer, ctx.student,
                                       show_progress=ctx.show_progress)


register_objective("preference", PreferenceConfig, ObjectiveNeeds(messages=False), build)
