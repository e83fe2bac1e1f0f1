"""Training objectives: each turns a batch into a scalar loss; the loop knows nothing else.

An objective is any object with ``needs_teacher: bool``, ``trainable: list[nn.Module]``
(modules besides the student that the optimizer must update, e.g. feature projections) and
``loss(batch, student, teacher) -> (loss, metrics)``. Logits are shifted here, once:
``logits[:, t]`` predicts ``input_ids[:, t + 1]``, and positions whose label is ``IGNORE``
(prompt, padding) do not count.

``loss`` is a mean over ``metrics["count"]`` units (tokens, sequences, pairs; default
``metrics["tokens"]``, else 1). The loop weights micro-batches and processes by that count,
so a step's gradient is the same however its global batch is split. An objective with state
of its own to resume (e.g. a random generator) implements ``state_dict() -> dict`` (JSON
values) and ``load_state_dict(state)``; the checkpoint saves it with the ``trainable`` modules.
``student`` may arrive wrapped (DDP): call it for forward passes, use
:func:`~distillery.train.sampling.unwrap` for ``generate``/``config``.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distillery.config import FeatureKDConfig, TrainConfig
from distillery.losses import FeatureDistiller, LossSpec, distillation_loss, lm_head_inputs
from distillery.train.data import IGNORE
from distillery.train.packing import model_inputs


class Objective(Protocol):
    needs_teacher: bool
    trainable: list[nn.Module]

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


def shifted_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[batch, seq-1]`` aligned with ``logits[:, :-1]``, and their mask (True = counted)."""
    targets = batch["labels"][:, 1:]
    return targets, targets != IGNORE


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy; logits ``[batch, seq, vocab]`` aligned with targets ``[batch, seq]``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward kwargs of a batch: padded rows, or packed rows (position ids + block mask)."""
    return model_inputs(batch)


def teacher_inputs(batch: dict[str, torch.Tensor], teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The batch's model inputs on the teacher's device (it may live on another device or the CPU)."""
    device = next(teacher.parameters()).device
    return {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}


def _check_vocab(student_vocab: int, teacher_vocab: int, shared: int | None) -> None:
    if shared is None and student_vocab != teacher_vocab:
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}): "
            "logit_kd needs a shared tokenizer (a padded vocabulary is handled once the tokenizers "
            "are compared: distillery train does it); else use train.cross_tokenizer, or SFT on "
            "teacher-written data"
        )
    if shared is not None and shared > min(student_vocab, teacher_vocab):
        raise ValueError(f"shared vocabulary {shared} exceeds a model's ({student_vocab}, {teacher_vocab})")


def _check_labels_shared(targets: torch.Tensor, shared: int) -> None:
    if bool((targets >= shared).any()):
        raise ValueError(
            f"the student's labels hold ids >= {shared}, outside the range both tokenizers share (a "
            "token only the student has, e.g. in its chat template): use train.cross_tokenizer")


def _first(x: torch.Tensor | None, n: int | None) -> torch.Tensor | None:
    """``x[..., :n]`` (or ``x[:n]`` for a ``[vocab, hidden]`` weight): the shared id range."""
    return x if x is None or n is None else x[:n]


class SFTObjective:
    """Next-token cross entropy on assistant tokens only (the "messages" records' answers)."""

    needs_teacher = False

    def __init__(self) -> None:
        self.trainable: list[nn.Module] = []

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = student(**_inputs(batch)).logits
        targets, mask = shifted_targets(batch)
        ce = cross_entropy(logits[:, :-1], targets)
        return ce, {"ce": ce.item(), "count": float(mask.sum())}


class LogitKDObjective:
    """``ce_weight·CE + Σ w_i·D_i(teacher ‖ student)`` with a live teacher in the same process.

    The divergence mix, temperature and form come from a :class:`LossSpec` (default: torchtune's
    ``(1 − kd_ratio)·CE + kd_ratio·KL(teacher‖student)``). ``form: dense`` compares full logits;
    ``form: fused`` never builds the student's ``[tokens, vocab]`` logits: it takes hidden
    states and the lm_head weight (tied or not) of both models and computes the loss in chunks.
    The teacher runs in eval mode under ``no_grad``; both must share a tokenizer.

    With ``cached=True`` there is no live teacher: the batch carries the teacher's top-k from a
    logit cache (``teacher_ids``/``teacher_logprobs`` ``[batch, seq-1, k]``, ``teacher_log_tail``
    ``[batch, seq-1]``, see :mod:`distillery.train.cached`) and the loss takes its sparse form
    (a ``dense`` spec is read as ``sparse``: full teacher logits are not in a cache).
    """

    def __init__(self, spec: LossSpec | None = None, kd_ratio: float = 0.5, temperature: float = 1.0,
                 cached: bool = False, shared_vocab: int | None = None) -> None:
        self.spec = spec or LossSpec(divergence="forward_kl", kd_ratio=kd_ratio, temperature=temperature)
        if cached and self.spec.form == "dense":
            self.spec = self.spec.model_copy(update={"form": "sparse"})
        if cached and self.spec.form != "sparse":
            raise ValueError("training from a logit cache uses loss.form 'sparse' (the cache holds "
                             f"top-k distributions), not {self.spec.form!r}")
        if self.spec.form == "sparse" and not cached:
            raise ValueError(
                "loss.form 'sparse' reads teacher top-k from a logit cache (teacher_cache: DIR); "
                "with a live teacher use form 'dense' or 'fused'"
            )
        self.cached = cached
        # teacher and student share a tokenizer but not a vocabulary size (padded embedding rows,
        # special tokens appended on one side): both distributions are taken over ids [0, n)
        self.shared_vocab = shared_vocab
        self.needs_teacher = not cached
        self.trainable: list[nn.Module] = []

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cached:
            targets, mask = shifted_targets(batch)
            s_logits = student(**_inputs(batch)).logits[:, :-1]
            loss, metrics = distillation_loss(
                self.spec, student_logits=s_logits, teacher_topk_ids=batch["teacher_ids"],
                teacher_topk_logprobs=batch["teacher_logprobs"],
                teacher_log_tail=batch["teacher_log_tail"], labels=targets, mask=mask,
            )
            return loss, {**metrics, "count": loss_count(batch, self.spec)}
        if teacher is None:
            raise ValueError("logit_kd needs a teacher model (or a logit cache: teacher_cache)")
        loss, metrics = live_kd_loss(self.spec, batch, student, teacher, self.shared_vocab)
        return loss, {**metrics, "count": loss_count(batch, self.spec)}


def loss_count(batch: dict[str, torch.Tensor], spec: LossSpec) -> float:
    """The units a distillation loss is a mean over: counted tokens, or sequences (``reduction: sequence``)."""
    counted = shifted_targets(batch)[1]
    if spec.reduction == "sequence":
        return float(counted.any(-1).sum())
    return float(counted.sum())


def live_kd_loss(
    spec: LossSpec, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module,
    shared_vocab: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``distillation_loss`` against a live teacher on ``batch``, shifted (``[:, :-1]`` vs labels ``[:, 1:]``).

    The teacher reads the batch on its own device (:func:`teacher_inputs`, under ``no_grad``)
    and its outputs come back to the student's. ``fused`` passes hidden states and lm_head
    weights (the student's through its own, possibly DDP-wrapped, forward). ``shared_vocab = n``
    compares the distributions over ids ``[0, n)`` only, renormalized on both sides: exact when
    the rows beyond are padding or tokens the other side lacks (see
    :func:`distillery.models.vocab.compare_tokenizers`).
    """
    targets, mask = shifted_targets(batch)
    t_in, device = teacher_inputs(batch, teacher), batch["input_ids"].device
    if spec.form == "fused":
        with torch.no_grad():
            t_hidden, t_weight, t_bias = lm_head_inputs(teacher, **t_in)
        s_hidden, s_weight, s_bias = lm_head_inputs(student, **_inputs(batch))
        _check_vocab(s_weight.shape[0], t_weight.shape[0], shared_vocab)
        n = shared_vocab
        if n is not None:
            _check_labels_shared(targets, n)
        return distillation_loss(
            spec, student_hidden=s_hidden[:, :-1], lm_head_weight=_first(s_weight, n),
            lm_head_bias=_first(s_bias, n), teacher_hidden=t_hidden[:, :-1].to(device),
            teacher_lm_head_weight=_first(t_weight, n).to(device),
            teacher_lm_head_bias=None if t_bias is None else _first(t_bias, n).to(device), labels=targets, mask=mask,
        )
    s_logits = student(**_inputs(batch)).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**t_in).logits[:, :-1].to(device)
    _check_vocab(s_logits.shape[-1], t_logits.shape[-1], shared_vocab)
    if shared_vocab is not None:
        _check_labels_shared(targets, shared_vocab)
        s_logits, t_logits = s_logits[..., :shared_vocab], t_logits[..., :shared_vocab]
    return distillation_loss(spec, student_logits=s_logits, teacher_logits=t_logits, labels=targets, mask=mask)


class FeatureKDObjective:
    """``ce_weight·CE + FeatureDistiller(student hidden states, teacher hidden states)``.

    Hidden states of the mapped layers are matched through learned projections (trained with
    the student, discarded after) and, with ``relation_weight > 0``, so is the token-to-token
    similarity structure. Positions counted are the assistant tokens.
    """

    needs_teacher = True

    def __init__(self, cfg: FeatureKDConfig, student_hidden: int, teacher_hidden: int) -> None:
        self.ce_weight = cfg.ce_weight
        self.distiller = FeatureDistiller(
            student_hidden, teacher_hidden, cfg.layer_map, loss=cfg.loss,
            feature_weight=cfg.feature_weight, relation_weight=cfg.relation_weight,
            relation_loss=cfg.relation_loss, relation_temperature=cfg.relation_temperature,
        )
        self.trainable: list[nn.Module] = [self.distiller]

    def loss(
        self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if teacher is None:
            raise ValueError("feature_kd needs a teacher model")
        out = student(**_inputs(batch), output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(**_inputs(batch), output_hidden_states=True)
        targets, _ = shifted_targets(batch)
        ce = cross_entropy(out.logits[:, :-1], targets)
        # features are compared where the model reads assistant tokens (labels != IGNORE)
        mask = batch["labels"] != IGNORE
        feat, metrics = self.distiller(out.hidden_states, t_out.hidden_states, mask)
        loss = self.ce_weight * ce + feat
        # a token mean (the relation term is a mean over sequences: weighted by tokens too)
        return loss, {"ce": ce.item(), **{k: float(v) for k, v in metrics.items()}, "count": float(mask.sum())}


def _check_layer_map(layer_map: dict[int, int], student_layers: int, teacher_layers: int) -> None:
    """HF returns num_layers + 1 hidden states (embeddings first); every index must exist."""
    for s, t in layer_map.items():
        for who, index, n in (("student", s, student_layers), ("teacher", t, teacher_layers)):
            if not -(n + 1) <= index <= n:
                raise ValueError(
                    f"train.feature.layer_map: {who} layer {index} does not exist: the {who} has "
                    f"{n} layers, so hidden-state indices run from 0 (embeddings) to {n} (or -1)"
                )


def build_objective(
    cfg: TrainConfig | str,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    cached: bool = False,
    tokenizer: object | None = None,
    shared_vocab: int | None = None,
    **shorthand: float,
) -> Objective:
    """The objective a config names (``cfg.objective``), built from its ``loss``/``feature``/
    ``on_policy`` blocks. ``preference`` and ``reward`` bring their own datasets: they are set
    up by :func:`distillery.train.job.training_parts`.

    ``shared_vocab``: logit_kd over the ids both tokenizers share (a padded vocabulary).
    A bare name (``build_objective("logit_kd", kd_ratio=0.5)``) is accepted for quick use.
    """
    if isinstance(cfg, str):
        cfg = TrainConfig(objective=cfg, **shorthand)
    if cfg.objective == "sft":
        return SFTObjective()
    if cfg.objective == "logit_kd":
        return LogitKDObjective(cfg.resolved_loss(), cached=cached, shared_vocab=shared_vocab)
    if cached:
        raise ValueError(f"a logit cache (teacher_cache) feeds objective logit_kd, not {cfg.objective!r}")
    if cfg.objective == "feature_kd":
        if student is None or teacher is None:
            raise ValueError("feature_kd needs the student and teacher to size its projections")
        _check_layer_map(cfg.feature.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        return FeatureKDObjective(cfg.feature, student.config.hidden_size, teacher.config.hidden_size)
    if cfg.objective == "on_policy":
        from distillery.train.on_policy import OnPolicyObjective
        from distillery.train.sampling import unwrap

        model_cfg = unwrap(student).config if student is not None else None
        eos = getattr(tokenizer, "eos_token_id", None) or getattr(model_cfg, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(model_cfg, "pad_token_id", None)
        if eos is None or pad is None:
            raise ValueError("on_policy samples continuations and needs the tokenizer's eos and pad tokens")
        return OnPolicyObjective(cfg, eos_token_id=eos, pad_token_id=pad)
    if cfg.objective in ("preference", "reward"):
        raise ValueError(f"objective {cfg.objective!r} is built with its dataset: use "
                         "distillery.train.job.training_parts (or distillery train)")
    raise ValueError(f"unknown objective {cfg.objective!r}; valid: sft, logit_kd, feature_kd, on_policy, "
                     "preference, reward")
