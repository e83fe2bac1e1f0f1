"""Training from a logit cache: records joined with their cached teacher top-k, by id.

The cache was captured from the same records tokenized the same way (see
:mod:`distillery.capture`); every item is checked token for token against it, so a cache
made from other data, another tokenizer or another ``max_seq_len`` is refused, never silently
misaligned. Teacher rows are read lazily from the memory-mapped shards as items are drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distillery.errors import DataError
from distillery.logits.cache import CacheMismatchError, LogitCache, stored_positions
from distillery.logits.topk import LOG_TAIL_FLOOR
from distillery.train.data import Collator, SFTDataset, tokenize_records


class CachedSFTDataset(SFTDataset):
    """:class:`SFTDataset` items plus the cached teacher top-k of their trained positions."""

    def __init__(self, records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int,
                 cache: LogitCache) -> None:
        cache.check_tokenizer(tokenizer)
        self.cache = cache
        self.items, self.ids = [], []
        missing = []
        # capture skips the records with no stored position the same way (see stored_positions)
        items, kept = tokenize_records(records, tokenizer, max_len)
        for item, i in zip(items, kept):
            rid = records[i]["id"]
            if not len(stored_positions(item["labels"])):
                continue
            if rid not in cache:
                missing.append(rid)
                continue
            self.items.append(item)
            self.ids.append(rid)
        if missing:
            raise CacheMismatchError(
                f"{len(missing)} training records are not in the logit cache {cache.dir} "
                f"(first: {missing[0]!r}): capture this dataset (distillery capture) with the same data")
        if not self.items:
            raise DataError("no record has an assistant token left after truncation to "
                            f"train.max_seq_len={max_len}: raise it or shorten the records")

    def __getitem__(self, i: int) -> dict:
        item, rid = self.items[i], self.ids[i]
        ex = self.cache[rid]
        if len(ex.token_ids) != len(item["input_ids"]) or not np.array_equal(ex.token_ids, item["input_ids"]):
            diff = next((j for j, (a, b) in enumerate(zip(ex.token_ids, item["input_ids"])) if a != b),
                        min(len(ex.token_ids), len(item["input_ids"])))
            raise CacheMismatchError(
                f"record {rid!r}: the cached tokens differ from the student's tokenization at "
                f"position {diff} (cache {len(ex.token_ids)} tokens, student {len(item['input_ids'])}): "
                "the cache was captured from other text, another tokenizer or another max_seq_len")
        return {**item, "teacher": ex}


@dataclass
class CachedCollator(Collator):
    """Pads as :class:`Collator` and scatters teacher rows to ``[batch, seq-1, k]`` tensors.

    ``teacher_ids``/``teacher_logprobs`` ``[batch, seq-1, k]`` and ``teacher_log_tail``
    ``[batch, seq-1]`` are aligned with ``logits[:, :-1]``. Positions without a cached row
    (prompt, padding) are not counted by the loss; they hold a harmless uniform row so that
    every value stays finite.
    """

    k: int = 1

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        b, width = batch["input_ids"].shape
        ids = torch.arange(self.k).expand(b, width - 1, self.k).clone()
        logprobs = torch.full((b, width - 1, self.k), -math.log(self.k))
        log_tail = torch.full((b, width - 1), LOG_TAIL_FLOOR)
        for row, it in enumerate(items):
            ex, pos = it["teacher"], torch.as_tensor(stored_positions(it["labels"]))
            ids[row, pos] = torch.as_tensor(ex.ids, dtype=torch.long)
            logprobs[row, pos] = torch.as_tensor(ex.logprobs, dtype=torch.float32)
            log_tail[row, pos] = torch.as_tensor(ex.log_tail, dtype=torch.float32)
        batch.update(teacher_ids=ids, teacher_logprobs=logprobs, teacher_log_tail=log_tail)
        return batch
