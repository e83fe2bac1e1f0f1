"""Turn "messages" records into token ids with labels on assistant tokens only, and batch them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of a position that does not count in the loss


class TemplateError(ValueError):
    """The tokenizer's chat template does not render conversations as a growing prefix."""


def chat_pieces(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, int, bool]]:
    """The pieces of text the chat template adds turn by turn: ``(text, message index, train)``.

    An assistant turn gives two pieces: its generation prompt (not trained) and then its content
    with whatever the template closes the turn with (trained). Concatenated, the pieces are the
    rendered conversation; each is tokenized on its own by :func:`tokenize_messages`.
    """
    pieces: list[tuple[str, int, bool]] = []
    prev = ""

    def add(text: str, index: int, train: bool) -> None:
        nonlocal prev
        if not text.startswith(prev):
            raise TemplateError(
                "the chat template does not render conversations as a growing prefix; "
                "tokenize with a template that does, or pre-render records as plain text"
            )
        pieces.append((text[len(prev) :], index, train))
        prev = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            add(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True), i, False)
        add(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False), i, message["role"] == "assistant")
    return pieces


def tokenize_messages(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, list[int]]:
    """Token ids of a conversation and labels that keep only the assistant turns' tokens.

    The chat template is rendered turn by turn; each new piece of text is tokenized on its own
    and labeled if it belongs to an assistant turn (its content and end token). This works for
    any template that renders conversations as a growing prefix, which all common ones do.
    Sequences longer than ``max_len`` are cut from the right.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, _, train in chat_pieces(messages, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE] * len(piece))
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def prompt_text(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a model is given to continue: every turn but the last assistant one, plus the tag."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class SFTDataset(torch.utils.data.Dataset):
    """Records tokenized once, up front; items are dicts of ``input_ids`` and ``labels`` lists."""

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
        self.items = [tokenize_messages(r["messages"], tokenizer, max_len) for r in records]
        self.items = [it for it in self.items if any(x != IGNORE for x in it["labels"])]
        if not self.items:
            raise ValueError("no record has an assistant token left after truncation to max_seq_len")

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
