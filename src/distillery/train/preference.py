"""Preference optimization: DPO, IPO and SimPO on ``prompt/chosen/rejected`` records.

The records are TRL's conversational preference format, as the feedback elicitation writes
them (``distillery.elicit.feedback``): ``prompt`` is a list of messages ending with the user's,
``chosen`` and ``rejected`` are the competing assistant turn(s). Each pair becomes two
sequences, ``prompt + chosen`` and ``prompt + rejected``, labeled on the response tokens only.

A batch stacks them: rows ``0..B-1`` are the chosen sequences, rows ``B..2B-1`` the rejected
ones of the same pairs, so the policy scores both in one forward pass (as TRL's
``concatenated_forward``). With ``π`` the summed log-prob of a response under the student and
``r`` under the reference, ``|y|`` its token count:

- ``dpo`` (arXiv 2305.18290): ``h = (π_c − r_c) − (π_r − r_r)``,
  ``loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)`` (ε = ``label_smoothing``, conservative DPO);
- ``ipo`` (arXiv 2310.12036): ``h = (π_c − r_c)/|c| − (π_r − r_r)/|r|``,
  ``loss = (h − 1/(2β))²`` — length-averaged log-ratios as TRL's ``DPOTrainer`` (``loss_type="ipo"``);
- ``simpo`` (arXiv 2405.14734): ``z = β·(π_c/|c| − π_r/|r|) − γ``, ``loss = −(1−ε)·log σ(z) − ε·log σ(−z)``,
  no reference model (as TRL's ``CPOTrainer`` with ``loss_type="simpo"``).

The reference model of dpo/ipo is explicit (see
:func:`distillery.train.objectives.preference.prepare_preference_training`):
precomputed once and stored in the dataset items, or a frozen model scoring each batch, or
for a LoRA student the same model with its adapters disabled (no copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from torch import nn
from transformers import PreTrainedTokenizerBase

from distillery.chat import IGNORE, tokenize_messages
from distillery.errors import DataError
from distillery.losses.forms import cross_entropy_per_token
from distillery.records import RecordError, check_messages
from distillery.train.data import Collator
from distillery.train.reference import adapters_off

console = Console(stderr=True)

SIDES = ("chosen", "rejected")

# --------------------------------------------------------------------------- records


def validate_preference_records(records: list[dict], source: str) -> None:
    """Check the preference contract; an error names ``source``, the record number and its id.

    ``prompt``: messages ending with the user's; ``chosen``/``rejected``: messages that start
    and end with an assistant turn (TRL's conversational format with an explicit prompt).
    """
    for i, rec in enumerate(records, 1):
        where = f"{source}: record {i}"
        if not isinstance(rec, dict):
            raise RecordError(f"{where}: must be a JSON object with prompt/chosen/rejected")
        if "id" in rec:
            where += f" (id {rec['id']!r})"
        if "messages" in rec and "prompt" not in rec:
            raise RecordError(f'{where}: is an SFT "messages" record; preference training needs '
                              '"prompt", "chosen" and "rejected" (e.g. from the feedback method)')
        check_messages(rec.get("prompt"), where, "prompt")
        if rec["prompt"][-1]["role"] != "user":
            raise RecordError(f'{where}: the last "prompt" message must be the user\'s')
        for side in SIDES:
            check_messages(rec.get(side), where, side)
            if rec[side][0]["role"] != "assistant" or rec[side][-1]["role"] != "assistant":
                raise RecordError(f'{where}: "{side}" must start and end with an assistant message')


# --------------------------------------------------------------------------- data


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs tokenized once, up front, with labels on the response tokens only.

    Item: ``chosen_input_ids``/``chosen_labels`` and ``rejected_input_ids``/``rejected_labels``
    (lists), plus ``ref_chosen_logps``/``ref_rejected_logps`` (floats) once
    :func:`precompute_reference_logps` has run. Sequences are cut from the right at
    ``max_len``, so the prompt is kept and the response's tail goes; a pair with no response
    token left on either side is dropped (``self.dropped`` counts them).
    """

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
        self.items: list[dict] = []
        for r in records:
            item = {}
            for side in SIDES:
                tok = tokenize_messages(r["prompt"] + r[side], tokenizer, max_len)
                item[f"{side}_input_ids"], item[f"{side}_labels"] = tok["input_ids"], tok["labels"]
            if all(any(x != IGNORE for x in item[f"{side}_labels"]) for side in SIDES):
                self.items.append(item)
        self.dropped = len(records) - len(self.items)
        if not self.items:
            raise DataError("no preference pair has a response token left on both sides after "
                            "truncation to max_seq_len: raise train.max_seq_len or shorten the prompts")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@dataclass
class PreferenceCollator(Collator):
    """B pairs → one right-padded batch of 2B rows: the chosen sequences, then the rejected.

    ``input_ids``/``attention_mask``/``labels`` ``[2B, seq]`` (row ``i`` and row ``B + i`` are
    pair ``i``); with precomputed reference log-probs also ``ref_chosen_logps`` and
    ``ref_rejected_logps`` ``[B]`` (float32).
    """

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": it[f"{side}_input_ids"], "labels": it[f"{side}_labels"]}
                for side in SIDES for it in items]
        batch = super().__call__(rows)
        if all("ref_chosen_logps" in it for it in items):
            for side in SIDES:
                batch[f"ref_{side}_logps"] = torch.tensor([it[f"ref_{side}_logps"] for it in items])
        return batch


# --------------------------------------------------------------------------- log-probs


def sequence_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's labeled tokens and their count: ``([rows], [rows])``.

    ``input_ids``/``attention_mask``/``labels`` are ``[rows, seq]``; ``logits[:, t]`` scores
    ``input_ids[:, t + 1]``. Only the labeled positions' logits are upcast to float32 for the
    log-softmax (``[labeled tokens, vocab]``, not ``[rows, seq, vocab]``).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    mask = targets != IGNORE
    token_logps = -cross_entropy_per_token(logits[:, :-1][mask], targets[mask])
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(len(labels), dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), mask.sum(1)


# --------------------------------------------------------------------------- losses


def _logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``−(1−ε)·log σ(z) − ε·log σ(−z)``: the preference is flipped with probability ε."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss ``[B]`` from summed log-ratios ``π − r`` of each side ``[B]``."""
    return _logistic(beta * (chosen_logratios - rejected_logratios), label_smoothing)


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
             chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss ``[B]``: ``(h − 1/(2β))²`` on per-token log-ratios, as TRL's ``ipo``."""
    h = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss ``[B]`` from summed policy log-probs (no reference)."""
    avg = chosen_logps / chosen_tokens.clamp(min=1) - rejected_logps / rejected_tokens.clamp(min=1)
    return _logistic(beta * avg - gamma, label_smoothing)


# --------------------------------------------------------------------------- reference


ReferenceScorer = Callable[[dict[str, torch.Tensor], nn.Module], torch.Tensor]
"""``(batch, student) -> [rows]``: the reference's summed response log-probs of a batch."""


@torch.no_grad()
def _score(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probs ``[rows]`` under ``model`` in eval mode, on the batch's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        sums, _ = sequence_logps(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
    finally:
        model.train(was_training)
    return sums.to(batch["input_ids"].device)


class ModelReference:
    """A fixed model (a frozen copy, a ``reference_path`` model, or the untrained student)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module) -> torch.Tensor:
        return _score(self.model, batch)


class AdapterOffReference:
    """A LoRA student's base model: the student itself with its adapters disabled (no copy)."""

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module) -> torch.Tensor:
        # the (possibly DDP-wrapped) student runs the forward; the switch lives on the peft model
        with adapters_off(student):
            return _score(student, batch)


def precompute_reference_logps(dataset: PreferenceDataset, reference: ReferenceScorer, student: nn.Module,
                               pad_id: int, batch_pairs: int = 16, show_progress: bool = True) -> None:
    """One pass over ``dataset`` storing ``ref_chosen_logps``/``ref_rejected_logps`` in its items."""
    collate = PreferenceCollator(pad_id)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True, disable=not show_progress) as progress:
        bar = progress.add_task("reference log-probs", total=len(dataset))
        for start in range(0, len(dataset), batch_pairs):
            items = dataset.items[start: start + batch_pairs]
            scores = reference(collate(items), student).tolist()
            for it, c, r in zip(items, scores[: len(items)], scores[len(items):]):
                it["ref_chosen_logps"], it["ref_rejected_logps"] = c, r
            progress.advance(bar, len(items))
    if show_progress:
        console.print(f"reference log-probs of {len(dataset)} pairs in {time.perf_counter() - t0:.1f}s")
