"""The data order: a pure function of (seed, step), split evenly over processes and micro-batches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillery.train.batches import check_split, global_batch, micro_batches


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 16), seed=st.integers(0, 5))
def test_every_example_once_per_epoch(n, batch, seed):
    """Concatenated batches walk through whole permutations: each epoch sees each example once."""
    steps = (3 * n) // batch + 1
    stream = [i for s in range(steps) for i in global_batch(n, batch, seed, s)]
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_deterministic_and_seed_dependent():
    assert global_batch(100, 8, 0, 7) == global_batch(100, 8, 0, 7)
    assert global_batch(100, 8, 0, 7) != global_batch(100, 8, 1, 7)
    assert global_batch(100, 8, 0, 7) != global_batch(100, 8, 0, 8)


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 4), accum=st.integers(1, 4), per=st.integers(1, 4), step=st.integers(0, 20))
def test_shares_partition_the_global_batch(world, accum, per, step):
    batch = world * accum * per
    indices = global_batch(37, batch, 3, step)
    pieces = [mb for r in range(world) for mb in micro_batches(indices, r, world, accum)]
    assert [i for mb in pieces for i in mb] == indices
    assert all(len(mb) == per for mb in pieces)


def test_uneven_split_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="multiple of 6"):
        check_split(8, 2, 3)
    check_split(12, 2, 3)
