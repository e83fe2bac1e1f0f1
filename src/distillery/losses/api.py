"""The one entry point the training loop calls: ``distillation_loss(spec, ...)``.

Alignment convention (shift-free): every per-position input is already aligned with its target,
i.e. ``student_logits[:, t]`` predicts ``labels[:, t]``; the caller shifts
(``logits[:, :-1]`` vs ``input_ids[:, 1:]``). ``mask`` is over those aligned positions.
:func:`fused_kd_loss_from_model` is the exception: it takes HF-style unshifted inputs and shifts.
"""

from __future__ import annotations

import torch

from distillery.losses.forms import cross_entropy_per_token, dense_per_token, sparse_per_token
from distillery.losses.fused import (
    Teacher,
    TeacherHidden,
    TeacherLogits,
    TeacherTopK,
    fused_linear_kd,
)
from distillery.losses.reduce import resolve_mask, token_weights
from distillery.losses.spec import LossSpec


def _metrics(loss: torch.Tensor, parts: dict[str, torch.Tensor], n_tokens: int) -> dict[str, float]:
    out = {"loss": float(loss.detach())}
    out.update({k: float(v.detach()) for k, v in parts.items()})
    out["tokens"] = float(n_tokens)
    return out


def distillation_loss(
    spec: LossSpec,
    *,
    student_logits: torch.Tensor | None = None,
    student_hidden: torch.Tensor | None = None,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_log_tail: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss = ce_weight·CE + Σ_i w_i·D_i(p_teacher, q_student)``, reduced per ``spec.reduction``.

    Inputs by ``spec.form`` (all positions aligned, no shift here):

    * ``dense``: ``student_logits`` and ``teacher_logits`` ``[batch, seq, vocab]``.
    * ``sparse``: ``student_logits [batch, seq, vocab]``; ``teacher_topk_ids`` (int) and
      ``teacher_topk_logprobs`` ``[batch, seq, k]``; optional ``teacher_log_tail [batch, seq]``.
    * ``fused``: ``student_hidden [batch, seq, hidden]`` (or ``[tokens, hidden]``) and
      ``lm_head_weight [vocab, hidden]`` (+ ``lm_head_bias [vocab]``); the teacher as
      ``teacher_logits``, or top-k, or ``teacher_hidden`` + ``teacher_lm_head_weight`` (+ bias).

    ``labels [batch, seq]`` (-100 = ignore) and/or ``mask [batch, seq]`` (bool, True = counted):
    counted positions are those allowed by both. CE (at T = 1) needs labels when its weight > 0.

    Returns ``(loss, metrics)``; metrics: ``loss``, ``kd/<divergence>`` (each unweighted,
    reduced), ``ce`` (when its weight > 0), ``tokens`` (counted positions).
    """
    terms = spec.terms()
    ce_weight = spec.resolved_ce_weight
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 (or kd_ratio < 1) needs labels")
    T = spec.temperature

    if spec.form == "fused":
        if student_hidden is None or lm_head_weight is None:
            raise ValueError("form 'fused' needs student_hidden and lm_head_weight")
        teacher = _fused_teacher(
            teacher_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_log_tail,
            teacher_hidden, teacher_lm_head_weight, teacher_lm_head_bias,
        )
        loss, parts = fused_linear_kd(
            student_hidden, lm_head_weight, teacher, terms, bias=lm_head_bias, mask=mask,
            labels=labels, temperature=T, ce_weight=ce_weight, reduction=spec.reduction,
            chunk_tokens=spec.chunk_tokens, tail_policy=spec.tail_policy,
        )
        named = {f"kd/{t.name}": parts[i] for i, t in enumerate(terms)}
        if ce_weight:
            named["ce"] = parts[-1]
        m = resolve_mask(mask, labels, student_hidden.shape[:-1], device=student_hidden.device)
        return loss, _metrics(loss, named, int(m.sum()))

    if student_logits is None:
        raise ValueError(f"form {spec.form!r} needs student_logits")
    if spec.form == "dense":
        if teacher_logits is None:
            raise ValueError("form 'dense' needs teacher_logits")
        per_token, parts = dense_per_token(student_logits, teacher_logits, terms, T)
    else:
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("form 'sparse' needs teacher_topk_ids and teacher_topk_logprobs")
        per_token, parts = sparse_per_token(
            student_logits, teacher_topk_ids, teacher_topk_logprobs, teacher_log_tail, terms, T,
            spec.tail_policy,
        )
    positions = student_logits.shape[:-1]
    m = resolve_mask(mask, labels, positions, device=student_logits.device)
    named = {f"kd/{k}": v for k, v in parts.items()}
    if ce_weight:
        ce = cross_entropy_per_token(student_logits, labels)
        named["ce"] = ce
        per_token = per_token + ce_weight * ce
    w = token_weights(m, spec.reduction, per_token.dtype)
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return (torch.where(m, x, zero) * w).sum()

    loss = reduce(per_token)
    with torch.no_grad():
        reduced = {k: reduce(v) for k, v in named.items()}
    return loss, _metrics(loss, reduced, int(m.sum()))


def _fused_teacher(
    logits: torch.Tensor | None,
    ids: torch.Tensor | None,
    logprobs: torch.Tensor | None,
    log_tail: torch.Tensor | None,
    hidden: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> Teacher:
    given = [logits is not None, ids is not None or logprobs is not None, hidden is not None]
    if sum(given) != 1:
        raise ValueError(
            "give the teacher exactly one way: teacher_logits, or teacher_topk_ids + "
            "teacher_topk_logprobs, or teacher_hidden + teacher_lm_head_weight"
        )
    if logits is not None:
        return TeacherLogits(logits.detach())
    if hidden is not None:
        if weight is None:
            raise ValueError("teacher_hidden needs teacher_lm_head_weight")
        return TeacherHidden(
            hidden.detach(), weight.detach(), None if bias is None else bias.detach()
        )
    if ids is None or logprobs is None:
        raise ValueError("a top-k teacher needs both teacher_topk_ids and teacher_topk_logprobs")
    return TeacherTopK(ids, logprobs.detach(), None if log_tail is None else log_tail.detach())


def lm_head_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run a Hugging Face causal LM's body and return what its lm_head would consume.

    Returns ``(hidden [batch, seq, hidden], weight [vocab, hidden], bias [vocab] | None)``:
    the final-norm hidden states (the model's last ``hidden_states``, computed by its own
    forward with the lm_head applied to one position only) and
    ``model.get_output_embeddings()``'s weight/bias, which is the embedding Parameter itself
    when ``tie_word_embeddings`` is set. Unshifted: position t predicts token t + 1.

    Models that transform logits after the lm_head (Gemma-2's final soft-capping, Cohere's
    ``logit_scale``) are refused, because the fused loss would not see that transform.
    """
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module  # DDP / accelerate wrappers
    cfg = getattr(inner, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1.0, 0.0):
            raise ValueError(f"{type(inner).__name__} sets {attr}={value}; fused form unsupported")
    # through the (possibly wrapped) model's own forward, so DDP/FSDP hooks run; the lm_head is
    # applied to the last position only, and the last hidden state is the final-norm output
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, **model_kwargs)
    head = inner.get_output_embeddings()
    hidden = out.hidden_states[-1]
    if head.weight.ndim != 2 or head.weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(
            f"the lm_head weight is partitioned outside the forward (shape {tuple(head.weight.shape)}, "
            "e.g. DeepSpeed ZeRO-3): use loss.form dense, ZeRO-2, or FSDP")
    return hidden, head.weight, getattr(head, "bias", None)


def fused_kd_loss_from_model(
    student_model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    teacher: Teacher,
    spec: LossSpec,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Fused distillation loss of an HF causal LM on a batch, with HF's unshifted convention.

    ``input_ids``, ``attention_mask``, ``labels`` are ``[batch, seq]`` as for
    ``model(input_ids, attention_mask=..., labels=...)`` (labels -100 on prompt/padding; default
    ``input_ids``); ``teacher`` (:class:`TeacherLogits`, :class:`TeacherTopK` or
    :class:`TeacherHidden`) covers the same ``seq`` positions (e.g. ``teacher_model(input_ids)
    .logits``). This helper shifts: position t's prediction is scored against token t + 1, and
    counted positions are those where ``attention_mask[:, t + 1]`` and ``labels[:, t + 1] != -100``.
    ``spec.form`` is ignored (this is the fused form).
    """
    hidden, weight, bias = lm_head_inputs(student_model, input_ids, attention_mask)
    if labels is None:
        labels = input_ids
    tgt = labels[:, 1:]
    mask = None if attention_mask is None else attention_mask[:, 1:].bool()
    kwargs: dict[str, torch.Tensor | None] = {}
    if isinstance(teacher, TeacherLogits):
        kwargs["teacher_logits"] = teacher.logits[:, :-1]
    elif isinstance(teacher, TeacherHidden):
        kwargs.update(
            teacher_hidden=teacher.hidden[:, :-1], teacher_lm_head_weight=teacher.weight,
            teacher_lm_head_bias=teacher.bias,
        )
    else:
        kwargs.update(
            teacher_topk_ids=teacher.ids[:, :-1], teacher_topk_logprobs=teacher.logprobs[:, :-1],
            teacher_log_tail=None if teacher.log_tail is None else teacher.log_tail[:, :-1],
        )
    fused_spec = spec.model_copy(update={"form": "fused"})
    return distillation_loss(
        fused_spec, student_hidden=hidden[:, :-1], lm_head_weight=weight, lm_head_bias=bias,
        labels=tgt, mask=mask, **kwargs,
    )
