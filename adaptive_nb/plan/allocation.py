"""The GPU allocation controller: which devices a run uses and how much of each batch each
one gets, re-decided every control tick from online models and forecasts.

Policies: ``adaptive`` (device set + shares), ``weights`` (all devices, shares adapt),
``static`` (all devices, equal split: what plain ``nn.DataParallel`` does).

Why one file of ~760 lines: the controller is one state machine (measurements, forecasts,
re-plans, fault recovery, probes) whose methods share its per-device state; the parts that
stand alone already live beside it (``device_state``, ``plan_edits``, ``probe``,
``static_compare``, ``planner``). Splitting the class itself would scatter one decision over
several files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math

from ..errors import DeviceFailure, OutOfMemory
from ..events import Event, EventKind
from ..layout import Plan, micro_batch_sizes
from ..monitor.snapshot import GpuSample, Snapshot, SnapshotSource
from ..policies import POLICIES
from ..predict import Holt, MapeTracker, MemoryModel, StepTimeModel
from ..predict.memory import ReserveSlack
from ..step import StepOutcome
from .base import Controller
from .device_state import AllocatableEngine, DeviceState
from .plan_edits import add_micro_batch, gain_text, same_layout, with_prediction
from .planner import DeviceModel, Overhead, best_plan, evaluate, static_plan
from .primary import MoveCost, move_pays, start_primary
from .probe import Readmission, probe_plan
from .shapes import ShapeMemory, stable_chunks
from .static_compare import StaticComparison

__all__ = ["AllocatableEngine", "AllocationController"]

log = logging.getLogger(__name__)


class AllocationController(Controller):
    """Chooses device subset, shares and micro-batches for an :class:`AllocatableEngine`.

    Every step :meth:`observe` updates per-device step-time models (RLS with forgetting),
    the memory model and the overhead estimate. Every tick it updates Holt forecasts of
    external load and memory from the snapshot and re-plans; a plan is applied only when
    its predicted gain is at least ``min_gain`` (device-set changes at most every
    ``set_change_interval`` seconds), except after faults, which re-plan at once.

    The primary (``primary``: a position, or None to choose it, see :mod:`.primary`) is
    the plan's first device. With an engine that can move it (``movable_primary``), the
    controller chooses it at the start and moves it between steps when a measured gain
    pays for the copy (:func:`.primary.move_pays`); its loss and optimizer phases are
    modelled apart from its compute so that they can be charged to another device.
    """

    stable_shapes: bool = True  # round chunks to stable sizes (plan/shapes.py); False: exact

    def __init__(
        self,
        engine: AllocatableEngine,
        *,
        policy: str = "adaptive",
        headroom: float = 0.1,
        control_interval: float = 2.0,
        snapshots: SnapshotSource | None = None,
        min_gain: float = 0.05,
        set_change_interval: float = 30.0,
        volatility_window: float = 30.0,
        forgetting: float = 0.9,
        primary: int | None = None,
        primary_payback_s: float = 60.0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.engine = engine
        self.policy = policy
        self.headroom = float(headroom)
        self.control_interval = float(control_interval)
        self.snapshots = snapshots
        self.min_gain = float(min_gain)
        self.set_change_interval = float(set_change_interval)
        self.volatility_window = float(volatility_window)
        self._forgetting = forgetting
        self.movable_primary = bool(getattr(engine, "movable_primary", False))
        self.primary_payback_s = float(primary_payback_s)
        self.primary_interval = self.set_change_interval  # seconds between primary moves
        self.move_cost = MoveCost()
        self.primary_moves = 0
        self._last_primary_move = -math.inf
        self._extra_s: float | None = None  # the primary's loss + optimizer s per step
        names = engine.device_names()
        keys = engine.monitor_keys()
        self.devices = [
            DeviceState(i, names[i], keys[i] if i < len(keys) else None, StepTimeModel(forgetting))
            for i in range(len(names))
        ]
        self.memory = MemoryModel()
        self.slack = ReserveSlack()
        self.readmission = Readmission(len(self.devices))
        self.mape = MapeTracker()
        self._overhead_obs: dict[int, float] = {}
        self._batch = 0
        self._now = 0.0
        self._last_set_change = -math.inf
        self._last_hold = -math.inf
        self._predicted: float | None = None
        self._predicted_batch = 0  # the batch size the prediction is for
        self._oom_pending = 0
        self.oom_recovered = 0
        self.failures = 0
        self.replans = 0
        self.static = StaticComparison()  # the equal split users have today, predicted
        self._notices: list[Event] = []  # found while reading a snapshot, told at the tick
        self._unlisted_noted: set[int] = set()  # positions told about a PID namespace
        self.shapes = ShapeMemory()  # chunk sizes each device has run (see plan/shapes.py)
        self._fault = False  # a fault is re-planning: a new chunk size is allowed
        if primary is None:
            primary = self._start_primary() if self.movable_primary else 0
        self.primary = primary
        positions = [primary] + [d.position for d in self.devices if d.position != primary]
        first = static_plan(positions, len(positions), 0)
        assert first is not None
        self.plan: Plan = first
        self.engine.apply_plan(self.plan)

    # -- measurements -------------------------------------------------------------------
    def observe(self, outcome: StepOutcome) -> None:
        if outcome.samples > 0:
            self._batch = outcome.samples
        if self._oom_pending:
            self.oom_recovered += self._oom_pending
            self._oom_pending = 0
        m = max(1, outcome.micro_batches)
        if (
            self._predicted is not None
            and outcome.device_time_s
            and outcome.samples == self._predicted_batch
        ):
            self.mape.add(self._predicted, outcome.wall_s)
        slowest = 0.0
        used = 0
        for pos, t in outcome.device_time_s.items():
            b = outcome.device_batch.get(pos, 0) / m
            if b <= 0 or t <= 0 or not 0 <= pos < len(self.devices):
                continue
            slowest = max(slowest, t / m)  # with the primary's extra: the step waits for it
            if pos == self.primary and outcome.device_phase_s.get(pos):
                t = self._note_extra(t, outcome.device_phase_s[pos])
            d = self.devices[pos]
            if pos == self.readmission.active and d.best is not None:
                self.readmission.record(t / m / (d.best[0] + d.best[1] * b))
            else:
                d.time_model.update(b, t / m)
            used += 1
        if used and outcome.wall_s > 0:
            over = max(0.0, outcome.wall_s / m - slowest)
            prev = self._overhead_obs.get(used)
            self._overhead_obs[used] = over if prev is None else 0.8 * prev + 0.2 * over
        # Demand is peak *allocated* when the engine measured it: the reserved high-water
        # mark stays up after a chunk shrinks (the cache keeps its blocks), so fitting it
        # would flatten the slope and over-fill the next larger chunk.
        demand = outcome.peak_alloc_mb or outcome.peak_mem_mb
        for pos, mb in demand.items():
            b = outcome.device_batch.get(pos, 0) / m
            if b > 0:
                self.memory.update(b, mb, pos == self.primary)
                reserved = outcome.reserved_mb.get(pos, outcome.peak_mem_mb.get(pos))
                if outcome.peak_alloc_mb and reserved is not None:
                    self.slack.update(pos, mb, reserved)

    def _note_extra(self, t: float, phases: dict[str, float]) -> float:
        """The primary's compute seconds (``t`` less its loss and optimizer phases, which
        are tracked apart as the extra a primary does, so that the planner can charge them
        to another device)."""
        extra = phases.get("loss", 0.0) + phases.get("optimizer", 0.0)
        if extra <= 0 or extra >= t:
            return t
        self._extra_s = extra if self._extra_s is None else 0.8 * self._extra_s + 0.2 * extra
        return t - extra

    # -- ticks ----------------------------------------------------------------------------
    def tick(self, now: float, step: int, snapshot: Snapshot | None) -> list[Event]:
        self._now = now
        self._read_snapshot(now, snapshot)
        told = [Event(e.t, e.kind, e.detail, step) for e in self._notices]
        self._notices.clear()
        ref = self._ref_batch()
        for d in self.devices:
            if d.position == self.readmission.active:
                continue
            if d.position in self.plan.devices and d.time_model.ready:
                a, b = d.time_model.alpha, d.time_model.beta
                d.history.append((now, a, b))
                if d.best is None or a + b * ref < d.best[0] + d.best[1] * ref:
                    d.best = (a, b)
        if self._batch <= 0:
            return told
        if self.readmission.active is not None:
            return told + (self._end_probe(now, step) if self.readmission.ready(now) else [])
        events = self._replan(now, step, forced=False)
        if not any(e.kind in (EventKind.DEVICES, EventKind.DEVICE_READMITTED) for e in events):
            events += self._consider_primary(now, step)
        if not any(e.kind in (EventKind.DEVICES, EventKind.DEVICE_READMITTED) for e in events):
            events += self._start_probe(now, step)
        return told + events

    def _read_snapshot(self, now: float, snapshot: Snapshot | None) -> None:
        if snapshot is None:
            return
        by_key = {g.index: g for g in snapshot.gpus if g.index is not None}
        for d in self.devices:
            g: GpuSample | None = by_key.get(d.key) if d.key is not None else None
            if g is None:
                if d.key is not None and snapshot.gpus:
                    d.missing = True
                continue
            d.missing = False
            d.total_mb = g.mem_total_mb
            self._note_unlisted(d, g, now)
            d.ext_mem.update(now, g.external_mem_mb)
            if d.position not in self.plan.devices:  # our run is not on it: util is external
                u = min(1.0, max(0.0, g.util_pct / 100.0))
                d.util.update(now, u)
                d.util_seen.append((now, u))
            avail = self._available_mb(d)
            if (
                d.oom_cap is not None
                and avail is not None
                and d.oom_avail_mb is not None
                and avail > d.oom_avail_mb + max(512.0, 0.05 * (d.total_mb or 0.0))
            ):
                d.oom_cap = None  # memory was released since the OOM: lift the cap
                d.oom_avail_mb = None

    def _note_unlisted(self, d: DeviceState, g: GpuSample, now: float) -> None:
        """PID matching is only a cross-check of the allocator's count: say once per device
        when NVML attributes much less to our PID than we hold (a PID namespace)."""
        own = g.own_mem_mb
        if own is None or d.position in self._unlisted_noted:
            return
        if g.unlisted_own_mem_mb > max(512.0, 0.5 * own):
            self._unlisted_noted.add(d.position)
            self._notices.append(
                Event(
                    now,
                    EventKind.NOTICE,
                    f"{d.name}: NVML does not list {g.unlisted_own_mem_mb / 1024:.1f} GB of this "
                    "run's memory under its process ID (a container's PID namespace?); "
                    "counting it from the CUDA allocator, not as another job's",
                )
            )

    # -- models for the planner -----------------------------------------------------------
    def _available_mb(self, d: DeviceState) -> float | None:
        """Memory this run may use on the device: total minus the external forecast."""
        if d.total_mb is None or d.ext_mem.level is None:
            return None
        ext = max(d.ext_mem.last or 0.0, d.ext_mem.forecast(2 * self.control_interval) or 0.0)
        return max(0.0, d.total_mb - ext)

    def reserve_margin_mb(self) -> float:
        """Memory kept free beyond the modelled demand for the caching allocator's slack
        (:class:`~adaptive_nb.predict.memory.ReserveSlack`); 0 until the engine reports
        allocator figures (the demand then is the reserved peak, slack included)."""
        return self.slack.margin_mb()

    def _cap(self, d: DeviceState, primary: bool | None = None) -> int | None:
        """Samples per micro-step that fit on ``d`` (as the primary or not; default: as it
        is now)."""
        cap = d.oom_cap
        avail = self._available_mb(d)
        if avail is not None and self.memory.ready:
            room = avail * (1.0 - self.headroom) - self.reserve_margin_mb()
            is_primary = d.position == self.primary if primary is None else primary
            fit = self.memory.max_samples(room, is_primary)
            cap = fit if cap is None else min(cap, fit)
        return cap

    def _ref_batch(self) -> float:
        """A chunk size at which device speeds are compared (an equal share)."""
        return max(1.0, (self._batch or self.plan.batch or 1) / max(1, len(self.devices)))

    def _volatile(self, d: DeviceState, now: float) -> bool:
        """Load that switches on and off: in the window, the speed (at the reference chunk)
        jumped up and down and up again (one job arriving and leaving is not volatile)."""
        ref = self._ref_batch()
        times = [a + b * ref for t, a, b in d.history if t >= now - self.volatility_window]
        signs = [
            1 if y > x else -1 for x, y in itertools.pairwise(times) if abs(math.log(y / x)) > 0.22
        ]
        reversals = sum(1 for x, y in itertools.pairwise(signs) if x != y)
        return reversals >= 2

    def _external_util(self, d: DeviceState, now: float) -> float | None:
        """External load on a device: measured slowdown when in use, NVML when not."""
        if d.position in self.plan.devices:
            if d.best is None or not d.time_model.ready:
                return None
            ref = self._ref_batch()
            return max(0.0, 1.0 - (d.best[0] + d.best[1] * ref) / d.time_model.predict(ref))
        return d.util.forecast(self.control_interval)

    def _model(self, d: DeviceState, now: float, primary: int | None = None) -> DeviceModel | None:
        """What the planner knows of ``d`` with ``primary`` (default: the current one) as
        the primary: its compute model, plus the primary's measured loss and optimizer
        seconds when it is the primary, and its memory cap as such."""
        is_primary = d.position == (self.primary if primary is None else primary)
        m = self._compute_model(d, now, self._cap(d, is_primary))
        if m is None or not is_primary or not self._extra_s:
            return m
        extra = self._extra_s / max(1, self.plan.micro_batches)
        return dataclasses.replace(m, alpha=m.alpha + extra)

    def _compute_model(self, d: DeviceState, now: float, cap: int | None) -> DeviceModel | None:
        tm = d.time_model
        probing = d.position == self.readmission.active
        if (d.position in self.plan.devices and not probing) or d.best is None:
            if not tm.ready and d.seed is not None:  # back in after a probe: what it measured
                return DeviceModel(d.position, *d.seed, cap)
            if not tm.ready:
                ready = [x.time_model for x in self.devices if x.time_model.ready]
                if not ready:
                    return None
                a = sum(t.alpha for t in ready) / len(ready)
                b = sum(t.beta for t in ready) / len(ready)
                return DeviceModel(d.position, a, b, cap)
            a, b = tm.alpha, tm.beta
            if self._volatile(d, now):  # load switching on and off: plan for the slow state
                ref = self._ref_batch()
                recent = [h for h in d.history if h[0] >= now - self.volatility_window]
                _, a, b = max(recent, key=lambda h: h[1] + h[2] * ref)
            return DeviceModel(d.position, a, b, cap)
        # Left out (or on probe): its unloaded speed times the slowdown a probe measured;
        # NVML's load forecast is the prior, and may only show the device freer than that.
        a, b = d.best
        slow = self.readmission.measured(d.position)
        u = d.util.forecast(self.control_interval)
        if u is not None:
            seen = [v for t, v in d.util_seen if t >= now - self.volatility_window]
            if len(seen) >= 3 and max(seen) - min(seen) > 0.3:
                u = max(u, *seen)
            prior = 1.0 / max(1e-3, 1.0 - min(u, 0.999))
            slow = prior if slow is None else min(slow, prior)
        if slow is None:  # no probe, no NVML: as last measured in use
            a, b, slow = tm.alpha, tm.beta, 1.0
        return DeviceModel(d.position, a * slow, b * slow, cap)

    def _overhead(self) -> Overhead:
        obs = self._overhead_obs
        if not obs:
            return Overhead()
        if len(obs) >= 2:
            ks = sorted(obs)
            k0, k1 = ks[0], ks[-1]
            slope = max(0.0, (obs[k1] - obs[k0]) / (k1 - k0))
            return Overhead(base=obs[k0] - slope * (k0 - 1), per_device=slope)
        ((k, o),) = obs.items()
        per = o / k  # one device count seen: assume overhead grows in proportion to k
        return Overhead(base=per, per_device=per)

    # -- planning -------------------------------------------------------------------------
    def _min_chunk(self) -> int:
        """The fewest samples the engine gives a device (2 with batch norm): plans leave
        out a device that cannot get that many rather than give it fewer."""
        return max(1, int(getattr(self.engine, "effective_min_chunk", 1) or 1))

    def _candidates(self) -> list[DeviceState]:
        return [d for d in self.devices if d.enabled and not d.failed]

    def _replan(self, now: float, step: int, *, forced: bool, cause: str = "") -> list[Event]:
        self._predicted_batch = self._batch
        cands = self._candidates()
        if not any(d.position == self.primary for d in cands):
            return []
        batch = self._batch
        n = len(self.devices)
        overhead = self._overhead()
        mc = self._min_chunk()
        models = {d.position: self._model(d, now) for d in cands}
        usable = [m for m in models.values() if m is not None]
        if self.policy == "static" or len(usable) < len(cands):
            positions = [self.primary] + [d.position for d in cands if d.position != self.primary]
            caps: list[int | None] = [None] * n
            for d in cands:
                caps[d.position] = d.oom_cap
            new = static_plan(positions, n, batch, caps)
            if new is None:
                return []
            if len(usable) == len(cands):
                new = with_prediction(new, evaluate(new, usable, overhead, min_chunk=mc))
            self._predicted = new.predicted_step_s
            if same_layout(new, self.plan):
                self.plan = new
                return []
            return self._apply(new, now, step, cause or "equal split")
        ordered = sorted(usable, key=lambda m: (m.position != self.primary, m.position))
        self.static.record(self.plan, ordered, n, batch, overhead)
        in_use = [i for i, m in enumerate(ordered) if m.position in self.plan.devices]
        set_ok = forced or now - self._last_set_change >= self.set_change_interval
        if self.policy == "weights":
            subsets: list[list[int]] | None = [list(range(len(ordered)))]
        elif set_ok:
            subsets = None
        else:
            subsets = [in_use] if in_use and in_use[0] == 0 else None
        new_plan = best_plan(
            ordered, n, batch, overhead, primary=self.primary, subsets=subsets, min_chunk=mc
        )
        if new_plan is None and subsets is not None and self.policy != "weights":
            new_plan = best_plan(ordered, n, batch, overhead, primary=self.primary, min_chunk=mc)
        current = evaluate(self.plan, ordered, overhead, batch, mc)
        if new_plan is None:
            self._predicted = None if math.isinf(current) else current
            return (
                [
                    Event(
                        now,
                        EventKind.NOTICE,
                        f"batch {batch} does not fit the devices' memory "
                        "even with micro-batches; keeping the current plan",
                        step,
                    )
                ]
                if forced
                else []
            )
        new_t = new_plan.predicted_step_s or math.inf
        gain = 1.0 - new_t / current if current > 0 and not math.isinf(current) else 1.0
        if forced or math.isinf(current) or gain >= self.min_gain:
            if same_layout(new_plan, self.plan) and not forced:
                self._predicted = current
                return []
            return self._apply(new_plan, now, step, cause, old_t=current)
        self._predicted = current
        if gain > 0.01 and now - self._last_hold >= self.set_change_interval:
            self._last_hold = now
            return [
                Event(
                    now,
                    EventKind.HOLD,
                    f"best plan only {100 * gain:.1f}% faster (< {100 * self.min_gain:.0f}%): "
                    "keeping the current split",
                    step,
                )
            ]
        return []

    def _apply(
        self, new: Plan, now: float, step: int, cause: str, old_t: float | None = None
    ) -> list[Event]:
        old = self.plan
        raw, new = new, self._stable(new, now)
        if not cause and same_layout(new, old) and not same_layout(raw, old):
            self._predicted = new.predicted_step_s or self._predicted
            return []
        events: list[Event] = []
        old_set, new_set = set(old.devices), set(new.devices)
        for pos in sorted(old_set - new_set):
            d = self.devices[pos]
            if d.failed or not d.enabled:
                continue
            u = self._external_util(d, now)
            reason = f"external job at {u:.0%}" if u is not None and u >= 0.1 else "too slow"
            if d.oom_cap is not None or (self._cap(d) or 1) < 1:
                reason = "not enough free memory"
            d.dropped_reason = reason
            d.util = Holt(0.5, 0.3, 0.0, 1.0, jump=0.3)
            d.util_seen.clear()
            self.readmission.dropped(pos, now)
            events.append(
                Event(
                    now,
                    EventKind.DEVICES,
                    f"{d.name} left out: {reason}{gain_text(old_t, new)}",
                    step,
                )
            )
        for pos in sorted(new_set - old_set):
            d = self.devices[pos]
            u = d.util.forecast(self.control_interval)
            load = f"forecast external load {u:.0%}" if u is not None else "re-probing"
            s = self.readmission.measured(pos)
            if s is not None:
                nvml = f" (NVML: {u:.0%} busy)" if u is not None else ""
                load = f"probe measured {s:.2f}× its unloaded step time{nvml}"
            was = f" (was {d.dropped_reason})" if d.dropped_reason else ""
            kind = EventKind.DEVICE_READMITTED if d.dropped_reason else EventKind.DEVICES
            events.append(
                Event(now, kind, f"{d.name} back in: {load}{was}{gain_text(old_t, new)}", step)
            )
            d.dropped_reason = None
        if old_set != new_set:
            self._last_set_change = now
        if new.micro_batches != old.micro_batches and new.batch:
            size = micro_batch_sizes(new.batch, new.micro_batches)[0]
            if new.micro_batches > 1:
                detail = (
                    f"batch {new.batch} does not fit the devices' memory at once: "
                    f"{new.micro_batches} micro-batches of ≤{size} (gradient unchanged)"
                )
            else:
                detail = f"batch {new.batch} fits again: 1 micro-batch"
            events.append(Event(now, EventKind.MICROBATCH, detail, step))
        moved = [
            (abs(new.shares[p] - old.shares[p]), p) for p in range(len(new.shares)) if p in new_set
        ]
        if moved and max(moved)[0] > 1e-3 and not events:
            _, p = max(moved)
            d = self.devices[p]
            why = cause or self._why(d, now, new)
            events.append(
                Event(
                    now,
                    EventKind.REALLOCATE,
                    f"{d.name}: {why} → share {old.shares[p]:.2f} → {new.shares[p]:.2f}"
                    f"{gain_text(old_t, new)}",
                    step,
                )
            )
        self.plan = new
        self._predicted = new.predicted_step_s
        self.replans += 1
        self.engine.apply_plan(new)
        self._release(old_set - new_set)
        return events

    def _stable(self, plan: Plan, now: float) -> Plan:
        """``plan`` with its chunks rounded to stable sizes when the step-time models say
        that costs under 2 % (see ``plan/shapes.py``): fewer cuDNN re-tunes and recompiles."""
        if not self.stable_shapes or not plan.batch or self.policy == "static":
            return plan
        with contextlib.suppress(ValueError):  # the sizes run so far (the first plan too)
            ran = micro_batch_sizes(self._batch or plan.batch, self.plan.micro_batches)[0]
            self.shapes.record(self.plan.chunks(ran))
        size = micro_batch_sizes(plan.batch, plan.micro_batches)[0]
        try:
            base = plan.chunks(size)
        except ValueError:
            return plan
        models = {p: self._model(self.devices[p], now) for p in plan.devices}
        if any(m is None for m in models.values()):
            self.shapes.record(base)
            return plan
        overhead = self._overhead()

        def cost(vec: list[int]) -> float:
            used = [p for p in plan.devices if vec[p] > 0]
            return max(models[p].time(vec[p]) for p in used) + overhead(len(used))  # type: ignore[union-attr]

        min_chunk = self._min_chunk()
        vec = stable_chunks(
            base, plan.caps or None, cost, self.shapes, min_chunk=min_chunk, fault=self._fault
        )
        self.shapes.record(vec)
        if vec == base:
            return plan
        shares = tuple(c / size for c in vec)
        return dataclasses.replace(plan, shares=shares)

    def _release(self, positions: set[int]) -> None:
        """Ask the engine to give back the cached memory of devices it no longer uses, so
        that the job that pushed us off (or anyone) can have it. Optional engine hook
        ``release_device(position)``; best effort (a failed device may refuse)."""
        release = getattr(self.engine, "release_device", None)
        if release is None:
            return
        for pos in sorted(positions):
            try:
                release(pos)
            except Exception as exc:  # a lost GPU cannot empty its cache: nothing to give
                log.debug("releasing device %s failed: %s", pos, exc)

    def _why(self, d: DeviceState, now: float, new: Plan) -> str:
        cap = self._cap(d)
        if cap is not None and new.batch:
            size = micro_batch_sizes(new.batch, new.micro_batches)[0]
            if abs(new.shares[d.position] * size - cap) < 1.0:
                avail = self._available_mb(d)
                free = f" ({avail / 1024:.1f} GB free)" if avail is not None else ""
                return f"memory cap {cap} samples{free}"
        u = self._external_util(d, now)
        if u is not None and u >= 0.1:
            return f"external job at {u:.0%}"
        tm = d.time_model
        if tm.ready and tm.beta > 0:
            return f"measured {1.0 / tm.beta:.0f} samples/s"
        return "re-balanced"

    # -- the primary (policy: plan/primary.py) -------------------------------------------
    def _start_primary(self) -> int:
        """The primary to start on, from the first snapshot (free memory, external load)
        and the engine's optional ``speed_hints()`` (see :func:`.primary.start_primary`)."""
        n = len(self.devices)
        avail: list[float | None] = [None] * n
        util: list[float | None] = [None] * n
        snap: Snapshot | None = None
        if self.snapshots is not None:
            with contextlib.suppress(Exception):  # no reading: start on position 0
                snap = self.snapshots.latest()
        if snap is not None:
            by_key = {g.index: g for g in snap.gpus if g.index is not None}
            for d in self.devices:
                g = by_key.get(d.key) if d.key is not None else None
                if g is not None:
                    avail[d.position] = g.mem_total_mb - g.external_mem_mb
                    util[d.position] = g.util_pct / 100.0
        hints = getattr(self.engine, "speed_hints", None)
        speed = hints() if callable(hints) else None
        positions = [d.position for d in self.devices]
        return start_primary(positions, available_mb=avail, util=util, speed=speed)

    def _move_bytes(self) -> int:
        size = getattr(self.engine, "move_bytes", None)
        return int(size()) if callable(size) else 0

    def _consider_primary(self, now: float, step: int) -> list[Event]:
        """Move the primary to another device when the best plan with it there beats the
        current plan clearly and pays for the copy (:func:`.primary.move_pays`); at most
        one move per ``primary_interval`` (default: ``set_change_interval``). Candidates
        are the devices of the current plan, and each is compared on that device set with
        the best plan that keeps the primary (not with the current shares: a re-balance
        alone is the re-plan's to make, not a reason to move)."""
        if (
            not self.movable_primary
            or self.policy == "static"
            or self._batch <= 0
            or now - self._last_primary_move < self.primary_interval
        ):
            return []
        cands = [d for d in self._candidates() if d.position in self.plan.devices]
        if len(cands) < 2 or not any(d.position == self.primary for d in cands):
            return []
        n, batch, overhead, mc = len(self.devices), self._batch, self._overhead(), self._min_chunk()
        # each device's model as a non-primary and as the primary: 2n models, not n²
        plain = {d.position: self._compute_model(d, now, self._cap(d, False)) for d in cands}
        as_primary: dict[int, DeviceModel | None] = {}
        extra = (self._extra_s or 0.0) / max(1, self.plan.micro_batches)
        for d in cands:
            m = self._compute_model(d, now, self._cap(d, True))
            as_primary[d.position] = m and dataclasses.replace(m, alpha=m.alpha + extra)
        if any(m is None for m in (*plain.values(), *as_primary.values())):
            return []

        def models_with(primary: int) -> list[DeviceModel]:
            chosen = [as_primary[p] if p == primary else plain[p] for p in sorted(plain)]
            return sorted(
                (m for m in chosen if m is not None),
                key=lambda m: (m.position != primary, m.position),
            )

        keep = models_with(self.primary)
        t_now = evaluate(self.plan, keep, overhead, batch, mc)
        same = best_plan(
            keep, n, batch, overhead, primary=self.primary, subsets=[range(len(keep))], min_chunk=mc
        )
        if same is not None and same.predicted_step_s is not None:
            t_now = min(t_now, same.predicted_step_s)
        if math.isinf(t_now):
            return []
        nbytes = self._move_bytes()
        cost = self.move_cost.seconds(nbytes)
        best: tuple[float, Plan] | None = None
        for q in cands:
            if q.position == self.primary:
                continue
            models = models_with(q.position)
            plan = best_plan(
                models,
                n,
                batch,
                overhead,
                primary=q.position,
                subsets=[range(len(models))],
                min_chunk=mc,
            )
            t = math.inf if plan is None else (plan.predicted_step_s or math.inf)
            if plan is None or math.isinf(t):
                continue
            pays = move_pays(
                t_now, t, cost, min_gain=self.min_gain, payback_s=self.primary_payback_s
            )
            if pays and (best is None or t < best[0]):
                best = (t, plan)
        if best is None:
            return []
        t_new, plan = best
        old, new = self.devices[self.primary], self.devices[plan.primary]
        self.primary = plan.primary
        self._last_primary_move = now
        self.primary_moves += 1
        events = [
            Event(
                now,
                EventKind.DEVICES,
                f"primary (parameters, loss, optimizer step) moves from {old.name} to "
                f"{new.name}: predicted step {t_now:.3f} s → {t_new:.3f} s; the move copies "
                f"~{nbytes / 2**20:.0f} MB (~{cost:.2f} s)",
                step,
            )
        ]
        events += self._apply(plan, now, step, "primary moved", old_t=t_now)
        moved = getattr(self.engine, "last_move_bytes", 0) or nbytes  # what it really copied
        self.move_cost.record(int(moved), getattr(self.engine, "last_move_s", None))
        return events

    # -- readmission probes (policy: plan/probe.py) -------------------------------------
    def _start_probe(self, now: float, step: int) -> list[Event]:
        """Give the first left-out device whose probe is due a few samples of each step."""
        if self.policy != "adaptive":
            return []
        k = max(
            self.readmission.samples(self.plan.batch, self.plan.micro_batches), self._min_chunk()
        )
        for d in self._candidates():
            if d.position in self.plan.devices or d.best is None:
                continue
            if not self.readmission.due(d.position, now):
                continue
            u = d.util.forecast(self.control_interval)
            if u is not None and u < 0.1:
                continue  # NVML says idle: the planner already has its unloaded speed
            cap = self._cap(d)
            if cap is not None and cap < k:
                continue  # no room for even the probe: memory frees first (see oom_cap)
            self.readmission.start(d.position, now, self.plan)
            self._use(probe_plan(self.plan, d.position, k), predicted=None)
            nvml = f"NVML: {u:.0%} busy" if u is not None else "no NVML reading"
            detail = f"{d.name}: probing with {k} samples per step ({nvml})"
            return [Event(now, EventKind.NOTICE, detail, step)]
        return []

    def _end_probe(self, now: float, step: int) -> list[Event]:
        """Keep the probed device when the plan with it, at its measured speed, beats the
        best plan without it by ``min_gain``; otherwise restore the plan and back off."""
        pos, slow, saved = self.readmission.finish()
        self.plan = saved  # the probe was a trial: model the device as left out
        d = self.devices[pos]
        overhead = self._overhead()
        cands = self._candidates()
        models = [self._model(x, now) for x in cands]
        ordered = sorted(
            (m for m in models if m is not None),
            key=lambda m: (m.position != self.primary, m.position),
        )
        without = [m for m in ordered if m.position != pos]
        batch = self._batch
        keep: Plan | None = None
        mc = self._min_chunk()
        old_t = evaluate(saved, without, overhead, batch, mc)
        if len(ordered) == len(cands):
            best = best_plan(
                ordered, len(self.devices), batch, overhead, primary=self.primary, min_chunk=mc
            )
            rest = best_plan(
                without, len(self.devices), batch, overhead, primary=self.primary, min_chunk=mc
            )
            t_rest = math.inf if rest is None else (rest.predicted_step_s or math.inf)
            if best is not None and pos in best.devices:
                t_best = best.predicted_step_s or math.inf
                if t_best <= (1.0 - self.min_gain) * min(t_rest, old_t):
                    keep = best
        if keep is not None:
            self.readmission.won(pos)
            m = next(x for x in ordered if x.position == pos)
            d.time_model = StepTimeModel(self._forgetting)  # its old fit is the loaded one
            d.seed = (m.alpha, m.beta)
            return self._apply(keep, now, step, "probe", old_t=old_t)
        wait = self.readmission.lost(pos, now)
        self._use(saved, predicted=None if math.isinf(old_t) else old_t)
        detail = (
            f"{d.name}: probe measured {slow:.1f}× its unloaded step time; "
            f"stays out, next probe in {wait:.0f} s"
        )
        return [Event(now, EventKind.NOTICE, detail, step)]

    def _abort_probe(self, now: float) -> None:
        """A fault or request during a probe: back to the plan before it, no verdict."""
        saved = self.readmission.abort(now)
        if saved is not None:
            self._use(saved, predicted=None)

    def _use(self, plan: Plan, predicted: float | None) -> None:
        """Put a plan in force without a decision event (a probe starts or ends)."""
        plan = self._stable(plan, self._now)
        self.plan = plan
        self._predicted = predicted
        self.engine.apply_plan(plan)

    # -- faults ---------------------------------------------------------------------------
    def on_oom(self, error: OutOfMemory, now: float, step: int) -> list[Event]:
        self._oom_pending += 1
        in_force = self.plan  # the chunk that failed may be a probe's
        self._abort_probe(now)
        if self._batch <= 0:  # out of memory on the very first step
            self._batch = self.engine.last_batch or self.plan.batch
        if self.snapshots is not None:
            with contextlib.suppress(Exception):  # a monitor hiccup must not crash an OOM retry
                self._read_snapshot(now, self.snapshots.latest())
        pos = error.device
        batch = self._batch or self.plan.batch
        if pos is None or not 0 <= pos < len(self.devices) or batch <= 0:
            more = add_micro_batch(self.plan, batch)
            return [
                *self._apply(more, now, step, "out of memory on an unknown device"),
                Event(now, EventKind.OOM, "out of memory: one more micro-batch, retrying", step),
            ]
        d = self.devices[pos]
        size = micro_batch_sizes(batch, in_force.micro_batches)[0]
        try:
            b = in_force.chunks(size)[pos]
        except ValueError:
            b = 0
        cap = max(0, int(b * 0.9)) if b > 0 else 0
        model_cap = self._cap(d)
        if model_cap is not None:
            cap = min(cap, model_cap) if b > 0 else model_cap
        d.oom_cap = cap
        d.oom_avail_mb = self._available_mb(d)
        if cap < 1 and pos == self.primary:
            raise error  # not even one sample fits where the model lives
        events = [
            Event(
                now,
                EventKind.OOM,
                f"{d.name}: out of memory with {b} samples; cap {cap} samples, "
                "retrying the same batch",
                step,
            )
        ]
        return events + self._fault_replan(now, step, forced=True, cause=f"out of memory at {b}")

    def _fault_replan(self, now: float, step: int, *, forced: bool, cause: str) -> list[Event]:
        """Re-plan after a fault: the one case a device may get a chunk size it has not run."""
        self._fault = True
        try:
            return self._replan(now, step, forced=forced, cause=cause)
        finally:
            self._fault = False

    def on_device_failure(self, error: DeviceFailure, now: float, step: int) -> list[Event]:
        if self._batch <= 0:
            self._batch = self.engine.last_batch or self.plan.batch
        pos = error.device
        if not 0 <= pos < len(self.devices):
            raise error
        self._abort_probe(now)
        d = self.devices[pos]
        self.failures += 1
        if pos == self.primary:
            raise error  # the model's parameters live there: nothing left to train on
        d.failed = True
        left = self._candidates()
        if not left:
            raise error
        events = [
            Event(
                now,
                EventKind.DEVICE_DROPPED,
                f"{d.name} failed ({error}); continuing on {len(left)} device"
                f"{'s' if len(left) != 1 else ''}",
                step,
            )
        ]
        return events + self._fault_replan(now, step, forced=True, cause=f"{d.name} failed")

    # -- requests -------------------------------------------------------------------------
    def set_policy(self, policy: str, now: float, step: int) -> list[Event]:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self._abort_probe(now)
        self.policy = policy
        return self._replan(now, step, forced=True, cause=f"policy {policy}") if self._batch else []

    def set_headroom(self, headroom: float, now: float, step: int) -> list[Event]:
        self.headroom = float(headroom)
        self._abort_probe(now)
        return (
            self._replan(now, step, forced=True, cause=f"headroom {headroom:.2f}")
            if self._batch
            else []
        )

    def set_device_enabled(
        self, position: int, enabled: bool, now: float, step: int
    ) -> list[Event]:
        if not 0 <= position < len(self.devices):
            return [Event(now, EventKind.NOTICE, f"no device at position {position}", step)]
        d = self.devices[position]
        self._abort_probe(now)
        if position == self.primary and not enabled:
            return [
                Event(
                    now,
                    EventKind.NOTICE,
                    f"{d.name} holds the model (primary device) and cannot be excluded",
                    step,
                )
            ]
        d.enabled = enabled
        if enabled:
            d.dropped_reason = None
        if not self._batch:
            if not enabled:
                positions = [x.position for x in self._candidates()]
                new = static_plan(positions, len(self.devices), 0)
                if new is not None:
                    dropped = set(self.plan.devices) - set(new.devices)
                    self.plan = new
                    self.engine.apply_plan(new)
                    self._release(dropped)
            return []
        return self._replan(now, step, forced=True, cause="requested")

    # -- read-outs ------------------------------------------------------------------------
    def shares(self) -> dict[str, float]:
        return {d.name: float(self.plan.shares[d.position]) for d in self.devices if not d.failed}

    def predicted_step_s(self) -> float | None:
        return self._predicted

    def summary(self) -> dict[str, object]:
        mape = self.mape.value_pct()
        return {
            "prediction_mape_pct": None if mape is None else round(mape, 2),
            "prediction_steps": self.mape.count,
            "replans": self.replans,
            "micro_batches": self.plan.micro_batches,
            "primary": self.devices[self.primary].name,
            "primary_moves": self.primary_moves,
            "devices_failed": [d.name for d in self.devices if d.failed],
            "devices_left_out": [
                d.name for d in self.devices if d.position not in self.plan.devices and not d.failed
            ],
            **self.readmission.summary(),
            **self.static.summary(self._batch),
        }
