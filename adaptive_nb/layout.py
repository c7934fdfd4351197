"""How one global batch is laid out over devices: the :class:`Plan` value (device set,
shares, micro-batches, primary) and the pure split arithmetic behind it (shares → chunk
sizes, micro-batch sizes, the equal split of plain DataParallel).

No torch: the planner chooses a ``Plan``; the engines (weighted DataParallel, simulated)
carry it out with these same functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Plan",
    "chunk_sizes",
    "enforce_min_chunk",
    "equal_split",
    "micro_batch_sizes",
    "nonzero_chunks",
]


@dataclass(frozen=True)
class Plan:
    """How to run one global batch. ``shares`` and ``caps`` are indexed by device position
    (0 for unused devices) and keep that indexing whichever device is the primary;
    ``devices`` lists the positions in use, primary first (the primary holds the
    parameters, gathers, computes the loss and steps the optimizer: a plan that names
    another one first moves it, see the engines' ``apply_plan``)."""

    devices: tuple[int, ...]
    shares: tuple[float, ...]
    micro_batches: int
    batch: int
    predicted_step_s: float | None = None
    caps: tuple[int | None, ...] = ()

    @property
    def primary(self) -> int:
        """The primary's position: the first of ``devices`` (one home for it, so that no
        field can disagree with the device order)."""
        return self.devices[0]

    def chunks(self, total: int | None = None) -> list[int]:
        """Per-position chunk sizes for one micro-batch of ``total`` samples (default: the
        planned micro-batch)."""
        size = total if total is not None else micro_batch_sizes(self.batch, self.micro_batches)[0]
        return chunk_sizes(self.shares, size, self.caps or None, required=self.primary)

    def layout(self, total: int) -> list[list[int]]:
        """Per-position chunks of every micro-batch for a batch of ``total`` samples (more
        micro-batches than planned when a bigger batch would not fit the caps)."""
        m = self.micro_batches
        if self.batch and total > self.batch:
            m = math.ceil(m * total / self.batch)
        while True:
            sizes = micro_batch_sizes(total, m)
            try:
                by_size = {s: self.chunks(s) for s in set(sizes)}
            except ValueError:
                if m >= total:
                    raise
                m += 1
                continue
            return [by_size[s] for s in sizes]


def chunk_sizes(
    shares: Sequence[float],
    total: int,
    caps: Sequence[int | None] | None = None,
    *,
    required: int | None = None,
    min_chunk: int = 1,
) -> list[int]:
    """Split ``total`` samples in proportion to ``shares`` (one per device position).

    The result has one entry per position, sums to ``total``, is 0 wherever the share is 0,
    never exceeds ``caps[i]`` (None: no cap) and rounds by largest remainder. ``required``
    names a position that must get at least one sample (the DataParallel primary).
    Raises ``ValueError`` when the caps of the devices with a share cannot hold ``total``.
    ``min_chunk`` (see :func:`enforce_min_chunk`): no device gets fewer samples than this
    unless caps leave no other way.
    """
    n = len(shares)
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if any(s < 0 or math.isnan(s) for s in shares):
        raise ValueError(f"shares must be non-negative, got {list(shares)}")
    cap = [_cap(caps, i) for i in range(n)]
    active = [i for i in range(n) if shares[i] > 0 and cap[i] > 0]
    if required is not None and required not in active:
        if not 0 <= required < n or cap[required] <= 0:
            raise ValueError(f"position {required} must get samples but has no capacity")
        active.append(required)
    out = [0] * n
    if total == 0:
        return out
    if not active:
        raise ValueError("no device has a positive share")
    if sum(min(cap[i], total) for i in active) < total:
        raise ValueError(f"caps {[cap[i] for i in active]} cannot hold {total} samples")
    weight = {i: max(shares[i], 1e-12) for i in active}
    # Water-fill: devices whose proportional amount exceeds their cap are fixed at the cap.
    ideal: dict[int, float] = {}
    free = list(active)
    left = float(total)
    while free:
        wsum = sum(weight[i] for i in free)
        over = [i for i in free if left * weight[i] / wsum > cap[i]]
        if not over:
            for i in free:
                ideal[i] = left * weight[i] / wsum
            break
        for i in over:
            ideal[i] = float(cap[i])
            left -= cap[i]
            free.remove(i)
    for i in active:
        out[i] = min(math.floor(ideal[i] + 1e-9), cap[i])
    rest = total - sum(out)
    order = sorted(active, key=lambda i: (-(ideal[i] - out[i]), i))
    while rest > 0:
        progressed = False
        for i in order:
            if rest == 0:
                break
            if out[i] < cap[i]:
                out[i] += 1
                rest -= 1
                progressed = True
        if not progressed:  # pragma: no cover - excluded by the capacity check above
            raise ValueError("caps cannot hold the batch")
    if required is not None and out[required] == 0:
        donor = max(active, key=lambda i: out[i])
        out[donor] -= 1
        out[required] = 1
    if min_chunk > 1:
        enforce_min_chunk(out, cap, required, min_chunk)
    return out


def enforce_min_chunk(
    out: list[int], cap: Sequence[int], required: int | None, min_chunk: int
) -> list[int]:
    """In place: every non-zero chunk becomes 0 or at least ``min_chunk`` samples.

    A chunk below the minimum (other than the ``required`` one) is dropped for this batch
    (that device skips the step) and its samples go to the largest chunks with room; the
    required position (the DataParallel primary) is then raised to the minimum with samples
    from the largest chunks that stay at or above it, or by absorbing a whole small one.
    Batch norm in training mode needs two samples per replica (``min_chunk=2``), and a
    replica of one sample is all launch overhead anyway. Where caps leave no room, a small
    chunk is kept (the caps are the harder limit)."""
    n = len(out)
    total = sum(out)
    for i in sorted(range(n), key=lambda i: (out[i], i)):
        if i == required or not 0 < out[i] < min_chunk:
            continue
        moved, out[i] = out[i], 0
        for j in sorted(range(n), key=lambda j: (-out[j], j)):
            if moved == 0 or out[j] == 0 or j == i:
                continue
            take = min(moved, cap[j] - out[j])
            out[j] += take
            moved -= take
        if moved and required is not None and out[required] == 0:
            take = min(moved, cap[required])
            out[required] += take
            moved -= take
        if moved:  # no room anywhere: keep the small chunk
            out[i] = moved
            break
    if required is not None:
        target = min(min_chunk, total, cap[required])
        while out[required] < target:
            donors = [j for j in range(n) if j != required and out[j] > min_chunk]
            if donors:
                donor = max(donors, key=lambda j: (out[j], -j))
                out[donor] -= 1
                out[required] += 1
                continue
            small = [j for j in range(n) if j != required and out[j] > 0]
            small = [j for j in small if out[required] + out[j] <= cap[required]]
            if not small:
                break
            j = min(small, key=lambda j: (out[j], j))
            out[required] += out[j]
            out[j] = 0
    return out


def equal_split(total: int, count: int) -> list[int]:
    """The split plain DataParallel users get: equal, the remainder to the first devices."""
    if count <= 0:
        raise ValueError("count must be positive")
    base, rem = divmod(total, count)
    return [base + (1 if i < rem else 0) for i in range(count)]


def micro_batch_sizes(total: int, micro_batches: int) -> list[int]:
    """Sizes of ``micro_batches`` near-equal micro-batches of ``total`` samples (no zeros)."""
    m = max(1, min(int(micro_batches), max(total, 1)))
    return [s for s in equal_split(total, m) if s > 0] or [0]


def nonzero_chunks(sizes: Sequence[int], order: Sequence[int]) -> tuple[list[int], list[int]]:
    """Positions (in ``order``) with a non-zero chunk, and their chunk sizes."""
    positions = [p for p in order if sizes[p] > 0]
    return positions, [int(sizes[p]) for p in positions]


def _cap(caps: Sequence[int | None] | None, i: int) -> int:
    if caps is None or i >= len(caps) or caps[i] is None:
        return 1 << 62
    return max(0, int(caps[i]))  # type: ignore[arg-type]
