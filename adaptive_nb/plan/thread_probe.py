"""The CPU thread probe's arithmetic and memory: which thread counts to try, what trying
them may cost at worst, and what probes learned in this process (so that running the same
cell again does not pay for the same probe again).

Learned counts are keyed by the model's signature (class and parameter shapes/dtypes, not
values, which training changes), the batch size and the usable cores: a different model,
batch or CPU quota is a different question. The external CPU load the probe ran under is
kept with the answer, so the controller can tell when it no longer holds.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "Learned",
    "forget_learned",
    "learned",
    "model_signature",
    "probe_cost_steps",
    "recall",
    "remember",
    "thread_candidates",
]


def thread_candidates(cores: int) -> list[int]:
    """Thread counts worth trying on ``cores`` usable cores: 1, powers of two, and all."""
    cores = max(1, int(cores))
    out = {1, cores}
    n = 2
    while n < cores:
        out.add(n)
        n *= 2
    if cores >= 6:
        out.add(cores // 2 + cores // 4)  # e.g. 6 of 8: leaves room for data loading
    return sorted(out)


def probe_cost_steps(
    held: int, candidates: list[int], *, window: int, warmup: int, early_stop: float
) -> float:
    """Worst-case cost of measuring ``candidates`` while ``held`` threads run, in steps of the
    held count. Fewer threads are assumed to scale perfectly (``held / c`` times slower, the
    worst a compute-bound step can do); more threads at most 2× slower (oversubscription).
    A candidate slower than ``early_stop`` × the held rate is dropped after ``warmup + 2``
    steps; one not that slow runs a full window but loses at most ``1 / early_stop - 1``."""
    cost = 0.0
    full, cut = warmup + window, warmup + 2
    limit = 1.0 / early_stop  # slower than this and it is cut short
    for c in candidates:
        worst = held / c if c < held else 2.0
        cut_short = cut * (worst - 1.0) if worst > limit else 0.0
        full_window = full * (min(worst, limit) - 1.0)
        cost += max(cut_short, full_window)
    return cost


@dataclass(frozen=True)
class Learned:
    """A thread count a probe chose, the external load (% of the machine) it was measured
    under (None when there was no monitor), and the rates it measured (threads, samples/s)."""

    threads: int
    external_pct: float | None
    rates: tuple[tuple[int, float], ...]


_learned: dict[Hashable, Learned] = {}
_lock = threading.Lock()


def model_signature(model: nn.Module) -> tuple[object, ...]:
    """What identifies "the same model" across runs: class and parameter names, shapes and
    dtypes."""
    params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())
    return (type(model).__module__, type(model).__qualname__, params)


def recall(key: Hashable) -> Learned | None:
    with _lock:
        return _learned.get(key)


def remember(key: Hashable, what: Learned) -> None:
    with _lock:
        _learned[key] = what


def learned() -> dict[Hashable, Learned]:
    """A copy of everything learned in this process (for tests and diagnostics)."""
    with _lock:
        return dict(_learned)


def forget_learned() -> None:
    """Forget every learned thread count (the next run of each model probes again)."""
    with _lock:
        _learned.clear()
