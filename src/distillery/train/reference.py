"""The fixed reference policy of objectives that anchor to one (preference's dpo/ipo, reward's KL).

One rule, used by every such objective: the reference is

1. ``reference_path``, when set: loaded with the job's model settings (dtype,
   ``trust_remote_code``) on the student's device, and refused unless its vocabulary covers
   the student's tokenizer;
2. else, for a peft (LoRA) student, the student itself with its adapters disabled: its base
   model, with no copy of the weights (:data:`ADAPTERS_OFF`, run under :func:`adapters_off`);
3. else a frozen deep copy of the student as it starts (or, with ``copy_student=False``, the
   student itself, for a one-off pass before training moves it).

Objectives score with it their own way (summed sequence log-probs, per-token log-probs);
:func:`reference_model` hands them the module to run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, Literal

import torch
from torch import nn

from distillery.config import ModelConfig
from distillery.models import load_model
from distillery.models.lora import is_peft_model
from distillery.models.vocab import VocabMismatchError
from distillery.train.sampling import unwrap

ADAPTERS_OFF: Final = "adapters_off"
"""The reference that is the peft student itself with its adapters disabled."""

Reference = nn.Module | Literal["adapters_off"]
"""A frozen module, or :data:`ADAPTERS_OFF` (the student with adapters off)."""


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring grad (in place; returns it)."""
    return model.eval().requires_grad_(False)


def load_reference(path: str, key: str, model_cfg: ModelConfig | None, device: torch.device,
                   vocab_size: int) -> nn.Module:
    """The frozen model at ``path`` on ``device``, loaded with ``model_cfg``'s dtype and remote-code setting.

    ``model_cfg`` None: the defaults of :class:`~distillery.config.ModelConfig`. ``key`` (e.g.
    ``train.objective.reference_path``) names the setting in errors. Its output layer must
    have at least ``vocab_size`` rows (the student's tokenizer), or the two do not share a
    vocabulary and log-probs of the same token ids would compare different tokens.
    """
    cfg = (model_cfg or ModelConfig()).model_copy(update={"path": path, "device": str(device)})
    model = frozen(load_model(cfg))
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < vocab_size:
        raise VocabMismatchError(f"{key} {path}: its vocabulary ({vocab}) is smaller than the student's tokenizer "
                                 f"({vocab_size}): the reference must share the student's tokenizer")
    return model


def reference_for(student: nn.Module, path: str | None, key: str, model_cfg: ModelConfig | None,
                  vocab_size: int, *, copy_student: bool = True) -> Reference:
    """The reference of ``student`` (possibly DDP-wrapped) as training starts; see the module doc.

    ``path``/``key``/``model_cfg``/``vocab_size`` go to :func:`load_reference` when ``path`` is
    set. ``copy_student=False`` returns a plain (non-peft) ``student`` itself instead of a
    frozen copy: only for scoring before the first step, since the student then trains on.
    """
    if path is not None:
        return load_reference(path, key, model_cfg, next(student.parameters()).device, vocab_size)
    if is_peft_model(unwrap(student)):
        return ADAPTERS_OFF
    if copy_student:
        return frozen(copy.deepcopy(unwrap(student)))
    return student


@contextmanager
def adapters_off(student: nn.Module) -> Iterator[None]:
    """Within it, the peft ``student`` (possibly DDP-wrapped) runs as its base model; adapters return after."""
    model = unwrap(student)
    if not is_peft_model(model):
        raise TypeError(f"adapters_off needs a peft model, got {type(model).__name__}")
    with model.disable_adapter():
        yield


@contextmanager
def reference_model(reference: Reference, student: nn.Module | None) -> Iterator[nn.Module]:
    """The module that computes ``reference``'s outputs: the frozen module, or ``student`` with adapters off.

    ``student`` is only used (and only needed) for :data:`ADAPTERS_OFF`; it is yielded as
    given, so the caller picks whether the wrapper or the unwrapped model runs the forward.
    """
    if isinstance(reference, nn.Module):
        yield reference
        return
    if student is None:
        raise ValueError("the adapters-off reference is the student itself: pass the student")
    with adapters_off(student):
        yield student
