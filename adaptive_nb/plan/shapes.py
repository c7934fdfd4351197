"""Stable per-device chunk shapes: fewer distinct chunk sizes per device.

Why: every new input shape a GPU sees re-runs cuDNN autotuning (``benchmark=True``) and
recompiles a ``torch.compile``d model, which can cost seconds, far more than the few percent a
perfectly proportional split saves. So the controller rounds each device's chunk to a multiple
of 8 (tensor-core friendly, and far fewer distinct values) and keeps a small set of sizes per
device, reusing one of them when that costs less than ``tolerance`` of the predicted step time.

Pure arithmetic, no torch: the caller passes ``cost`` (its own step-time prediction for a
chunk vector) and this module only searches chunk vectors that sum to the same total, respect
caps and ``min_chunk``, and keep 0 where the plan gives a device nothing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["ShapeMemory", "stable_chunks"]

MULTIPLE = 8
MAX_SIZES = 4
TOLERANCE = 0.02


@dataclass
class ShapeMemory:
    """The chunk sizes each device position has run (most recent last), at most
    ``max_sizes`` each unless a fault forced more."""

    max_sizes: int = MAX_SIZES
    seen: dict[int, list[int]] = field(default_factory=dict)

    def sizes(self, position: int) -> list[int]:
        return list(self.seen.get(position, []))

    def record(self, chunks: Sequence[int]) -> None:
        for p, c in enumerate(chunks):
            if c <= 0:
                continue
            have = self.seen.setdefault(p, [])
            if c in have:
                have.remove(c)
            have.append(c)


def _candidates(
    base: int, cap: int, min_chunk: int, seen: Sequence[int], full: bool, multiple: int
) -> list[int]:
    """Sizes one device may take instead of ``base``: its seen sizes, and (unless its set is
    full) ``base`` rounded down and up to the multiple."""
    out = set(seen)
    if not full:
        lo = (base // multiple) * multiple
        out.update({lo, lo + multiple, base})
    return sorted(c for c in out if max(1, min_chunk) <= c <= cap)


def stable_chunks(
    base: Sequence[int],
    caps: Sequence[int | None] | None,
    cost: Callable[[list[int]], float],
    memory: ShapeMemory | None = None,
    *,
    min_chunk: int = 1,
    multiple: int = MULTIPLE,
    tolerance: float = TOLERANCE,
    fault: bool = False,
) -> list[int]:
    """A chunk vector near ``base`` (the proportional split) with stable sizes.

    Every device with a non-zero chunk gets a size from its candidates (seen sizes, and the
    multiples of ``multiple`` around its base chunk while it has fewer than ``max_sizes``);
    one device (the absorber) takes whatever makes the sum exact. Among the vectors whose
    predicted cost is within ``tolerance`` of ``base``'s, the one adding the fewest new sizes
    wins, then the one with fewest sizes off the multiple, then the cheapest. When nothing
    qualifies, ``base`` is returned if a new size is allowed (a device with room in its set,
    or ``fault``), else the cheapest vector made of seen sizes. The result always sums to
    ``sum(base)``, respects caps and ``min_chunk``.
    """
    n = len(base)
    total = sum(base)
    active = [i for i in range(n) if base[i] > 0]
    if len(active) == 0 or total == 0:
        return list(base)
    cap = [_cap(caps, i) for i in range(n)]
    mem = memory or ShapeMemory()
    seen = {i: mem.sizes(i) for i in active}
    full = {i: len(seen[i]) >= mem.max_sizes and not fault for i in active}
    cands = {i: _candidates(base[i], cap[i], min_chunk, seen[i], full[i], multiple) for i in active}
    base_cost = cost(list(base))
    limit = base_cost * (1.0 + tolerance) if math.isfinite(base_cost) else math.inf

    best: tuple[int, int, float, list[int]] | None = None
    fallback: tuple[float, list[int]] | None = None
    tried: set[tuple[int, ...]] = set()  # one vector is reached from several absorbers
    for absorber in active:
        others = [i for i in active if i != absorber]
        # at most 3 candidates per device nearest its base chunk keep the search small
        near = [_nearest(cands[i], base[i]) for i in others]
        if any(not c for c in near):
            continue
        for combo in itertools.islice(itertools.product(*near), 729):
            rest = total - sum(combo)
            if not (max(1, min_chunk) <= rest <= cap[absorber]):
                continue
            vec = [0] * n
            for i, c in zip(others, combo, strict=True):
                vec[i] = c
            vec[absorber] = rest
            key = tuple(vec)
            if key in tried:
                continue
            tried.add(key)
            new = sum(1 for i in active if vec[i] not in seen[i])
            if any(full[i] and vec[i] not in seen[i] for i in active):
                continue
            t = cost(vec)
            if new == 0 and (fallback is None or t < fallback[0]):
                fallback = (t, vec)
            odd = sum(1 for i in active if vec[i] % multiple)
            if t <= limit and (best is None or (new, odd, t) < best[:3]):
                best = (new, odd, t, vec)
    if best is not None:
        return best[3]
    new_allowed = fault or all(not full[i] or base[i] in seen[i] for i in active)
    if new_allowed or fallback is None:
        return list(base)
    return fallback[1]


def _nearest(sizes: Sequence[int], target: int, k: int = 3) -> list[int]:
    return sorted(sizes, key=lambda c: (abs(c - target), c))[:k]


def _cap(caps: Sequence[int | None] | None, i: int) -> int:
    if caps is None or i >= len(caps) or caps[i] is None:
        return 1 << 62
    return max(0, int(caps[i]))  # type: ignore[arg-type]
