"""Feature- and relation-based distillation for white-box pairs (classical KD, on hidden states).

* **Feature matching**: for each mapped pair (student layer i ↔ teacher layer j), a learned
  ``nn.Linear(student_hidden, teacher_hidden)`` projects the student's states, which are compared
  with the teacher's by MSE (mean over the hidden dim) or cosine distance (1 − cos).
* **Relation matching**: per sequence, the token-to-token cosine-similarity (Gram) matrices of
  the counted tokens, ``G[s, t] = cos(h_s, h_t)``, of the student and of the teacher are compared,
  by MSE over the entries or by KL(softmax(G_teacher / τ) ‖ softmax(G_student / τ)) over rows.
  Gram matrices are ``[n, n]`` whatever the widths, so no projection is needed, and they do not
  change under rotations or rescaling of either model's hidden space.

Layer indices address the ``hidden_states`` tuple that Hugging Face models return with
``output_hidden_states=True``: index 0 is the embedding output, index L the output of layer L
(the last entry has the final norm applied in Llama-style models); negative indices count from
the end. Teacher states are detached: only the student and the projections learn.

Shapes: hidden states ``[batch, seq, hidden]``; mask ``[batch, seq]`` bool (True = counted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LayerMap = Mapping[int, int] | Sequence[tuple[int, int]]


def _pairs(layer_map: LayerMap) -> list[tuple[int, int]]:
    items = layer_map.items() if isinstance(layer_map, Mapping) else layer_map
    pairs = [(int(s), int(t)) for s, t in items]
    if not pairs:
        raise ValueError("layer_map must map at least one student layer to a teacher layer")
    return pairs


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [batch, seq]`` over counted positions (0 if none)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def feature_loss(
    projected: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    kind: Literal["mse", "cosine"] = "mse",
) -> torch.Tensor:
    """Per-token feature distance averaged over counted tokens.

    projected (student states already projected), teacher: ``[batch, seq, teacher_hidden]``.
    ``mse``: mean over the hidden dim of the squared difference; ``cosine``: 1 − cos.
    """
    teacher = teacher.detach()
    if kind == "mse":
        per_token = (projected - teacher).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(projected, teacher, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"feature loss must be 'mse' or 'cosine', got {kind!r}")
    return _masked_mean(per_token, mask)


def cosine_gram(hidden: torch.Tensor) -> torch.Tensor:
    """Token-to-token cosine similarities: ``[batch, seq, hidden] -> [batch, seq, seq]``."""
    unit = F.normalize(hidden, dim=-1, eps=1e-8)
    return unit @ unit.transpose(-1, -2)


def relation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    kind: Literal["mse", "kl"] = "mse",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Compare the cosine Gram matrices of the counted tokens of each sequence.

    student ``[batch, seq, hs]``, teacher ``[batch, seq, ht]``, mask ``[batch, seq]``.
    ``mse``: mean over the n² counted entries of each sequence, then over sequences;
    ``kl``: per counted row, KL(softmax(G_t/τ) ‖ softmax(G_s/τ)) over the counted columns,
    mean over rows, then over sequences. Sequences without counted tokens are left out.
    """
    g_s = cosine_gram(student)
    g_t = cosine_gram(teacher.detach())
    m = mask.bool()
    pair = m.unsqueeze(-1) & m.unsqueeze(-2)  # [batch, seq, seq]
    n = m.sum(-1).to(g_s.dtype)  # counted tokens per sequence
    has = n > 0
    if kind == "mse":
        per_entry = (g_s - g_t).pow(2) * pair
        per_seq = per_entry.sum((-1, -2)) / (n * n).clamp_min(1.0)
    elif kind == "kl":
        neg = torch.finfo(g_s.dtype).min
        log_q = F.log_softmax((g_s / temperature).masked_fill(~pair, neg), dim=-1)
        log_p = F.log_softmax((g_t / temperature).masked_fill(~pair, neg), dim=-1)
        p = log_p.exp() * pair
        per_row = (p * (log_p - log_q)).sum(-1)  # [batch, seq]
        per_seq = (per_row * m).sum(-1) / n.clamp_min(1.0)
    else:
        raise ValueError(f"relation loss must be 'mse' or 'kl', got {kind!r}")
    return (per_seq * has).sum() / has.sum().clamp_min(1)


class FeatureDistiller(nn.Module):
    """Hidden-state (feature) and relation distillation between mapped layers.

    Args:
        student_hidden, teacher_hidden: the two models' hidden sizes.
        layer_map: ``{student_layer: teacher_layer}`` or ``[(student_layer, teacher_layer), ...]``,
            indices into HF ``hidden_states`` tuples (0 = embeddings, -1 = last).
        loss: feature distance, ``"mse"`` or ``"cosine"``.
        feature_weight: weight of the feature term (mean over pairs).
        relation_weight: weight of the relation term (mean over pairs); 0 disables it.
        relation_loss: ``"mse"`` or ``"kl"`` (see :func:`relation_loss`);
        relation_temperature: τ for ``"kl"``.

    ``forward(student_hidden_states, teacher_hidden_states, mask) -> (loss, metrics)``; hidden
    states are tuples/lists of ``[batch, seq, hidden]`` (or one tensor when the map has a single
    pair), mask ``[batch, seq]`` bool. The projections (one ``nn.Linear`` per pair, in
    ``self.projections``) are trainable: add this module's parameters to the optimizer.
    """

    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        layer_map: LayerMap,
        loss: Literal["mse", "cosine"] = "mse",
        feature_weight: float = 1.0,
        relation_weight: float = 0.0,
        relation_loss: Literal["mse", "kl"] = "mse",
        relation_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {loss!r}")
        if relation_loss not in ("mse", "kl"):
            raise ValueError(f"relation_loss must be 'mse' or 'kl', got {relation_loss!r}")
        self.pairs = _pairs(layer_map)
        self.loss = loss
        self.feature_weight = float(feature_weight)
        self.relation_weight = float(relation_weight)
        self.relation_loss = relation_loss
        self.relation_temperature = float(relation_temperature)
        self.projections = nn.ModuleDict(
            {self._key(s, t): nn.Linear(student_hidden, teacher_hidden) for s, t in self.pairs}
        )

    @staticmethod
    def _key(s: int, t: int) -> str:
        return f"s{s}_t{t}".replace("-", "m")

    def forward(
        self,
        student_hidden_states: Sequence[torch.Tensor] | torch.Tensor,
        teacher_hidden_states: Sequence[torch.Tensor] | torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted feature + relation loss and per-pair metrics (floats)."""
        if isinstance(student_hidden_states, torch.Tensor):
            student_hidden_states = (student_hidden_states,)
        if isinstance(teacher_hidden_states, torch.Tensor):
            teacher_hidden_states = (teacher_hidden_states,)
        first = student_hidden_states[0]
        if mask is None:
            mask = torch.ones(first.shape[:-1], dtype=torch.bool, device=first.device)
        mask = mask.bool()
        metrics: dict[str, float] = {}
        feats, rels = [], []
        for s, t in self.pairs:
            h_s, h_t = student_hidden_states[s], teacher_hidden_states[t]
            key = self._key(s, t)
            proj = self.projections[key]
            f = feature_loss(proj(h_s.to(proj.weight.dtype)), h_t.to(proj.weight.dtype), mask, self.loss)
            feats.append(f)
            metrics[f"feature/{key}"] = float(f.detach())
            if self.relation_weight:
                r = relation_loss(h_s, h_t, mask, self.relation_loss, self.relation_temperature)
                rels.append(r)
                metrics[f"relation/{key}"] = float(r.detach())
        feature = torch.stack(feats).mean()
        loss = self.feature_weight * feature
        metrics["feature"] = float(feature.detach())
        if rels:
            relation = torch.stack(rels).mean()
            loss = loss + self.relation_weight * relation
            metrics["relation"] = float(relation.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics
