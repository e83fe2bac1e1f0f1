"""Datasets of "messages" records tokenized for training (labels on assistant tokens only, see
:func:`distillery.chat.tokenize_messages`), and the collator that batches them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from distillery.chat import IGNORE, tokenize_messages
from distillery.errors import DataError


class SFTDataset(torch.utils.data.Dataset):
    """Records tokenized once, up front; items are dicts of ``input_ids`` and ``labels`` lists."""

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
        self.items = [tokenize_messages(r["messages"], tokenizer, max_len) for r in records]
        self.items = [it for it in self.items if any(x != IGNORE for x in it["labels"])]
        if not self.items:
            raise DataError("no record has an assistant token left after truncation to max_seq_len")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


@dataclass
class Collator:
    """Right-pads a list of items to ``[batch, seq]`` tensors: input_ids, attention_mask, labels."""

    pad_id: int

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = torch.tensor(it["input_ids"])
            labels[row, :n] = torch.tensor(it["labels"])
            attention[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
