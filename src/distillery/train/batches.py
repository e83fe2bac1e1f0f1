"""Which examples each optimizer step sees, as a pure function of (seed, step).

The data order is an endless stream of seeded permutations of the dataset (epoch e is
``randperm(n)`` drawn from ``seed`` and ``e``); step s takes the stream's slice
``[s·B, (s+1)·B)`` as its global batch (B = ``batch_size``). Because a step's batch depends on
nothing but the step number, a resumed run picks up exactly where the killed one stopped
without replaying the data, and the same global batch is seen however it is split over
processes and micro-batches: process r of R takes the r-th contiguous share, then cuts it into
``grad_accum_steps`` micro-batches.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from distillery.config import ConfigError
from distillery.errors import DataError


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def global_batch(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Dataset indices of optimizer step ``step``'s global batch (``step`` counts from 0)."""
    if n < 1:
        raise DataError("the training dataset is empty")
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        take = min(batch_size - len(out), n - offset)
        out.extend(_epoch_order(n, seed, epoch)[offset: offset + take])
        pos += take
    return out


def micro_batches(
    indices: list[int], rank: int, world_size: int, grad_accum_steps: int
) -> list[list[int]]:
    """This process's share of a global batch, cut into ``grad_accum_steps`` micro-batches."""
    per_process = len(indices) // world_size
    share = indices[rank * per_process: (rank + 1) * per_process]
    size = per_process // grad_accum_steps
    return [share[i * size: (i + 1) * size] for i in range(grad_accum_steps)]


def check_split(batch_size: int, world_size: int, grad_accum_steps: int) -> None:
    """Refuse a global batch that does not split evenly (uneven shares would change the step)."""
    if batch_size % (world_size * grad_accum_steps):
        raise ConfigError(
            f"train.batch_size ({batch_size}) is the global batch of one optimizer step and must "
            f"divide evenly over {world_size} process(es) × {grad_accum_steps} micro-batch(es) "
            f"(train.grad_accum_steps); use a multiple of {world_size * grad_accum_steps}"
        )
