"""Shares → chunk sizes: sums, zeros, caps, rounding, the primary's sample."""

from __future__ import annotations

import random

import pytest

from adaptive_nb.layout import chunk_sizes, equal_split, micro_batch_sizes, nonzero_chunks


def test_proportional_with_largest_remainder() -> None:
    assert chunk_sizes([0.5, 0.25, 0.25], 8) == [4, 2, 2]
    assert chunk_sizes([1, 1, 1], 10) == [4, 3, 3]  # remainder to the largest fraction, then order
    assert sum(chunk_sizes([0.3, 0.3, 0.4], 101)) == 101


def test_zero_share_gets_nothing_and_is_dropped() -> None:
    sizes = chunk_sizes([0.5, 0.0, 0.5], 9)
    assert sizes[1] == 0 and sum(sizes) == 9
    assert nonzero_chunks(sizes, [0, 1, 2]) == ([0, 2], [sizes[0], sizes[2]])


def test_caps_are_respected_and_overflow_goes_elsewhere() -> None:
    sizes = chunk_sizes([0.7, 0.2, 0.1], 100, [30, None, 40])
    assert sizes[0] == 30 and sizes[2] <= 40 and sum(sizes) == 100
    # the remaining 70 split 2:1 between the uncapped devices
    assert sizes == [30, 47, 23]


def test_caps_too_small_raise() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        chunk_sizes([0.5, 0.5], 10, [4, 5])


def test_required_position_gets_a_sample() -> None:
    sizes = chunk_sizes([0.001, 0.999], 10, required=0)
    assert sizes[0] == 1 and sum(sizes) == 10
    sizes = chunk_sizes([0.0, 1.0], 5, required=0)
    assert sizes == [1, 4]


def test_bad_shares_raise() -> None:
    with pytest.raises(ValueError):
        chunk_sizes([-0.1, 1.1], 4)
    with pytest.raises(ValueError):
        chunk_sizes([0.0, 0.0], 4)
    assert chunk_sizes([0.0, 0.0], 0) == [0, 0]


def test_random_properties() -> None:
    rng = random.Random(7)
    for _ in range(500):
        n = rng.randint(1, 8)
        shares = [rng.choice([0.0, rng.random()]) for _ in range(n)]
        if not any(shares):
            shares[0] = 1.0
        total = rng.randint(0, 300)
        caps = [rng.choice([None, rng.randint(0, 80)]) for _ in range(n)]
        room = sum(
            min(c if c is not None else total, total)
            for s, c in zip(shares, caps, strict=True)
            if s > 0
        )
        if room < total:
            with pytest.raises(ValueError):
                chunk_sizes(shares, total, caps)
            continue
        sizes = chunk_sizes(shares, total, caps)
        assert sum(sizes) == total
        for s, c, x in zip(shares, caps, sizes, strict=True):
            assert x >= 0
            if s == 0:
                assert x == 0
            if c is not None:
                assert x <= c


def test_equal_split_gives_remainder_to_first_devices() -> None:
    assert equal_split(10, 4) == [3, 3, 2, 2]
    assert equal_split(3, 4) == [1, 1, 1, 0]


def test_micro_batch_sizes() -> None:
    assert micro_batch_sizes(10, 3) == [4, 3, 3]
    assert micro_batch_sizes(2, 5) == [1, 1]
    assert micro_batch_sizes(7, 1) == [7]
