"""Datasets of "messages" records tokenized for training (labels on assistant tokens only, see
:func:`distillery.chat.tokenize_messages`), and the collator that batches them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from distillery.chat import IGNORE, tokenize_messages
from distillery.errors import DataError

console = Console(stderr=True)


def report_truncation(total: int, lengths: list[int], dropped: int, max_len: int) -> None:
    """Say how many of ``total`` records ``max_len`` (``train.max_seq_len``) cut or dropped.

    ``lengths``: the full token count of each record that was cut (``max_len`` where only the
    cut is known); ``dropped``: records with no trained token left after the cut (they are left
    out of training). A user whose long records vanish without a word trains on less than they
    think, so this always speaks when either count is non-zero, and refuses when nothing is left.
    """
    fix = "raise train.max_seq_len or shorten the records"
    if not total:
        raise DataError("no records to train on: check data.path / data.num_examples")
    if dropped == total:
        raise DataError(f"no record has an assistant token left after truncation to "
                        f"train.max_seq_len={max_len} (all {total} records dropped): {fix}")
    if lengths or dropped:
        longest = max(lengths, default=0)
        cut = (f"{len(lengths)} of {total} records are longer than train.max_seq_len={max_len} "
               f"tokens{f' (longest {longest})' if longest > max_len else ''} and are cut to it")
        console.print(f"[yellow]warning:[/yellow] {cut}; {dropped} have no assistant token left "
                      f"and are dropped from training: {fix}", soft_wrap=True)


def tokenize_records(records: list[dict], tokenizer: PreTrainedTokenizerBase,
                     max_len: int) -> tuple[list[dict[str, list[int]]], list[int]]:
    """Each record's ``input_ids``/``labels`` cut to ``max_len``, and the indices of the
    records that keep a trained token (only those items are returned); the cut and dropped
    records are reported (:func:`report_truncation`)."""
    items, kept, lengths = [], [], []
    for i, r in enumerate(records):
        full = tokenize_messages(r["messages"], tokenizer, 1 << 62)
        if len(full["input_ids"]) > max_len:
            lengths.append(len(full["input_ids"]))
        item = {key: value[:max_len] for key, value in full.items()}
        if any(x != IGNORE for x in item["labels"]):
            items.append(item)
            kept.append(i)
    report_truncation(len(records), lengths, len(records) - len(items), max_len)
    return items, kept


class SFTDataset(torch.utils.data.Dataset):
    """Records tokenized once, up front; items are dicts of ``input_ids`` and ``labels`` lists.
    Records longer than ``max_len`` are cut (those with no assistant token left are dropped),
    with a warning that counts them."""

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
        self.items, _ = tokenize_records(records, tokenizer, max_len)

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
