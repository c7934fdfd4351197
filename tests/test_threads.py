"""CPU thread policy: try, measure, keep the best, hold under 5 %, re-probe on load change.

These tests exercise the probe itself, so they build the controller with
``probe_budget=None`` (probe from the first step, whatever the run's length); when a probe
starts at all is tested in ``test_thread_probe_budget.py``."""

from __future__ import annotations

import pytest
import torch

from adaptive_nb.events import EventKind
from adaptive_nb.monitor.snapshot import HostSample, Snapshot
from adaptive_nb.plan.threads import ThreadController, thread_candidates
from adaptive_nb.step import StepOutcome


class FakeThreads:
    def __init__(self, n: int) -> None:
        self.n = n
        self.history = [n]

    def set(self, n: int) -> None:
        self.n = n
        self.history.append(n)

    def get(self) -> int:
        return self.n


def outcome(rate: float) -> StepOutcome:
    return StepOutcome(loss=torch.tensor(0.0), samples=100, wall_s=100 / rate)


def drive(ctl: ThreadController, threads: FakeThreads, rates: dict[int, float], steps: int) -> list:
    events = []
    for i in range(steps):
        ctl.observe(outcome(rates[threads.n]))
        if i % 5 == 0:
            events += ctl.tick(float(i), i, None)
    return events + ctl.tick(float(steps), steps, None)


def host(cpu_pct: float, proc_pct: float, cores: float = 8) -> Snapshot:
    return Snapshot(
        t=0.0,
        host=HostSample(
            cpu_pct=cpu_pct,
            per_core_pct=(),
            ram_used_mb=1000,
            ram_available_mb=1000,
            ram_total_mb=2000,
            proc_cpu_pct=proc_pct,
            proc_rss_mb=100,
            cpu_cores=cores,
        ),
    )


def test_candidates_cover_one_powers_of_two_and_all() -> None:
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(8) == [1, 2, 4, 6, 8]
    assert thread_candidates(12) == [1, 2, 4, 8, 9, 12]


def test_picks_the_fastest_thread_count() -> None:
    t = FakeThreads(8)
    ctl = ThreadController(
        probe_budget=None, cores=8, window=3, warmup=1, set_threads=t.set, get_threads=t.get
    )
    rates = {1: 100.0, 2: 180.0, 4: 300.0, 6: 310.0, 8: 250.0}
    events = drive(ctl, t, rates, 60)
    assert t.n == 6
    assert ctl.threads() == 6
    change = [e for e in events if e.kind == EventKind.THREADS]
    assert len(change) == 1 and "8 → 6 threads" in change[0].detail
    assert set(t.history) == {1, 2, 4, 6, 8}  # every candidate was tried


def test_holds_when_the_gain_is_under_five_percent() -> None:
    t = FakeThreads(4)
    ctl = ThreadController(
        probe_budget=None, cores=4, window=3, warmup=0, set_threads=t.set, get_threads=t.get
    )
    rates = {1: 100.0, 2: 200.0, 4: 300.0}
    rates_close = {**rates, 2: 310.0}  # 2 threads only 3 % faster than the held 4
    events = drive(ctl, t, rates_close, 40)
    assert t.n == 4
    hold = [e for e in events if e.kind == EventKind.HOLD]
    assert hold and "not worth a change" in hold[0].detail


def test_says_when_there_is_nothing_to_try() -> None:
    t = FakeThreads(1)
    ctl = ThreadController(
        probe_budget=None, cores=1, window=2, warmup=0, set_threads=t.set, get_threads=t.get
    )
    events = drive(ctl, t, {1: 50.0}, 10)
    assert [e.kind for e in events] == [EventKind.HOLD]
    assert "only choice" in events[0].detail
    assert t.history == [1]


def test_static_policy_never_touches_threads() -> None:
    t = FakeThreads(4)
    ctl = ThreadController(
        probe_budget=None,
        policy="static",
        cores=4,
        window=2,
        warmup=0,
        set_threads=t.set,
        get_threads=t.get,
    )
    events = drive(ctl, t, {1: 500.0, 2: 10.0, 4: 10.0}, 30)
    assert t.history == [4]
    assert events == []


def test_reprobes_when_external_load_changes_and_adapts() -> None:
    t = FakeThreads(4)
    ctl = ThreadController(
        probe_budget=None, cores=4, window=2, warmup=0, set_threads=t.set, get_threads=t.get
    )
    idle = {1: 100.0, 2: 190.0, 4: 360.0}
    busy = {1: 100.0, 2: 150.0, 4: 60.0}  # another job now uses the cores
    drive(ctl, t, idle, 20)
    assert t.n == 4
    ctl.tick(20.0, 20, host(cpu_pct=50, proc_pct=200, cores=4))  # external 0 %: reference
    events = ctl.tick(21.0, 21, host(cpu_pct=90, proc_pct=200, cores=4))  # external 40 %
    events += ctl.tick(22.0, 22, host(cpu_pct=90, proc_pct=200, cores=4))  # sustained
    assert any(e.kind == EventKind.NOTICE and "re-probing" in e.detail for e in events)
    events = drive(ctl, t, busy, 20)
    assert t.n == 2
    assert any(e.kind == EventKind.THREADS and "4 → 2" in e.detail for e in events)


def test_a_single_load_blip_does_not_reprobe() -> None:
    t = FakeThreads(2)
    ctl = ThreadController(
        probe_budget=None, cores=2, window=2, warmup=0, set_threads=t.set, get_threads=t.get
    )
    drive(ctl, t, {1: 100.0, 2: 190.0}, 10)
    probes = ctl.probes
    ctl.tick(10.0, 10, host(cpu_pct=50, proc_pct=100, cores=2))
    ctl.tick(11.0, 11, host(cpu_pct=95, proc_pct=100, cores=2))  # one tick only
    ctl.tick(12.0, 12, host(cpu_pct=50, proc_pct=100, cores=2))
    assert ctl.probes == probes


def test_restore_puts_the_original_count_back() -> None:
    t = FakeThreads(2)
    ctl = ThreadController(
        probe_budget=None, cores=2, window=2, warmup=0, set_threads=t.set, get_threads=t.get
    )
    drive(ctl, t, {1: 300.0, 2: 100.0}, 10)
    assert t.n == 1
    ctl.restore()
    assert t.n == 2


def test_external_load_is_measured_on_the_whole_machine_under_a_cpu_quota() -> None:
    # a container with a 4-core quota on a 64-CPU host: our 400 % is 6.25 % of the machine
    def on_host(cpu_pct: float) -> Snapshot:
        snap = host(cpu_pct=cpu_pct, proc_pct=400, cores=4)
        h = snap.host
        return Snapshot(
            t=0.0,
            host=HostSample(
                cpu_pct=h.cpu_pct,
                per_core_pct=(cpu_pct,) * 64,
                ram_used_mb=h.ram_used_mb,
                ram_available_mb=h.ram_available_mb,
                ram_total_mb=h.ram_total_mb,
                proc_cpu_pct=h.proc_cpu_pct,
                proc_rss_mb=h.proc_rss_mb,
                cpu_cores=h.cpu_cores,
            ),
        )

    t = FakeThreads(4)
    ctl = ThreadController(
        probe_budget=None, cores=4, window=2, warmup=0, set_threads=t.set, get_threads=t.get
    )
    drive(ctl, t, {1: 100.0, 2: 190.0, 4: 360.0}, 20)
    probes = ctl.probes
    ctl.tick(20.0, 20, on_host(6.25))  # only us: external 0 %
    events = ctl.tick(21.0, 21, on_host(60.0))  # other jobs take half the machine
    events += ctl.tick(22.0, 22, on_host(60.0))
    assert ctl.probes == probes + 1
    assert any(e.kind == EventKind.NOTICE and "re-probing" in e.detail for e in events)


def test_candidates_respect_the_cgroup_cpu_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_nb.monitor import host as host_mod

    monkeypatch.setattr(
        host_mod, "read_cgroup_limits", lambda *a, **k: host_mod.CgroupLimits(2, None, 3.5)
    )
    monkeypatch.setattr(host_mod, "_affinity_count", lambda: 64)
    monkeypatch.setattr(host_mod.os, "cpu_count", lambda: 64)
    t = FakeThreads(64)
    ctl = ThreadController(
        probe_budget=None, window=2, warmup=0, set_threads=t.set, get_threads=t.get
    )
    drive(ctl, t, {1: 100.0, 2: 190.0, 3: 250.0, 64: 10.0}, 20)
    assert max(t.history[1:]) == 3  # never more threads than the quota's whole cores


def test_a_clearly_slower_candidate_is_dropped_after_two_steps() -> None:
    t = FakeThreads(2)
    ctl = ThreadController(
        probe_budget=None, cores=2, window=6, warmup=0, set_threads=t.set, get_threads=t.get
    )
    steps_at = {1: 0, 2: 0}
    for _ in range(12):
        steps_at[t.n] += 1
        ctl.observe(outcome({1: 100.0, 2: 300.0}[t.n]))
    assert steps_at[1] == 2  # not a full window of 6 at a third of the speed
    assert t.n == 2 and ctl.threads() == 2
