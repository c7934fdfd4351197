"""Ring buffers: order, bounds, and storage that never grows."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive_nb.monitor.ring import NumericRing, Ring


def test_numeric_ring_keeps_last_values_in_order() -> None:
    r = NumericRing(4)
    assert len(r) == 0
    assert r.last() is None
    assert r.values().size == 0
    for x in range(1, 4):
        r.append(x)
    assert r.values().tolist() == [1.0, 2.0, 3.0]
    for x in range(4, 11):
        r.append(x)
    assert len(r) == 4
    assert r.values().tolist() == [7.0, 8.0, 9.0, 10.0]
    assert r.last() == 10.0


def test_numeric_ring_values_is_a_copy() -> None:
    r = NumericRing(3)
    r.append(1.0)
    v = r.values()
    v[0] = 99.0
    assert r.values().tolist() == [1.0]


def test_numeric_ring_storage_is_flat_over_100k_appends() -> None:
    r = NumericRing(500)
    buf_before = r._buf
    nbytes = r.nbytes
    for k in range(100_000):
        r.append(float(k))
    assert len(r) == r.capacity == 500
    assert r._buf is buf_before and r.nbytes == nbytes
    np.testing.assert_array_equal(r.values(), np.arange(99_500, 100_000, dtype=float))


def test_object_ring_keeps_last_items_and_storage_is_flat() -> None:
    r: Ring[str] = Ring(3)
    assert r.items() == [] and r.last() is None
    buf = r._buf
    for k in range(100_000):
        r.append(str(k))
    assert len(r) == 3 and r.storage_len == 3 and r._buf is buf
    assert r.items() == ["99997", "99998", "99999"]
    assert list(r) == r.items()
    assert r.last() == "99999"
    r.clear()
    assert len(r) == 0 and r.items() == [] and r.storage_len == 3


def test_partial_object_ring() -> None:
    r: Ring[int] = Ring(5)
    r.append(1)
    r.append(2)
    assert r.items() == [1, 2]


@pytest.mark.parametrize("capacity", [0, -3])
def test_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError):
        NumericRing(capacity)
    with pytest.raises(ValueError):
        Ring(capacity)
