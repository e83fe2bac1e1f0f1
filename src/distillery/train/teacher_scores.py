"""The loss on sequences a teacher scored as top-k (remote or several teachers), and the routes.

A scorer (:mod:`distillery.teachers.scoring`) returns per sequence the teacher's top-k
log-probs and log tail mass at each position; here they are laid out as the logit cache's
batch tensors (``teacher_ids``/``teacher_logprobs`` ``[batch, seq-1, k]``,
``teacher_log_tail`` ``[batch, seq-1]``, aligned with ``logits[:, :-1]``, as
:class:`~distillery.train.cached.CachedCollator`) and the loss is the sparse form of the
objective's :class:`~distillery.losses.LossSpec` (``fused`` stays fused, reading the top-k):
the tail is handled exactly as for a logit cache, with every divergence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distillery.chat import IGNORE
from distillery.config import ConfigError
from distillery.errors import DataError
from distillery.logits.topk import LOG_TAIL_FLOOR
from distillery.losses import LossSpec, distillation_loss, lm_head_inputs
from distillery.teachers.scoring import ScoredSequence
from distillery.train.data import Collator, tokenize_records
from distillery.train.packing import model_inputs
from distillery.train.targets import shifted_targets


def scored_spec(spec: LossSpec) -> LossSpec:
    """``spec`` for a top-k teacher: ``dense`` is read as ``sparse`` (no full logits come back)."""
    return spec.model_copy(update={"form": "sparse"}) if spec.form == "dense" else spec


def sequences(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's tokens without padding: what the teacher scores."""
    return [ids[: int(n)].tolist() for ids, n in zip(batch["input_ids"], batch["attention_mask"].sum(-1))]


def score_tensors(batch: dict[str, torch.Tensor], scores: list[ScoredSequence], k: int,
                  student_vocab: int, teacher_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``teacher_ids``/``teacher_logprobs`` ``[batch, seq-1, k]``, ``teacher_log_tail`` ``[batch, seq-1]``.

    Padding positions hold a uniform row (never counted, kept finite). A teacher id outside the
    student's vocabulary means another tokenizer: refused, naming the row's teacher.
    """
    b, width = batch["input_ids"].shape
    dtype = scores[0].top.logprobs.dtype if scores else torch.float32
    ids = torch.arange(k).expand(b, width - 1, k).clone()
    logprobs = torch.full((b, width - 1, k), -math.log(k), dtype=dtype)
    log_tail = torch.full((b, width - 1), LOG_TAIL_FLOOR, dtype=dtype)
    for row, s in enumerate(scores):
        n = s.top.ids.shape[0]
        if n and int(s.top.ids.max()) >= student_vocab:
            who = f"teacher {teacher_names[row]!r}" if teacher_names else "the teacher"
            raise ConfigError(f"{who} returned token id {int(s.top.ids.max())}, outside the student's vocabulary "
                              f"({student_vocab}): it has another tokenizer; the teacher scores the student's "
                              "token ids, so both need the same one")
        ids[row, :n], logprobs[row, :n] = s.top.ids, s.top.logprobs
        tail = s.top.log_tail
        if tail is not None:
            log_tail[row, :n] = tail
    device = batch["input_ids"].device
    return {"teacher_ids": ids.to(device), "teacher_logprobs": logprobs.to(device),
            "teacher_log_tail": log_tail.to(device)}


@dataclass
class ScoredLoss:
    """The distillation loss against scored top-k, with the loss per teacher as metrics."""

    spec: LossSpec

    def __call__(self, batch: dict[str, torch.Tensor], student: nn.Module, teacher: dict[str, torch.Tensor],
                 per_teacher: dict[str, dict[str, torch.Tensor] | torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """``batch``: a training batch ``[batch, seq]``; ``teacher``: :func:`score_tensors`.

        ``per_teacher``: name → the rows it scored (a bool mask ``[batch]``, routing) or its
        own score tensors (mixture); ``teacher/<name>/loss`` is logged for each (no gradient).
        """
        targets, mask = shifted_targets(batch)
        if self.spec.form == "fused":
            hidden, weight, bias = lm_head_inputs(student, **model_inputs(batch))
            student_in = {"student_hidden": hidden[:, :-1], "lm_head_weight": weight, "lm_head_bias": bias}
        else:
            student_in = {"student_logits": student(**model_inputs(batch)).logits[:, :-1]}
        loss, metrics = self._loss(student_in, teacher, targets, mask)
        for name, part in (per_teacher or {}).items():
            with torch.no_grad():
                detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in student_in.items()}
                if isinstance(part, torch.Tensor):  # routing: this teacher's rows only
                    rows = mask & part[:, None].to(mask.device)
                    if not bool(rows.any()):
                        continue
                    metrics[f"teacher/{name}/loss"] = float(self._loss(detached, teacher, targets, rows)[0])
                else:
                    metrics[f"teacher/{name}/loss"] = float(self._loss(detached, part, targets, mask)[0])
        return loss, metrics

    def _loss(self, student_in: dict, teacher: dict[str, torch.Tensor], targets: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return distillation_loss(self.spec, **student_in, teacher_topk_ids=teacher["teacher_ids"],
                                 teacher_topk_logprobs=teacher["teacher_logprobs"],
                                 teacher_log_tail=teacher["teacher_log_tail"], labels=targets, mask=mask)


# --------------------------------------------------------------------------- routing


def record_field(record: dict, path: str) -> object:
    """``record['meta']['teacher']`` for ``path`` ``meta.teacher``; None where a key is missing."""
    value: object = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def record_routes(records: list[dict], path: str, names: list[str]) -> list[int]:
    """Each record's teacher, as an index into ``names``; a missing or unknown name is refused."""
    routes = []
    for i, r in enumerate(records):
        value = record_field(r, path)
        if value not in names:
            rid = r.get("id", f"#{i}")
            said = "has no field " + repr(path) if value is None else f"names teacher {value!r}"
            raise DataError(f"record {rid!r} {said}, but train.objective.scoring.route_by: {path} picks one of "
                            f"the teachers {', '.join(names)}: give every record one of those names")
        routes.append(names.index(value))
    return routes


class RoutedDataset(torch.utils.data.Dataset):
    """Tokenized "messages" records (as :class:`~distillery.train.data.SFTDataset`) with each
    record's teacher (an index into the panel's names) as ``route``."""

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int, path: str,
                 names: list[str]) -> None:
        routes = record_routes(records, path, names)
        items, kept = tokenize_records(records, tokenizer, max_len)
        self.items = [{**item, "route": routes[i]} for item, i in zip(items, kept)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@dataclass
class RoutedCollator(Collator):
    """:class:`Collator` plus ``route`` ``[batch]`` (each row's teacher index)."""

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        batch["route"] = torch.tensor([it["route"] for it in items], dtype=torch.long)
        return batch


def routed_data(records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int, path: str,
                names: list[str]) -> tuple[RoutedDataset, Callable]:
    """Dataset and collator of records routed to teachers by the field ``path``."""
    return RoutedDataset(records, tokenizer, max_len, path, names), RoutedCollator(tokenizer.pad_token_id)


def mean_token_logprobs(batch: dict[str, torch.Tensor], scores: list[ScoredSequence],
                        teacher_names: list[str] | None = None) -> list[float]:
    """Per row of ``batch`` ``[rows, seq]``: the teacher's mean log-prob of the row's labeled tokens.

    A server that lists only the top-k (no log-prob of the sampled token) leaves it unknown:
    refused, naming the teacher.
    """
    out = []
    for row, (labels, s) in enumerate(zip(batch["labels"], scores)):
        counted = (labels[1:] != IGNORE)[: len(s.token_logprobs)]
        values = s.token_logprobs[counted]
        if bool(values.isnan().any()):
            who = f"teacher {teacher_names[row]!r}" if teacher_names else "the teacher"
            raise ConfigError(f"{who} gave no log-prob for some sampled tokens (its backend returns only the "
                              "top-k): source 'teacher_logprob' needs one that returns the prompt's token "
                              "log-probs (an in-process model, distillery serve, vLLM)")
        out.append(float(values.mean()) if len(values) else 0.0)
    return out
