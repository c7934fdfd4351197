"""CPU allocation: adapt torch's intra-op thread count from measured step throughput.

Try each candidate thread count for a short window of steps, keep the best, hold unless a
change gains at least ``min_gain`` (5 %), and probe again when the machine's external CPU
load changes. Every decision is an event; when nothing is to be gained it says so and holds.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable

import torch

from ..events import Event, EventKind
from ..monitor.snapshot import Snapshot
from ..step import StepOutcome
from .base import Controller

__all__ = ["ThreadController", "thread_candidates"]


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


def _usable_cores() -> int:
    """Whole cores this process may use: the CPU affinity set, the container's cgroup CPU
    quota (``docker --cpus=4`` on a 64-core host: 4) and the logical CPU count."""
    try:
        from ..monitor.host import _affinity_count, read_cgroup_limits, usable_cores

        return max(1, math.floor(usable_cores(read_cgroup_limits(), _affinity_count())))
    except Exception:  # pragma: no cover - limits unreadable: affinity, then all CPUs
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1


class ThreadController(Controller):
    """Chooses ``torch.set_num_threads`` for CPU training.

    ``window`` steps (after ``warmup`` discarded steps) measure each candidate; the
    measure is the median samples/s of the window, so one slow step does not decide.
    """

    def __init__(
        self,
        *,
        policy: str = "adaptive",
        cores: int | None = None,
        window: int = 6,
        warmup: int = 1,
        min_gain: float = 0.05,
        load_change_pct: float = 25.0,
        early_stop: float = 0.75,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        get_threads: Callable[[], int] = torch.get_num_threads,
    ) -> None:
        self.policy = policy
        self._cores = cores if cores is not None else _usable_cores()
        self._window = max(2, window)
        self._warmup = max(0, warmup)
        self._min_gain = min_gain
        self._load_change = load_change_pct
        self._early_stop = early_stop
        self._set = set_threads
        self._get = get_threads
        self.original_threads = get_threads()
        self._current = self.original_threads
        self._held = self._current
        self._queue: list[int] = []  # candidates still to try in this probe
        self._probing = False
        self._results: dict[int, float] = {}
        self._window_rates: list[float] = []
        self._skip = self._warmup
        self._probe_load: float | None = None  # external load when the last probe began
        self._pending_load_hits = 0
        self._events: list[Event] = []
        self._now = 0.0
        self._step = 0
        self.probes = 0
        if self.policy != "static":
            self._start_probe("start")

    # -- Controller interface ---------------------------------------------------------
    def observe(self, outcome: StepOutcome) -> None:
        if not self._probing:
            return
        if self._skip > 0:
            self._skip -= 1
            return
        if outcome.wall_s > 0:
            self._window_rates.append(outcome.samples / outcome.wall_s)
        if len(self._window_rates) >= self._window or self._clearly_slower():
            self._results[self._current] = statistics.median(self._window_rates)
            self._window_rates = []
            self._advance()

    def _clearly_slower(self) -> bool:
        """A candidate whose first steps all run far slower than the held count is not
        worth a full window (probing costs training time)."""
        held = self._results.get(self._held)
        if held is None or self._current == self._held or len(self._window_rates) < 2:
            return False
        return max(self._window_rates) < self._early_stop * held

    def tick(self, now: float, step: int, snapshot: Snapshot | None) -> list[Event]:
        self._now, self._step = now, step
        if snapshot is not None and self.policy != "static":
            self._watch_load(snapshot)
        # decisions made between ticks are reported with this tick's time and step
        events = [Event(round(now, 3), e.kind, e.detail, step) for e in self._events]
        self._events = []
        return events

    def set_policy(self, policy: str, now: float, step: int) -> list[Event]:
        old, self.policy = self.policy, policy
        if policy == "static" and old != "static":
            self._queue = []
            self._probing = False
            self._apply(self.original_threads)
            self._held = self.original_threads
            return [
                Event(
                    now, EventKind.THREADS, f"static: back to {self.original_threads} threads", step
                )
            ]
        if policy != "static" and old == "static":
            self._now, self._step = now, step
            self._start_probe("policy changed to adaptive")
        return []

    def threads(self) -> int | None:
        return self._current

    def shares(self) -> dict[str, float]:
        return {"cpu": 1.0}

    def summary(self) -> dict[str, object]:
        return {
            "threads": self._current,
            "threads_original": self.original_threads,
            "thread_probes": self.probes,
            "thread_rates": {str(k): round(v, 2) for k, v in sorted(self._results.items())},
        }

    def restore(self) -> None:
        """Put the kernel's thread count back as it was before the run."""
        if self._get() != self.original_threads:
            self._set(self.original_threads)

    # -- internals ----------------------------------------------------------------------
    def _start_probe(self, reason: str) -> None:
        self.probes += 1
        self._results = {}
        self._window_rates = []
        candidates = thread_candidates(self._cores)
        # Measure the held count first, then the others nearest to it first.
        others = sorted(
            (c for c in candidates if c != self._held), key=lambda c: abs(c - self._held)
        )
        self._queue = others
        self._probing = True
        self._apply(self._held)
        self._skip = self._warmup

    def _advance(self) -> None:
        if self._queue:
            nxt = self._queue.pop(0)
            self._apply(nxt)
            self._skip = self._warmup
            return
        self._decide()

    def _decide(self) -> None:
        self._probing = False
        held_rate = self._results.get(self._held)
        best = max(self._results, key=lambda k: self._results[k])
        best_rate = self._results[best]
        rates = ", ".join(f"{k} thr {v:.1f}/s" for k, v in sorted(self._results.items()))
        if held_rate is None or best == self._held:
            choice = self._held if held_rate is not None else best
            gain = 0.0
        else:
            gain = best_rate / held_rate - 1.0
            choice = best if gain >= self._min_gain else self._held
        self._apply(choice)
        if choice != self._held:
            detail = f"{self._held} → {choice} threads (+{100 * gain:.0f}% samples/s; {rates})"
            self._events.append(Event(self._now, EventKind.THREADS, detail, self._step))
        else:
            if len(self._results) < 2:
                why = "the only choice on this machine"
            elif best == choice:
                why = "the fastest of those tried"
            else:
                why = (
                    f"{best} threads would gain only {100 * gain:+.0f}% "
                    f"(< {100 * self._min_gain:.0f}%), not worth a change"
                )
            detail = f"holding {choice} threads: {why} ({rates})"
            self._events.append(Event(self._now, EventKind.HOLD, detail, self._step))
        self._held = choice

    def _apply(self, n: int) -> None:
        if n != self._current or self._get() != n:
            self._set(n)
        self._current = n

    def _watch_load(self, snap: Snapshot) -> None:
        host = snap.host
        # cpu_pct is over every logical CPU of the machine, so our share of it is too (not
        # of the cores we may use: under a quota of 4 on 64 CPUs, 400 % is 6 % of the machine)
        logical = float(len(host.per_core_pct)) or max(host.cpu_cores, 1.0)
        ours = host.proc_cpu_pct / logical  # % of the whole machine
        external = max(0.0, host.cpu_pct - ours)
        if self._probe_load is None:
            self._probe_load = external
            return
        if self._probing:  # the probe itself changes our load
            self._probe_load = external
            return
        if abs(external - self._probe_load) >= self._load_change:
            self._pending_load_hits += 1
            if self._pending_load_hits >= 2:  # sustained over two ticks
                before = self._probe_load
                self._probe_load = external
                self._pending_load_hits = 0
                self._events.append(
                    Event(
                        self._now,
                        EventKind.NOTICE,
                        f"external CPU load {before:.0f}% → {external:.0f}%: re-probing threads",
                        self._step,
                    )
                )
                self._start_probe("load changed")
        else:
            self._pending_load_hits = 0
