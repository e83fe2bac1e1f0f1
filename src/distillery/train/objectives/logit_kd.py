"""``logit_kd``: the student matches the teacher's next-token distributions, plus CE on labels.

``(1 − kd_ratio)·CE + kd_ratio·KL(teacher‖student)`` at ``temperature`` (torchtune's recipe),
or any divergence mix, form and reduction given as ``loss`` (a :class:`LossSpec`, see
docs/losses.md). The teacher is live (``form: dense`` or ``fused``) or a logit cache
(``teacher_cache``: its top-k, ``form: sparse``). Its tokenizer is compared with the
student's before training: the same one with a padded vocabulary is distilled over the ids both
share; a different one needs ``cross_tokenizer`` (see :mod:`distillery.train.cross_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from distillery.config import CrossTokenizerConfig, ObjectiveConfig
from distillery.losses import LossSpec, distillation_loss, lm_head_inputs
from distillery.losses.divergences import upcast
from distillery.losses.forms import cross_entropy_per_token
from distillery.models import load_tokenizer
from distillery.models.vocab import (
    TokenizerComparison,
    VocabMapping,
    compare_tokenizers,
    require_shared_vocab,
)
from distillery.models.vocab_cache import cached_vocab_mapping
from distillery.train.cached import CachedCollator, CachedSFTDataset
from distillery.train.cross_tokenizer import CrossTokenizerCollator, CrossTokenizerDataset
from distillery.train.cross_tokenizer_chunked import (
    LiveTeacher,
    TeacherRows,
    XtSettings,
    chunked_loss,
    compare_rows,
)
from distillery.train.objectives.base import (
    BuildContext,
    LossOutput,
    Objective,
    ObjectiveNeeds,
    register_objective,
)
from distillery.train.objectives.sft import sft_data
from distillery.train.packing import model_inputs
from distillery.train.sampling import unwrap
from distillery.train.targets import shifted_targets, teacher_inputs

console = Console(stderr=True)


class LogitKDConfig(ObjectiveConfig):
    """``train.objective: {name: logit_kd, ...}``.

    ``kd_ratio``/``temperature`` are the shorthand of torchtune's mix (null: 0.5 and 1.0);
    for any other divergence, form or mix give ``loss`` instead (not both).
    ``cross_tokenizer``: the teacher has another tokenizer (null: the tokenizers must agree,
    up to a padded vocabulary).
    """

    name: Literal["logit_kd"] = "logit_kd"
    kd_ratio: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, gt=0)
    loss: LossSpec | None = None
    cross_tokenizer: CrossTokenizerConfig | None = None

    @model_validator(mode="after")
    def _one_way_to_say_the_loss(self) -> LogitKDConfig:
        check_loss_shorthand(self.loss, self.kd_ratio, self.temperature)
        return self

    def resolved_loss(self) -> LossSpec:
        """``loss`` as given, else forward KL with ``(1 − kd_ratio)·CE`` at ``temperature``."""
        if self.loss is not None:
            return self.loss
        return LossSpec(divergence="forward_kl", kd_ratio=0.5 if self.kd_ratio is None else self.kd_ratio,
                        temperature=1.0 if self.temperature is None else self.temperature)

    def resolve_needs(self, declared: ObjectiveNeeds) -> ObjectiveNeeds:
        # a cross-tokenizer row is aligned to the teacher's tokens on its own: never packed
        return ObjectiveNeeds(**{**declared.__dict__, "packing": self.cross_tokenizer is None})


def check_loss_shorthand(loss: LossSpec | None, kd_ratio: float | None, temperature: float | None) -> None:
    """One way to say the loss: the ``kd_ratio``/``temperature`` shorthand, or ``loss``."""
    if loss is not None and (kd_ratio is not None or temperature is not None):
        raise ValueError("train.objective.kd_ratio/temperature are a shorthand for train.objective.loss; "
                         "with loss set, give them inside it (loss.kd_ratio, loss.temperature)")


# --------------------------------------------------------------------------- same tokenizer


def _check_vocab(student_vocab: int, teacher_vocab: int, shared: int | None) -> None:
    if shared is None and student_vocab != teacher_vocab:
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}): "
            "logit_kd needs a shared tokenizer (a padded vocabulary is handled once the tokenizers "
            "are compared: distillery train does it); else use train.objective.cross_tokenizer, or "
            "SFT on teacher-written data"
        )
    if shared is not None and shared > min(student_vocab, teacher_vocab):
        raise ValueError(f"shared vocabulary {shared} exceeds a model's ({student_vocab}, {teacher_vocab})")


def _check_labels_shared(targets: torch.Tensor, shared: int) -> None:
    if bool((targets >= shared).any()):
        raise ValueError(
            f"the student's labels hold ids >= {shared}, outside the range both tokenizers share (a "
            "token only the student has, e.g. in its chat template): use train.objective.cross_tokenizer")


def _first(x: torch.Tensor | None, n: int | None) -> torch.Tensor | None:
    """``x[..., :n]`` (or ``x[:n]`` for a ``[vocab, hidden]`` weight): the shared id range."""
    return x if x is None or n is None else x[:n]


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
        s_hidden, s_weight, s_bias = lm_head_inputs(student, **model_inputs(batch))
        _check_vocab(s_weight.shape[0], t_weight.shape[0], shared_vocab)
        n = shared_vocab
        if n is not None:
            _check_labels_shared(targets, n)
        return distillation_loss(
            spec, student_hidden=s_hidden[:, :-1], lm_head_weight=_first(s_weight, n),
            lm_head_bias=_first(s_bias, n), teacher_hidden=t_hidden[:, :-1].to(device),
            teacher_lm_head_weight=_first(t_weight, n).to(device),
            teacher_lm_head_bias=None if t_bias is None else _first(t_bias, n).to(device),
            labels=targets, mask=mask,
        )
    s_logits = student(**model_inputs(batch)).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**t_in).logits[:, :-1].to(device)
    _check_vocab(s_logits.shape[-1], t_logits.shape[-1], shared_vocab)
    if shared_vocab is not None:
        _check_labels_shared(targets, shared_vocab)
        s_logits, t_logits = s_logits[..., :shared_vocab], t_logits[..., :shared_vocab]
    return distillation_loss(spec, student_logits=s_logits, teacher_logits=t_logits, labels=targets, mask=mask)


class LogitKDObjective:
    """``ce_weight·CE + Σ w_i·D_i(teacher ‖ student)`` with a live teacher in the same process.

    The divergence mix, temperature and form come from a :class:`LossSpec` (default: torchtune's
    ``(1 − kd_ratio)·CE + kd_ratio·KL(teacher‖student)``). ``form: dense`` compares full logits;
    ``form: fused`` never builds the student's ``[tokens, vocab]`` logits: it takes hidden
    states and the lm_head weight (tied or not) of both models and computes the loss in chunks.
    The teacher runs in eval mode under ``no_grad``; both must share a tokenizer.

    With ``cached=True`` there is no live teacher: the batch carries the teacher's top-k from a
    logit cache (``teacher_ids``/``teacher_logprobs`` ``[batch, seq-1, k]``, ``teacher_log_tail``
    ``[batch, seq-1]``, see :mod:`distillery.train.cached`). ``form: fused`` (the default for a
    cache: a ``dense`` spec is read as ``fused``, full teacher logits not being in a cache) feeds
    that top-k to the fused loss, which never builds the student's ``[tokens, vocab]`` logits;
    ``form: sparse`` computes the same loss from full student logits (bench/train_step_real.py:
    2.5x the loss time and 3x its memory at V=49152).
    """

    def __init__(self, spec: LossSpec | None = None, kd_ratio: float = 0.5, temperature: float = 1.0,
                 cached: bool = False, shared_vocab: int | None = None) -> None:
        self.spec = spec or LossSpec(divergence="forward_kl", kd_ratio=kd_ratio, temperature=temperature)
        if cached and self.spec.form == "dense":
            self.spec = self.spec.model_copy(update={"form": "fused"})
        if self.spec.form == "sparse" and not cached:
            raise ValueError(
                "loss.form 'sparse' reads teacher top-k from a logit cache (teacher_cache: DIR); "
                "with a live teacher use form 'dense' or 'fused'"
            )
        self.cached = cached
        # teacher and student share a tokenizer but not a vocabulary size (padded embedding rows,
        # special tokens appended on one side): both distributions are taken over ids [0, n)
        self.shared_vocab = shared_vocab
        self.trainable: list[nn.Module] = []

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
             ) -> LossOutput:
        if self.cached:
            targets, mask = shifted_targets(batch)
            top_k = {"teacher_topk_ids": batch["teacher_ids"], "teacher_topk_logprobs": batch["teacher_logprobs"],
                     "teacher_log_tail": batch["teacher_log_tail"]}
            if self.spec.form == "fused":
                hidden, weight, bias = lm_head_inputs(student, **model_inputs(batch))
                loss, metrics = distillation_loss(self.spec, student_hidden=hidden[:, :-1], lm_head_weight=weight,
                                                  lm_head_bias=bias, labels=targets, mask=mask, **top_k)
            else:
                s_logits = student(**model_inputs(batch)).logits[:, :-1]
                loss, metrics = distillation_loss(self.spec, student_logits=s_logits, labels=targets, mask=mask,
                                                  **top_k)
        else:
            if teacher is None:
                raise ValueError("logit_kd needs a teacher model (or a logit cache: teacher_cache)")
            loss, metrics = live_kd_loss(self.spec, batch, student, teacher, self.shared_vocab)
        return LossOutput(loss, loss_count(batch, self.spec), metrics)


# --------------------------------------------------------------------------- another tokenizer


class CrossTokenizerKDObjective:
    """``logit_kd`` from a teacher with another tokenizer: see the module doc.

    ``mapping`` carries teacher ids to student ids (:func:`distillery.models.vocab.build_vocab_mapping`);
    None for ``uld``, which compares sorted distributions and needs none. ``spec`` gives the
    divergence mix, temperature and CE weight; ``cfg`` the method.
    """

    def __init__(self, spec: LossSpec, cfg: CrossTokenizerConfig, mapping: VocabMapping | None,
                 cached: bool = False) -> None:
        self.spec, self.cfg, self.mapping, self.cached = spec, cfg, mapping, cached
        self.method = cfg.resolved_method
        if mapping is None and self.method != "uld":
            raise ValueError(f"cross-tokenizer method {self.method!r} needs a vocabulary mapping")
        self.settings = XtSettings(self.method, spec.terms(), spec.temperature, cfg.resolved_unmapped,
                                   cfg.uld_weight, mapping)
        self.trainable: list[nn.Module] = []

    def _live_teacher_rows(self, batch: dict[str, torch.Tensor], teacher: nn.Module
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher top-k (or all) log-probs at the compared rows ``[N, k]``, tail, chain log mass ``[N]``."""
        device = next(teacher.parameters()).device
        with torch.no_grad():
            logits = teacher(input_ids=batch["teacher_input_ids"].to(device),
                             attention_mask=batch["teacher_attention_mask"].to(device)).logits
            rows = F.log_softmax(upcast(logits[batch["xt_row"].to(device), batch["xt_teacher_pos"].to(device)]), -1)
            n = rows.shape[0]
            # chain members: log P(actual token) at each, summed per compared row
            pos_lp = F.log_softmax(upcast(logits[batch["xt_chain_row"].to(device), batch["xt_chain_pos"].to(device)]), -1)
            member = pos_lp.gather(-1, batch["xt_chain_token"].to(device)[:, None])[:, 0]
            log_mass = torch.zeros(n, dtype=member.dtype, device=device).index_add(
                0, batch["xt_chain_seg"].to(device), member)
            has_chain = torch.zeros(n, dtype=torch.bool, device=device)
            has_chain[batch["xt_chain_seg"].to(device)] = True
            log_mass = torch.where(has_chain, log_mass, torch.full_like(log_mass, -float("inf")))
            if self.cfg.top_k is not None and self.cfg.top_k < rows.shape[-1]:
                lp, ids = rows.topk(self.cfg.top_k, dim=-1)
                log_tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-7))
            else:
                # the whole distribution: nothing outside it (a None tail would be read as 1 − Σp)
                lp, ids = rows, torch.arange(rows.shape[-1], device=device).expand_as(rows)
                log_tail = torch.full((n,), -float("inf"), dtype=lp.dtype, device=device)
        return ids, lp, log_tail, log_mass

    def loss(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
             ) -> LossOutput:
        if not self.cached and teacher is None:
            raise ValueError("cross-tokenizer logit_kd needs a teacher model (or a logit cache)")
        if self.cfg.form == "chunked":
            return self._chunked_loss(batch, student, teacher)
        s_logits = student(**model_inputs(batch)).logits
        device = s_logits.device
        targets, mask = shifted_targets(batch)
        n_tokens = float(mask.sum())
        if self.cached:
            t_ids, t_lp = batch["xt_teacher_ids"], batch["xt_teacher_logprobs"]
            t_tail, log_mass = batch["xt_teacher_log_tail"], batch["xt_log_mass"]
        else:
            if teacher is None:
                raise ValueError("cross-tokenizer logit_kd needs a teacher model (or a logit cache)")
            t_ids, t_lp, t_tail, log_mass = self._live_teacher_rows(batch, teacher)
        t_ids, t_lp, log_mass = t_ids.to(device), t_lp.to(device), log_mass.to(device)
        t_tail = t_tail.to(device)
        s_rows = s_logits[batch["xt_row"], batch["xt_student_pos"]]
        per_row, parts = self._divergence(s_rows, t_ids, t_lp, t_tail, log_mass, batch)
        ce = cross_entropy_per_token(s_logits[:, :-1], targets)  # [batch, seq - 1]
        compared = torch.zeros_like(mask)
        compared[batch["xt_row"], batch["xt_student_pos"]] = True
        weight = self.spec.resolved_ce_weight + self.spec.resolved_kd_weight * (~compared).to(ce.dtype)
        ce_sum = ce[mask].sum()
        loss = ((ce * weight)[mask].sum() + per_row.sum()) / max(n_tokens, 1.0)
        metrics = {"ce": float(ce_sum.detach()) / max(n_tokens, 1.0), "compared_rows": float(per_row.shape[0])}
        metrics.update({f"kd/{k}": float(v.detach().mean()) if v.numel() else 0.0 for k, v in parts.items()})
        return LossOutput(loss, n_tokens, metrics)

    def _divergence(self, s_rows: torch.Tensor, t_ids: torch.Tensor, t_lp: torch.Tensor,
                    t_tail: torch.Tensor, log_mass: torch.Tensor, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per compared row ``[N]``: the teacher carried to student ids, span mass moved, compared."""
        device = s_rows.device
        return compare_rows(self.settings, s_rows, TeacherRows(t_lp, t_ids, t_tail),
                            batch["xt_teacher_token"].to(device), batch["xt_student_token"].to(device), log_mass)

    def _chunked_loss(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None
                      ) -> LossOutput:
        """``form: chunked`` (:mod:`distillery.train.cross_tokenizer_chunked`): the same loss, no
        ``[batch, seq, vocab]`` logits on either side."""
        targets, mask = shifted_targets(batch)
        device, n_rows = targets.device, batch["xt_row"].numel()
        if self.cached:
            lp, ids, tail = batch["xt_teacher_logprobs"], batch["xt_teacher_ids"], batch["xt_teacher_log_tail"]
            log_mass = batch["xt_log_mass"].to(device)

            def rows_of(n: torch.Tensor) -> TeacherRows:
                return TeacherRows(lp[n].to(device), ids[n].to(device), tail[n].to(device))
        else:
            assert teacher is not None  # loss() checks it
            live = LiveTeacher.run(teacher, batch, self.cfg.top_k, self.cfg.chunk_rows)
            log_mass = live.chain_log_mass(batch, n_rows, device)

            def rows_of(n: torch.Tensor) -> TeacherRows:
                return live.rows(batch["xt_row"][n], batch["xt_teacher_pos"][n], device)
        t1, s_tok = batch["xt_teacher_token"].to(device), batch["xt_student_token"].to(device)

        def row_fn(z_rows: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return compare_rows(self.settings, z_rows, rows_of(n), t1[n], s_tok[n], log_mass[n])

        total, ce_sum, parts = chunked_loss(
            student, model_inputs(batch), targets, mask, batch, self.spec.resolved_ce_weight,
            self.spec.resolved_kd_weight, self.cfg.chunk_rows, row_fn)
        n_tokens = float(mask.sum())
        metrics = {"ce": ce_sum / max(n_tokens, 1.0), "compared_rows": float(n_rows)}
        metrics.update({f"kd/{k}": v / n_rows for k, v in parts.items()})
        return LossOutput(total / max(n_tokens, 1.0), n_tokens, metrics)


# --------------------------------------------------------------------------- build


def build(ctx: BuildContext) -> tuple[Dataset, Callable, Objective]:
    """Compare the tokenizers, then: same (or padded) → token-level KD; different → cross-tokenizer."""
    cfg: LogitKDConfig = ctx.config
    shared = None
    teacher_tok, teacher_size = _teacher_tokenizer(ctx)
    if teacher_tok is not None:
        relation = compare_tokenizers(teacher_tok, ctx.tokenizer, teacher_size,
                                      unwrap(ctx.student).config.vocab_size)
        if relation.kind == "different":
            if cfg.cross_tokenizer is None:
                require_shared_vocab(relation)  # raises: names the ids and the objectives that apply
            return _cross_tokenizer_parts(ctx, teacher_tok, relation)
        if relation.kind == "padded":
            shared = relation.shared
            console.print(f"teacher and student share a tokenizer; vocabularies {relation.teacher_size} "
                          f"and {relation.student_size}: distilling over the shared ids [0, {shared})")
    if ctx.cache is not None:
        dataset: Dataset = CachedSFTDataset(ctx.records, ctx.tokenizer, ctx.train.max_seq_len, ctx.cache)
        collator: Callable = CachedCollator(ctx.tokenizer.pad_token_id, k=ctx.cache.manifest.k)
    else:
        dataset, collator = sft_data(ctx)
    objective = LogitKDObjective(cfg.resolved_loss(), cached=ctx.cache is not None, shared_vocab=shared)
    return dataset, collator, objective


def _teacher_tokenizer(ctx: BuildContext) -> tuple[PreTrainedTokenizerBase | None, int | None]:
    """The teacher's tokenizer and vocabulary rows, to compare with the student's.

    From ``cross_tokenizer.teacher_tokenizer``, else the teacher model's directory, else the
    tokenizer the logit cache was captured with. ``(None, None)`` when there is none to read
    and no cross-tokenizer config asks for one (then the vocab sizes must agree).
    """
    xt, job, cache, teacher = ctx.config.cross_tokenizer, ctx.job, ctx.cache, ctx.teacher
    source = xt.teacher_tokenizer if xt is not None else None
    if source is None and job.teacher is not None:
        source = job.teacher.path
    if source is None and cache is not None:
        source = cache.manifest.extra.get("tokenizer")
    size = teacher.config.vocab_size if teacher is not None else (cache.manifest.vocab_size if cache else None)
    if source is None:
        if xt is not None:
            raise ValueError("train.objective.cross_tokenizer needs the teacher's tokenizer: set "
                             "train.objective.cross_tokenizer.teacher_tokenizer (a path or hub id)")
        return None, None
    trust = job.teacher.trust_remote_code if job.teacher is not None else False
    try:
        return load_tokenizer(source, trust_remote_code=trust), size
    except (OSError, ValueError) as exc:
        if xt is not None:
            raise ValueError(f"train.objective.cross_tokenizer: cannot load the teacher's tokenizer from "
                             f"{source!r} ({exc}); set train.objective.cross_tokenizer.teacher_tokenizer"
                             ) from exc
        return None, None


def _cross_tokenizer_parts(ctx: BuildContext, teacher_tok: PreTrainedTokenizerBase,
                           relation: TokenizerComparison) -> tuple[Dataset, Callable, Objective]:
    """Dataset, collator and objective of ``logit_kd`` from a teacher with another tokenizer."""
    cfg: LogitKDConfig = ctx.config
    xt, cache = cfg.cross_tokenizer, ctx.cache
    if xt is None:  # require_shared_vocab raised already for a config without it
        raise ValueError("the tokenizers differ: set train.objective.cross_tokenizer")
    mapping = None
    if xt.resolved_method == "uld":  # sorted distributions: no token identity, no mapping to build
        console.print("cross-tokenizer uld: compares sorted distributions, no vocabulary mapping")
    else:
        mapping = cached_vocab_mapping(teacher_tok, ctx.tokenizer, relation.teacher_size, relation.student_size,
                                       prefix=xt.mapping == "prefix", say=console.print)
        console.print(f"cross-tokenizer {xt.resolved_method}: {mapping.n_mapped} of {mapping.n_tokens} teacher "
                      f"tokens map to student tokens ({100 * mapping.coverage:.1f}%; {mapping.n_prefix} by prefix)")
    dataset = CrossTokenizerDataset(ctx.records, ctx.tokenizer, teacher_tok, ctx.train.max_seq_len, cache)
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else (teacher_tok.eos_token_id or 0)
    collator = CrossTokenizerCollator(ctx.tokenizer.pad_token_id, teacher_pad_id=pad)
    objective = CrossTokenizerKDObjective(cfg.resolved_loss(), xt, mapping, cached=cache is not None)
    return dataset, collator, objective


register_objective("logit_kd", LogitKDConfig, ObjectiveNeeds(live_teacher="required", cache=True, packing=True),
                   build)
