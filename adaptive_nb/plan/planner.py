"""Choose the device subset, per-device shares and micro-batch count that minimise the
predicted step time.

Model (the affine step-time model of heterogeneous data-parallel load balancing, as in
LB-BSP, SoCC 2020): device ``i`` computes ``b`` samples in ``α_i + β_i·b`` seconds; a
micro-step takes the slowest device plus a per-step overhead ``c0 + c1·(k−1)`` for ``k``
devices; ``m`` micro-batches cost ``m`` micro-steps. Each chunk must fit the device's cap
(samples per micro-step that fit its forecast free memory) and hold at least ``min_chunk``
samples (2 for a model with batch norm): a device that cannot get that many is left out of
the plan rather than given fewer. Subsets are enumerated for up to :data:`ENUMERATE_MAX`
devices (branch and bound: a subset whose lower bound, the continuous water-filling time,
cannot beat the best plan found is not solved; the result is the one full enumeration
gives); beyond that a greedy search adds devices by speed.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..layout import Plan, chunk_sizes, equal_split, micro_batch_sizes

__all__ = [
    "ENUMERATE_MAX",
    "DeviceModel",
    "Overhead",
    "best_plan",
    "evaluate",
    "micro_step_time",
    "plan_for_subset",
    "solve_split",
    "static_plan",
]

ENUMERATE_MAX = 8
_BIG = 1 << 40


@dataclass(frozen=True)
class DeviceModel:
    """What the planner knows about one device (seconds, samples)."""

    position: int
    alpha: float
    beta: float
    cap: int | None = None  # samples per micro-step that fit in memory (None: no limit)

    def time(self, b: int) -> float:
        return self.alpha + self.beta * b if b > 0 else 0.0

    @property
    def cap_or_big(self) -> int:
        return _BIG if self.cap is None else max(0, self.cap)


@dataclass(frozen=True)
class Overhead:
    """Per micro-step cost of running ``k`` devices together (scatter, gather, reduce)."""

    base: float = 0.0
    per_device: float = 0.0

    def __call__(self, k: int) -> float:
        return 0.0 if k <= 0 else max(0.0, self.base + self.per_device * (k - 1))


def solve_split(models: Sequence[DeviceModel], batch: int, min_chunk: int = 1) -> list[int] | None:
    """Integer chunks (one per model, each ≥ ``min_chunk`` and ≤ cap) that minimise the
    slowest device's time for ``batch`` samples; None when infeasible. Continuous
    water-filling (``T = (B + Σα/β)/Σ(1/β)``, clipped to caps) then an exact greedy
    finish."""
    k = len(models)
    low = max(1, int(min_chunk))
    if k == 0 or batch < k * low:
        return None
    caps = [m.cap_or_big for m in models]
    if any(c < low for c in caps) or sum(min(c, batch) for c in caps) < batch:
        return None
    lower = [float(low)] * k
    fixed: dict[int, float] = {}
    free = list(range(k))
    left = float(batch)
    while free:
        inv = sum(1.0 / max(models[i].beta, 1e-12) for i in free)
        tt = (left + sum(models[i].alpha / max(models[i].beta, 1e-12) for i in free)) / inv
        want = {i: (tt - models[i].alpha) / max(models[i].beta, 1e-12) for i in free}
        over = [i for i in free if want[i] > caps[i]]
        under = [i for i in free if want[i] < lower[i]]
        if not over and not under:
            fixed.update(want)
            break
        for i in over:
            fixed[i] = float(caps[i])
            left -= caps[i]
            free.remove(i)
        if not over:
            for i in under:
                fixed[i] = lower[i]
                left -= lower[i]
                free.remove(i)
    out = [max(low, min(caps[i], math.floor(fixed[i] + 1e-9))) for i in range(k)]
    while sum(out) > batch:  # floors of clipped values can overshoot by rounding; shave
        j = max((i for i in range(k) if out[i] > low), key=lambda i: models[i].time(out[i]))
        out[j] -= 1
    heap = [(models[i].time(out[i] + 1), i) for i in range(k) if out[i] < caps[i]]
    heapq.heapify(heap)
    rest = batch - sum(out)
    while rest > 0:
        if not heap:
            return None
        _, i = heapq.heappop(heap)
        out[i] += 1
        rest -= 1
        if out[i] < caps[i]:
            heapq.heappush(heap, (models[i].time(out[i] + 1), i))
    return out


def micro_step_time(models: Sequence[DeviceModel], chunks: Sequence[int]) -> float:
    return max((m.time(c) for m, c in zip(models, chunks, strict=True) if c > 0), default=0.0)


def plan_for_subset(
    models: Sequence[DeviceModel],
    subset: Sequence[int],
    n_positions: int,
    batch: int,
    overhead: Overhead,
    micro_batches: int,
    min_chunk: int = 1,
) -> Plan | None:
    """Best split of ``batch`` over ``subset`` (indices into ``models``; the first is the
    primary) with ``micro_batches`` micro-batches, or None when it does not fit (a chunk
    over a cap, or under ``min_chunk`` in some micro-batch)."""
    chosen = [models[i] for i in subset]
    sizes = micro_batch_sizes(batch, micro_batches)
    total = 0.0
    first: list[int] | None = None
    for size in sorted(set(sizes), reverse=True):
        chunks = solve_split(chosen, size, min_chunk)
        if chunks is None:
            return None
        if first is None:
            first = chunks
        total += sizes.count(size) * (micro_step_time(chosen, chunks) + overhead(len(chosen)))
    assert first is not None
    shares = [0.0] * n_positions
    caps: list[int | None] = [None] * n_positions
    big = sizes[0]
    for m, c in zip(chosen, first, strict=True):
        shares[m.position] = c / big
        caps[m.position] = m.cap
    return Plan(
        devices=tuple(m.position for m in chosen),
        shares=tuple(shares),
        micro_batches=len(sizes),
        batch=batch,
        predicted_step_s=total,
        caps=tuple(caps),
    )


def best_plan(
    models: Sequence[DeviceModel],
    n_positions: int,
    batch: int,
    overhead: Overhead,
    *,
    primary: int | None = None,
    subsets: Iterable[Sequence[int]] | None = None,
    max_micro_batches: int = 64,
    min_chunk: int = 1,
) -> Plan | None:
    """The plan with the lowest predicted step time.

    ``models`` are the candidate devices; ``primary`` (a position) must be in every subset
    and comes first; ``subsets`` (indices into ``models``) overrides the search. The
    fewest micro-batches that fit are used (one more is also tried). Every device of a
    plan gets at least ``min_chunk`` samples per micro-batch. None when the batch cannot
    fit even at ``max_micro_batches``.
    """
    if not models or batch <= 0:
        return None
    idx_primary = None
    if primary is not None:
        found = [i for i, m in enumerate(models) if m.position == primary]
        if not found:
            return None
        idx_primary = found[0]
    if subsets is not None:
        candidates = [list(s) for s in subsets]
    elif len(models) <= ENUMERATE_MAX:
        candidates = _all_subsets(len(models), idx_primary)
    else:
        candidates = []
    best: Plan | None = None
    m_fit: int | None = None
    for m in range(1, max_micro_batches + 1):
        if m_fit is not None and m > m_fit + 1:
            break
        if candidates:
            incumbent = math.inf if best is None else _t(best)
            found_plan = _best_of_subsets(
                models, candidates, n_positions, batch, overhead, m, min_chunk, incumbent
            )
        else:
            found_plan = _greedy(models, idx_primary, n_positions, batch, overhead, m, min_chunk)
        if found_plan is not None:
            m_fit = m if m_fit is None else m_fit
            if best is None or _t(found_plan) < _t(best):
                best = found_plan
        if m >= batch:
            break
    return best


def evaluate(
    plan: Plan,
    models: Sequence[DeviceModel],
    overhead: Overhead,
    batch: int | None = None,
    min_chunk: int = 1,
) -> float:
    """Predicted step time of an existing plan's shares under (new) models and caps, split
    as the engines split it (``min_chunk`` included); ``inf`` when a chunk no longer fits
    or a device is missing."""
    by_pos = {m.position: m for m in models}
    if any(p not in by_pos for p in plan.devices):
        return math.inf
    used = [by_pos[p] for p in plan.devices]
    caps: list[int | None] = [None] * len(plan.shares)
    for m in used:
        caps[m.position] = m.cap
    total = 0.0
    b = plan.batch if batch is None else batch
    for size in micro_batch_sizes(b, plan.micro_batches):
        try:
            chunks = chunk_sizes(
                plan.shares, size, caps, required=plan.primary, min_chunk=min_chunk
            )
        except ValueError:
            return math.inf
        k = sum(1 for p in plan.devices if chunks[p] > 0)
        total += max(by_pos[p].time(chunks[p]) for p in plan.devices) + overhead(k)
    return total


def static_plan(
    positions: Sequence[int],
    n_positions: int,
    batch: int,
    caps: Sequence[int | None] | None = None,
    max_micro_batches: int = 64,
) -> Plan | None:
    """Equal split over ``positions`` (first is the primary), the remainder to the first
    devices; the fewest micro-batches whose equal chunks fit ``caps`` (per position)."""
    if not positions:
        return None
    shares = [0.0] * n_positions
    for p in positions:
        shares[p] = 1.0 / len(positions)
    for m in range(1, max_micro_batches + 1):
        size = micro_batch_sizes(batch, m)[0]
        chunks = equal_split(size, len(positions))
        if caps is None or all(
            caps[p] is None or c <= (caps[p] or 0) for p, c in zip(positions, chunks, strict=True)
        ):
            return Plan(
                devices=tuple(positions),
                shares=tuple(shares),
                micro_batches=len(micro_batch_sizes(batch, m)),
                batch=batch,
            )
    return None


def _t(plan: Plan) -> float:
    return math.inf if plan.predicted_step_s is None else plan.predicted_step_s


def _lower_bound(
    chosen: Sequence[DeviceModel],
    sizes: Sequence[tuple[int, int]],
    overhead: Overhead,
    low: int,
) -> float:
    """A lower bound of :func:`plan_for_subset`'s predicted time over ``chosen``: per
    micro-batch of ``size`` (``count`` of them), the continuous optimum
    ``(size + Σα/β) / Σ(1/β)`` (caps and integers can only add to it) and no less than
    any device's time for ``low`` samples, plus the overhead."""
    inv = sum(1.0 / max(m.beta, 1e-12) for m in chosen)
    lead = sum(m.alpha / max(m.beta, 1e-12) for m in chosen)
    floor = max(m.alpha + m.beta * low for m in chosen)
    extra = overhead(len(chosen))
    return sum(count * (max((size + lead) / inv, floor) + extra) for size, count in sizes)


def _best_of_subsets(
    models: Sequence[DeviceModel],
    candidates: Sequence[Sequence[int]],
    n_positions: int,
    batch: int,
    overhead: Overhead,
    micro_batches: int,
    min_chunk: int,
    incumbent: float,
) -> Plan | None:
    """The best plan over ``candidates`` with ``micro_batches`` (the first of equal ones in
    ``candidates`` order, as a full scan finds it), solving subsets in order of their
    lower bound and stopping at the first bound above the best time found so far (or
    above ``incumbent``, a plan the caller already has: nothing above it matters)."""
    sizes = micro_batch_sizes(batch, micro_batches)
    counts = [(size, sizes.count(size)) for size in set(sizes)]
    low = max(1, int(min_chunk))
    bounds = sorted(
        (_lower_bound([models[i] for i in s], counts, overhead, low), j)
        for j, s in enumerate(candidates)
        if s
    )
    found: tuple[float, int, Plan] | None = None
    for bound, j in bounds:
        limit = min(incumbent, found[0] if found is not None else math.inf)
        if bound > limit * (1.0 + 1e-9):
            break
        plan = plan_for_subset(
            models, candidates[j], n_positions, batch, overhead, micro_batches, min_chunk
        )
        if plan is not None and (found is None or (_t(plan), j) < found[:2]):
            found = (_t(plan), j, plan)
    return None if found is None else found[2]


def _all_subsets(n: int, primary: int | None) -> list[list[int]]:
    others = [i for i in range(n) if i != primary]
    out: list[list[int]] = []
    for r in range(0 if primary is not None else 1, len(others) + 1):
        for combo in itertools.combinations(others, r):
            out.append(([primary] if primary is not None else []) + list(combo))
    return out


def _greedy(
    models: Sequence[DeviceModel],
    idx_primary: int | None,
    n_positions: int,
    batch: int,
    overhead: Overhead,
    micro_batches: int,
    min_chunk: int = 1,
) -> Plan | None:
    """Scalable search: add devices fastest first, keep the best prefix, then try
    dropping or adding single devices while that helps."""
    ref = max(1, batch // max(1, len(models)))
    order = sorted(range(len(models)), key=lambda i: models[i].time(ref))
    if idx_primary is not None:
        order.remove(idx_primary)
        order.insert(0, idx_primary)

    def plan_of(s: Sequence[int]) -> Plan | None:
        return plan_for_subset(models, s, n_positions, batch, overhead, micro_batches, min_chunk)

    best: Plan | None = None
    best_set: list[int] = []
    for k in range(1, len(order) + 1):
        p = plan_of(order[:k])
        if p is not None and (best is None or _t(p) < _t(best)):
            best, best_set = p, order[:k]
    if best is None:
        return None
    improved = True
    while improved:
        improved = False
        moves = [[i for i in best_set if i != j] for j in best_set if j != idx_primary]
        moves += [[*best_set, j] for j in order if j not in best_set]
        for s in moves:
            if not s or (idx_primary is not None and s[0] != idx_primary):
                continue
            p = plan_of(s)
            if p is not None and _t(p) < _t(best) * (1 - 1e-9):
                best, best_set, improved = p, s, True
                break
    return best
