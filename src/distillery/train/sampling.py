"""Sampling inside training: the student (or teacher) writes continuations of a batch's prompts.

Used by the objectives that learn from model-generated text: ``on_policy`` (GKD, MiniLLM),
``seq_kd`` (teacher-generated continuations) and ``reward`` (GRPO-style groups). The sampled
sequences come back as an ordinary training batch (right-padded, labels on the continuation
tokens only), so every loss downstream treats them like any other record.
"""

from __future__ import annotations

import torch
from torch import nn

from distillery.chat import IGNORE
from distillery.train.data import Collator


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate wrapper (``generate`` and ``config`` live there)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The prompt of each row: its tokens before the first labeled (trained) position.

    ``batch`` is a collated training batch (``input_ids``/``labels`` ``[batch, seq]``,
    right-padded). A row with no labeled position is taken whole.
    """
    prompts = []
    for ids, labels, attn in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(attn.sum())
        trained = (labels[:n] != IGNORE).nonzero()
        end = int(trained[0]) if len(trained) else n
        prompts.append(ids[:end].tolist())
    return prompts


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    num_return_sequences: int = 1,
) -> list[list[int]]:
    """Sample continuations of ``prompts`` (token-id lists) with ``model.generate``.

    Prompts are left-padded for generation (decoder-only models continue from the right
    edge). Returns ``len(prompts) × num_return_sequences`` continuations, grouped by prompt
    (``[p0s0, p0s1, ..., p1s0, ...]``); each stops after the first EOS (kept, since the model
    must learn to stop) or at ``max_new_tokens``. ``temperature`` 0 is greedy. The model is
    put in eval mode (no dropout) for sampling and restored after.
    """
    model = unwrap(model)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(p, device=device)
        attn[row, width - len(p):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences, pad_token_id=pad_token_id,
            eos_token_id=eos_token_id, top_k=None, **sampling,
        )
    finally:
        model.train(was_training)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    continuations = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        continuations.append(row[:cut])
    return continuations


def continuation_batch(
    prompts: list[list[int]], continuations: list[list[int]], pad_token_id: int, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """A training batch of ``prompt + continuation`` rows with labels on the continuation only.

    Same layout as :class:`~distillery.train.data.Collator` (right-padded ``input_ids``,
    ``attention_mask``, ``labels`` ``[rows, seq]``). Rows are cut from the right at ``max_len``.
    """
    items = []
    for p, c in zip(prompts, continuations):
        ids, labels = p + c, [IGNORE] * len(p) + c
        if max_len is not None:
            ids, labels = ids[:max_len], labels[:max_len]
        items.append({"input_ids": ids, "labels": labels})
    return Collator(pad_token_id)(items)
