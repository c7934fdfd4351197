"""The benchmark's oracle: knows the fleet's true state at every step (speeds, slowdowns,
memory, failures; no noise) and picks the fastest way to run the global batch.

It is written independently of the planner (``plan/``): a planner bug cannot hide in
both. Its plan space is the one the engines can carry out, or wider: a primary device
(used in every micro-batch, paying ``primary_extra_ms`` / ``primary_extra_gb``), a
micro-batch count ``m`` (sizes as equal as possible), and for every micro-batch any
integer split over any subset of healthy devices that fits each device's true free
memory. A micro-step costs the slowest used device plus the communication of ``k`` used
devices; a step is the sum of its micro-steps.

Method (exact, for any number of devices): every device's time is non-decreasing in its
chunk, so for a threshold ``T`` device ``i`` can take at most ``cnt_i(T)`` samples without
exceeding ``T``; with ``k`` devices the most a micro-step can hold under ``T`` is the
primary's count plus the ``k − 1`` largest other counts. The best micro-step for ``s``
samples is therefore ``min over k`` of (the smallest device time ``T`` whose capacity
reaches ``s``) ``+ comm(k)``, and the optimum ``T`` is always one of the devices' own
times, so searching those values is exhaustive. ``tests/test_oracle.py`` checks it against
brute-force enumeration of subsets, primaries, micro-batch counts and integer splits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..sim.fleet import DeviceState, Fleet

__all__ = ["METHOD", "OraclePlan", "evaluate_layout", "oracle_plan"]

METHOD = "exact (threshold search over true device times; checked against brute force)"


@dataclass(frozen=True)
class OraclePlan:
    """The oracle's choice: ``layout[j][i]`` samples of micro-batch ``j`` on position
    ``i``, the primary, and the noise-free true step time in seconds."""

    primary: int
    layout: tuple[tuple[int, ...], ...]
    step_s: float

    @property
    def micro_batches(self) -> int:
        return len(self.layout)


def _cap(fleet: Fleet, i: int, st: DeviceState, primary: bool, batch: int) -> int:
    """The most samples device ``i`` holds in one micro-batch (exact float comparison, as
    the fleet's own out-of-memory test)."""
    avail = fleet.available_gb(i, st)
    if fleet.need_gb(1, primary) > avail:
        return 0
    per = fleet.scenario.job.mem_per_sample_gb
    if per <= 0:
        return batch
    c = min(batch, max(1, math.floor((avail - fleet.need_gb(0, primary)) / per)))
    while c > 1 and fleet.need_gb(c, primary) > avail:
        c -= 1
    while c < batch and fleet.need_gb(c + 1, primary) <= avail:
        c += 1
    return c


def _times(fleet: Fleet, i: int, st: DeviceState, primary: bool, cap: int) -> np.ndarray:
    """True milliseconds of chunks 1..cap on device ``i`` (non-decreasing)."""
    t = np.array([fleet.true_ms(i, b, primary, st) for b in range(1, cap + 1)], dtype=float)
    return np.maximum.accumulate(t) if t.size else t


def _comm_ms(fleet: Fleet, k: int) -> float:
    return 1000.0 * fleet.comm_s(k)


def _best_per_size(
    fleet: Fleet, tp: np.ndarray, others: list[np.ndarray], batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every micro-step size s = 1..batch: the best time (ms, inf if impossible), the
    device count and the threshold index behind it; also returns the candidate times."""
    cands = np.unique(np.concatenate([tp, *others]))
    cnt_p = np.searchsorted(tp, cands, side="right")
    if others:
        cnt_o = np.stack([np.searchsorted(t, cands, side="right") for t in others])
        cum = np.cumsum(-np.sort(-cnt_o, axis=0), axis=0)
    else:
        cum = np.zeros((0, cands.size), dtype=np.int64)
    first = int(np.searchsorted(cands, tp[0], side="left"))  # the primary must take >= 1
    sizes = np.arange(1, batch + 1)
    best = np.full(batch, np.inf)
    best_k = np.zeros(batch, dtype=np.int64)
    best_idx = np.zeros(batch, dtype=np.int64)
    for k in range(1, len(others) + 2):
        capacity = cnt_p + (cum[k - 2] if k >= 2 else 0)
        idx = np.maximum(first, np.searchsorted(capacity, sizes, side="left"))
        ok = idx < cands.size
        t = np.full(batch, np.inf)
        t[ok] = cands[idx[ok]] + _comm_ms(fleet, k)
        better = t < best
        best[better], best_k[better], best_idx[better] = t[better], k, idx[better]
    return best, best_k, best_idx, cands


def _split(
    s: int, threshold: float, primary: int, tp: np.ndarray, others: dict[int, np.ndarray], k: int
) -> dict[int, int]:
    """An integer split of ``s`` samples with every used device's time ``<= threshold``:
    the primary and the ``k − 1`` devices that hold most, trimmed from the slowest."""
    cnt = {primary: int(np.searchsorted(tp, threshold, side="right"))}
    ranked = sorted(
        ((int(np.searchsorted(t, threshold, side="right")), -i, i) for i, t in others.items()),
        reverse=True,
    )
    for c, _, i in ranked[: k - 1]:
        cnt[i] = c
    times = {primary: tp, **others}
    excess = sum(cnt.values()) - s
    heap = [(-times[i][c - 1], i) for i, c in cnt.items() if c > 0]
    heapq.heapify(heap)
    while excess > 0:
        _, i = heapq.heappop(heap)
        floor = 1 if i == primary else 0
        if cnt[i] <= floor:
            continue
        cnt[i] -= 1
        excess -= 1
        if cnt[i] > floor:
            heapq.heappush(heap, (-times[i][cnt[i] - 1], i))
    return {i: c for i, c in cnt.items() if c > 0}


def evaluate_layout(
    fleet: Fleet, states: Sequence[DeviceState], layout: Sequence[Sequence[int]], primary: int
) -> float:
    """Noise-free true seconds of a layout (inf if a chunk does not fit or hits a failed
    device, or the primary is left out of a micro-batch)."""
    total = 0.0
    for chunks in layout:
        used = [i for i, b in enumerate(chunks) if b > 0]
        if primary not in used:
            return math.inf
        worst = 0.0
        for i in used:
            st = states[i]
            if st.failed or fleet.need_gb(chunks[i], i == primary) > fleet.available_gb(i, st):
                return math.inf
            worst = max(worst, fleet.true_ms(i, chunks[i], i == primary, st))
        total += worst + _comm_ms(fleet, len(used))
    return total / 1000.0


def oracle_plan(fleet: Fleet, states: Sequence[DeviceState], batch: int) -> OraclePlan | None:
    """The fastest plan for the true state (None when the batch fits nowhere)."""
    healthy = [i for i, st in enumerate(states) if not st.failed]
    caps = {i: _cap(fleet, i, states[i], False, batch) for i in healthy}
    plain = {i: _times(fleet, i, states[i], False, caps[i]) for i in healthy}
    best: tuple[float, int, int] | None = None  # (ms, primary, m)
    tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    ms_all = np.arange(1, batch + 1)
    q, r = batch // ms_all, batch % ms_all
    for p in healthy:
        pcap = _cap(fleet, p, states[p], True, batch)
        if pcap == 0:
            continue
        tp = _times(fleet, p, states[p], True, pcap)
        others = [plain[i] for i in healthy if i != p and caps[i] > 0]
        f, ks, idx, cands = _best_per_size(fleet, tp, others, batch)
        tables[p] = (f, ks, idx, cands)
        fq = f[q - 1]
        fq1 = np.where(r > 0, f[np.minimum(q, batch - 1)], 0.0)
        step = r * fq1 + (ms_all - r) * fq
        m = int(np.argmin(step))
        if np.isfinite(step[m]) and (best is None or step[m] < best[0]):
            best = (float(step[m]), p, m + 1)
    if best is None:
        return None
    _, p, m = best
    pcap = _cap(fleet, p, states[p], True, batch)
    tp = _times(fleet, p, states[p], True, pcap)
    rest = {i: plain[i] for i in healthy if i != p and caps[i] > 0}
    f, ks, idx, cands = tables[p]
    base, rem = divmod(batch, m)
    by_size: dict[int, tuple[int, ...]] = {}
    layout = []
    for j in range(m):
        s = base + (1 if j < rem else 0)
        if s not in by_size:
            split = _split(s, float(cands[idx[s - 1]]), p, tp, rest, int(ks[s - 1]))
            by_size[s] = tuple(split.get(i, 0) for i in range(fleet.n))
        layout.append(by_size[s])
    return OraclePlan(p, tuple(layout), evaluate_layout(fleet, states, layout, p))
