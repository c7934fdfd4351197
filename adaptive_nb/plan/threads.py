"""CPU allocation: adapt torch's intra-op thread count from measured step throughput.

Try each candidate thread count for a short window of steps, keep the best, hold unless a
change gains at least ``min_gain`` (5 %), and probe again when the machine's external CPU
load changes. Every decision is an event; when nothing is to be gained it says so and holds.

Probing costs training time (a candidate with fewer threads runs slower while measured);
on a short run that cost is the loop's whole overhead. So the first probe starts only once
its worst-case cost (in steps at the held count) is at most ``probe_budget`` (1 %) of the
run: of the expected steps when the run's length is known, else of the steps run so far (a
short run never probes). On an idle machine fewer threads than the usable cores cannot win
unless steps are tiny (per-op thread synchronisation), so they are not tried. What a probe
learned is remembered for the same model, batch size and cores (:mod:`.thread_probe`): the
same cell run again holds it at once. A sustained external load change re-probes, under the
same budget.

Why ~420 lines: the probe state machine and its decisions (events) are one class; the
candidate list, cost formula and learned-count memory already live in :mod:`.thread_probe`.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from collections.abc import Callable, Hashable

import torch
from torch import nn

from ..events import Event, EventKind
from ..monitor.snapshot import Snapshot
from ..step import StepOutcome
from .base import Controller
from .thread_probe import Learned, model_signature, probe_cost_steps, recall, remember
from .thread_probe import thread_candidates as thread_candidates

__all__ = ["ThreadController", "Workload", "thread_candidates"]

Workload = Callable[[], "tuple[nn.Module | None, int | None]"]
"""Returns the run's model and expected number of steps (either None when unknown); read
once, at the first step, because the controller is built before the run is."""


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
    ``probe_budget=None`` probes from the first step whatever the run's length (the
    behaviour before the budget existed; tests of the probe itself use it).
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
        probe_budget: float | None = 0.01,
        expected_steps: int | None = None,
        model: nn.Module | None = None,
        workload: Workload | None = None,
        use_memory: bool = True,
        idle_cores: float = 0.5,
        tiny_step_s: float = 0.002,
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
        self._budget = probe_budget
        self._expected = expected_steps
        self._model = model
        self._workload = workload
        self._use_memory = use_memory
        self._idle_cores = idle_cores
        self._tiny_step_s = tiny_step_s
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
        self._external_pct: float | None = None  # latest external load, % of the machine
        self._external_cores: float | None = None  # the same in cores
        self._pending_load_hits = 0
        self._events: list[Event] = []
        self._now = 0.0
        self._step = 0
        self.probes = 0
        # before the first probe: measure the held count and decide whether a probe pays
        self._steps_seen = 0
        self._waiting = policy != "static" and probe_budget is not None
        self._planned = False
        self._probe_at: int | None = None  # steps after which the first probe pays
        self._held_rates: deque[float] = deque(maxlen=self._window)
        self._held_wall: deque[float] = deque(maxlen=self._window)
        self._planned_candidates: list[int] | None = None
        self._key: Hashable | None = None
        self.decision = "static" if policy == "static" else "measuring"
        if self.policy != "static" and probe_budget is None:
            self._start_probe("start")

    # -- Controller interface ---------------------------------------------------------
    def observe(self, outcome: StepOutcome) -> None:
        self._steps_seen += 1
        if self._waiting:
            self._observe_waiting(outcome)
            return
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
        if snapshot is not None:
            self._read_load(snapshot)
            if self.policy != "static":
                self._watch_load()
        # decisions made between ticks are reported with this tick's time and step
        events = [Event(round(now, 3), e.kind, e.detail, step) for e in self._events]
        self._events = []
        return events

    def set_policy(self, policy: str, now: float, step: int) -> list[Event]:
        old, self.policy = self.policy, policy
        if policy == "static" and old != "static":
            self._queue = []
            self._probing = False
            self._waiting = False
            self._apply(self.original_threads)
            self._held = self.original_threads
            self.decision = "static"
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
            "thread_decision": self.decision,
            "thread_rates": {str(k): round(v, 2) for k, v in sorted(self._results.items())},
        }

    def restore(self) -> None:
        """Put the kernel's thread count back as it was before the run."""
        if self._get() != self.original_threads:
            self._set(self.original_threads)

    # -- before the first probe -----------------------------------------------------------
    def _observe_waiting(self, outcome: StepOutcome) -> None:
        """Measure the held count for free while deciding whether a probe would pay."""
        if self._steps_seen == 1:
            self._recall(outcome.samples)
            if not self._waiting:
                return
        if self._steps_seen > self._warmup and outcome.wall_s > 0:
            self._held_rates.append(outcome.samples / outcome.wall_s)
            self._held_wall.append(outcome.wall_s)
        if not self._planned and len(self._held_rates) >= self._window:
            self._plan()
        if self._probe_at is not None and self._steps_seen >= self._probe_at:
            rate = statistics.median(self._held_rates)
            self._start_probe("long enough to pay", self._planned_candidates, rate)

    def _recall(self, samples: int) -> None:
        """First step: the run's model and length are known now; hold a count learned
        earlier for the same model, batch size and cores, if any."""
        model, expected = self._model, self._expected
        if self._workload is not None:
            try:
                got_model, got_expected = self._workload()
            except Exception:  # diagnostics only: never fail a run over the cache key
                got_model, got_expected = None, None
            model = model if model is not None else got_model
            expected = expected if expected is not None else got_expected
        self._expected = expected
        if model is None or not self._use_memory:
            return
        self._key = (model_signature(model), int(samples), self._cores)
        known = recall(self._key)
        if known is None:
            return
        self._waiting = False
        self._apply(known.threads)
        self._held = known.threads
        self._probe_load = known.external_pct
        self.decision = "learned earlier"
        rates = ", ".join(f"{k} thr {v:.1f}/s" for k, v in known.rates)
        self._events.append(
            Event(
                self._now,
                EventKind.HOLD,
                f"holding {known.threads} threads: learned by an earlier run of this model in "
                f"this process ({rates}); probing again only if the CPU load changes",
                self._step,
            )
        )

    def _plan(self) -> None:
        """With the held count measured: which candidates could win, and after how many
        steps their worst-case cost is within the budget."""
        self._planned = True
        candidates = self._worth_trying()
        if not candidates:
            self._waiting = False
            self.decision = "nothing to try"
            why = (
                "the only choice on this machine"
                if len(thread_candidates(self._cores)) < 2
                else f"the machine is idle and {self._held} threads use all {self._cores} "
                "usable cores (fewer cannot be faster)"
            )
            self._events.append(
                Event(self._now, EventKind.HOLD, f"holding {self._held} threads: {why}", self._step)
            )
            return
        cost = probe_cost_steps(
            min(self._held, self._cores),
            candidates,
            window=self._window,
            warmup=self._warmup,
            early_stop=self._early_stop,
        )
        assert self._budget is not None
        pays_at = math.ceil(cost / self._budget) if self._budget > 0 else None
        if pays_at is not None and self._expected is not None and self._expected >= pays_at:
            pays_at = self._steps_seen  # a long run: probe now, the gain lasts longer
        self._probe_at = pays_at
        self._planned_candidates = candidates
        self.decision = "run too short to pay for a probe"

    def _worth_trying(self) -> list[int]:
        others = [c for c in thread_candidates(self._cores) if c != self._held]
        idle = self._external_cores is not None and self._external_cores < self._idle_cores
        tiny = bool(self._held_wall) and statistics.median(self._held_wall) < self._tiny_step_s
        if idle and not tiny:
            others = [c for c in others if c >= self._cores]
        return others

    # -- internals ----------------------------------------------------------------------
    def _start_probe(
        self, reason: str, candidates: list[int] | None = None, held_rate: float | None = None
    ) -> None:
        """Measure ``candidates`` (default: all); ``held_rate`` is the held count's rate when
        it was just measured under the same load (else it is measured first)."""
        self.probes += 1
        self._results = {}
        self._window_rates = []
        if held_rate is not None:
            self._results[self._held] = held_rate
        self._waiting = False
        self.decision = "probed"
        if candidates is None:
            candidates = thread_candidates(self._cores)
        # Measure the held count first, then the others nearest to it first.
        others = sorted(
            (c for c in candidates if c != self._held), key=lambda c: abs(c - self._held)
        )
        self._probing = True
        self._skip = self._warmup
        if self._held in self._results and others:  # already measured while waiting
            self._queue = others[1:]
            self._apply(others[0])
        else:
            self._queue = others
            self._apply(self._held)

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
        if self._key is not None and len(self._results) >= 2:
            memo = Learned(choice, self._probe_load, tuple(sorted(self._results.items())))
            remember(self._key, memo)

    def _apply(self, n: int) -> None:
        if n != self._current or self._get() != n:
            self._set(n)
        self._current = n

    def _read_load(self, snap: Snapshot) -> None:
        host = snap.host
        # cpu_pct is over every logical CPU of the machine, so our share of it is too (not
        # of the cores we may use: under a quota of 4 on 64 CPUs, 400 % is 6 % of the machine)
        logical = float(len(host.per_core_pct)) or max(host.cpu_cores, 1.0)
        ours = host.proc_cpu_pct / logical  # % of the whole machine
        self._external_pct = max(0.0, host.cpu_pct - ours)
        self._external_cores = self._external_pct * logical / 100.0

    def _watch_load(self) -> None:
        external = self._external_pct
        if external is None:
            return
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
                        f"external CPU load {before:.0f}% → {external:.0f}%: re-probing threads"
                        + ("" if self._budget is None else " once it can pay for itself"),
                        self._step,
                    )
                )
                self._reprobe()
        else:
            self._pending_load_hits = 0

    def _reprobe(self) -> None:
        """After a load change: probe again, under the same budget as the first probe (the
        held count is measured afresh under the new load meanwhile)."""
        if self._budget is None:
            self._start_probe("load changed")
            return
        self._probing = False
        self._queue = []
        self._waiting = True
        self._planned = False
        self._probe_at = None
        self._held_rates.clear()
        self._held_wall.clear()
