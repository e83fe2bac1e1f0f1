"""Padding-free batches: several examples share one row and never attend to each other.

``PackedCollator`` takes the tokenized items of a (micro-)batch and packs them into as few rows
of at most ``max_len`` tokens as it can (first-fit, longest first), so a step still sees the
same examples, with less padding. A packed batch carries, besides the usual ``[rows, seq]``
tensors:

- ``position_ids``: restarting at 0 at each example, so each one sees the positions it would
  see alone;
- ``attention_mask``: still 2-D, 1 on real tokens, 0 on the row's padding (token counts read it);
- ``labels``: ``IGNORE`` at each example's first token, so the last token of one example never
  learns to predict the first token of the next.

What isolates the examples is the 4-D block-diagonal causal mask that :func:`model_inputs`
builds from ``position_ids`` and passes as ``attention_mask``. In transformers 5.23 a 4-D
float mask is used as given by the eager and sdpa attention of Llama and most decoder models;
a boolean one is added as 0/1 by eager attention (no isolation), and ``position_ids`` with no
mask isolate only when the model also runs with ``use_cache=False`` (with a cache, even the
one a training-mode forward creates, the packed format is not detected). Flash-attention
kernels take no 4-D mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillery.chat import IGNORE


def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Item indices per row: first-fit in decreasing length, each row at most ``max_len`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > max_len:
            raise ValueError(f"an item of {lengths[i]} tokens does not fit a packed row of "
                             f"{max_len} (train.max_seq_len): tokenize with the same max_seq_len")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(max_len)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


@dataclass
class PackedCollator:
    """Packs items (``input_ids``/``labels`` lists) into ``[rows, seq]`` tensors, see the module doc.

    Each row is right-padded to the longest row; the padding is a segment of its own (positions
    from 0, labels ``IGNORE``, ``attention_mask`` 0), so no real token attends to it.
    """

    pad_id: int
    max_len: int

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        rows = pack_rows([len(it["input_ids"]) for it in items], self.max_len)
        width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(items[i]["input_ids"])
                input_ids[r, start:start + n] = torch.tensor(items[i]["input_ids"])
                labels[r, start + 1:start + n] = torch.tensor(items[i]["labels"][1:], dtype=torch.long)
                attention[r, start:start + n] = 1
                positions[r, start:start + n] = torch.arange(n)
                start += n
            positions[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "position_ids": positions}


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[rows, seq]`` → which example of its row each token belongs to (0, 1, ...).

    A new example starts wherever the position does not follow the previous one by 1 (the rule
    transformers uses to detect packed rows).
    """
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    return (step != 1).cumsum(-1)


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive block-diagonal causal mask ``[rows, 1, seq, seq]`` of packed rows.

    0 where query token q may attend to key token k (same example, k ≤ q), the dtype's most
    negative value elsewhere.
    """
    seg = segment_ids(position_ids)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of a causal LM's forward for a batch, packed or not.

    Packed (the batch has ``position_ids``): ``input_ids``, ``position_ids`` and the 4-D mask
    of :func:`packed_attention_mask`; otherwise ``input_ids`` and the 2-D ``attention_mask``.
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": packed_attention_mask(batch["position_ids"])}
