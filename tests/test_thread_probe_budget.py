"""When the CPU thread policy probes at all: only once the probe's worst-case cost is within
1 % of the run (of its known length, else of the steps run so far), and never with fewer
threads than the usable cores on an idle machine (unless steps are tiny).

Step times are given, not measured (a fake clock): these tests check decisions, not speed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from adaptive_nb.events import Event, EventKind
from adaptive_nb.monitor.snapshot import HostSample, Snapshot
from adaptive_nb.plan.thread_probe import forget_learned, probe_cost_steps
from adaptive_nb.plan.threads import ThreadController
from adaptive_nb.step import StepOutcome


@pytest.fixture(autouse=True)
def _fresh_memory() -> Iterator[None]:
    forget_learned()
    yield
    forget_learned()


class FakeThreads:
    def __init__(self, n: int) -> None:
        self.n = n
        self.history = [n]

    def set(self, n: int) -> None:
        self.n = n
        self.history.append(n)

    def get(self) -> int:
        return self.n


def host(external_pct: float, cores: float = 2) -> Snapshot:
    """A snapshot where other processes use ``external_pct`` % of the machine and we 100 %
    of one core."""
    ours = 100.0 / cores
    return Snapshot(
        t=0.0,
        host=HostSample(
            cpu_pct=external_pct + ours,
            per_core_pct=(),
            ram_used_mb=1000,
            ram_available_mb=1000,
            ram_total_mb=2000,
            proc_cpu_pct=100.0,
            proc_rss_mb=100,
            cpu_cores=cores,
        ),
    )


def run(
    ctl: ThreadController,
    t: FakeThreads,
    step_s: dict[int, float],
    steps: int,
    snap: Snapshot | None = None,
) -> tuple[list[int], list[Event]]:
    """Drive ``steps`` steps of 100 samples; ``step_s[threads]`` is the step time. Ticks
    after step 1 and every 10 steps (as the loop ticks every control interval). Returns the
    thread count each step ran with, and the events."""
    ran_with, events = [], []
    for i in range(steps):
        ran_with.append(t.n)
        ctl.observe(StepOutcome(loss=torch.tensor(0.0), samples=100, wall_s=step_s[t.n]))
        if i % 10 == 0:
            events += ctl.tick(float(i), i + 1, snap)
    events += ctl.tick(float(steps), steps, snap)
    return ran_with, events


def controller(t: FakeThreads, **kw: object) -> ThreadController:
    return ThreadController(cores=2, set_threads=t.set, get_threads=t.get, **kw)  # type: ignore[arg-type]


TWO_CORES = {1: 0.060, 2: 0.032}  # 1 thread at about half the speed of 2 (measured by hand)


def test_worst_case_cost_of_trying_one_thread_instead_of_two() -> None:
    # 1 thread is at worst 2× slower: dropped after warmup + 2 steps, each losing a step's time
    assert probe_cost_steps(2, [1], window=6, warmup=1, early_stop=0.75) == pytest.approx(3.0)
    # a candidate at most 1/0.75 slower runs a full window of 7 steps, losing a third of each
    assert probe_cost_steps(4, [3], window=6, warmup=1, early_stop=0.75) == pytest.approx(7 / 3)
    assert probe_cost_steps(2, [], window=6, warmup=1, early_stop=0.75) == 0.0


def test_a_short_run_of_unknown_length_never_probes() -> None:
    t = FakeThreads(2)
    ctl = controller(t)
    ran_with, events = run(ctl, t, TWO_CORES, 250)
    assert set(ran_with) == {2}
    assert t.history == [2]
    assert ctl.probes == 0
    assert ctl.summary()["thread_decision"] == "run too short to pay for a probe"
    assert events == []


def test_a_long_run_probes_once_the_probe_costs_under_one_percent_of_it() -> None:
    t = FakeThreads(2)
    ctl = controller(t)
    ran_with, events = run(ctl, t, TWO_CORES, 400)
    assert ctl.probes == 1
    first = ran_with.index(1)
    assert first == 300  # worst case 3 steps ≤ 1 % of the 300 run so far
    assert ran_with.count(1) == 3  # clearly slower: dropped after warmup + 2 steps
    assert set(ran_with[first + 3 :]) == {2}
    lost = sum(TWO_CORES[n] - TWO_CORES[2] for n in ran_with)
    assert lost <= 0.01 * TWO_CORES[2] * first  # within the budget of the time before it
    hold = [e for e in events if e.kind == EventKind.HOLD]
    assert hold and "holding 2 threads" in hold[0].detail


def test_a_run_known_to_be_long_probes_at_once() -> None:
    t = FakeThreads(2)
    ctl = controller(t, expected_steps=5000)
    ran_with, _ = run(ctl, t, {1: 0.020, 2: 0.032}, 40)
    # the held count is measured for warmup + window = 7 steps, then 1 thread is tried
    assert ran_with.index(1) == 7
    assert t.n == 1  # and wins here
    assert ctl.summary()["thread_decision"] == "probed"


def test_a_run_known_to_be_short_does_not_probe() -> None:
    t = FakeThreads(2)
    ctl = controller(t, expected_steps=40)
    ran_with, _ = run(ctl, t, TWO_CORES, 40)
    assert set(ran_with) == {2} and ctl.probes == 0


def test_on_an_idle_machine_fewer_threads_than_cores_are_not_tried() -> None:
    t = FakeThreads(2)
    ctl = controller(t, expected_steps=100_000)
    ran_with, events = run(ctl, t, TWO_CORES, 500, snap=host(external_pct=0.0))
    assert set(ran_with) == {2} and ctl.probes == 0
    hold = [e for e in events if e.kind == EventKind.HOLD]
    assert len(hold) == 1 and "idle" in hold[0].detail


def test_with_external_load_fewer_threads_are_tried() -> None:
    t = FakeThreads(2)
    ctl = controller(t, expected_steps=100_000)
    ran_with, _ = run(ctl, t, TWO_CORES, 40, snap=host(external_pct=50.0))
    assert 1 in ran_with and ctl.probes == 1


def test_on_an_idle_machine_tiny_steps_still_try_fewer_threads() -> None:
    # per-op thread synchronisation can dominate a sub-millisecond step
    t = FakeThreads(2)
    ctl = controller(t, expected_steps=100_000)
    ran_with, _ = run(ctl, t, {1: 0.0003, 2: 0.0004}, 40, snap=host(external_pct=0.0))
    assert 1 in ran_with and t.n == 1


def test_on_an_idle_machine_too_many_threads_move_to_the_usable_cores() -> None:
    # torch's default is the host's cores (64); a CPU quota gives us 4
    t = FakeThreads(64)
    ctl = ThreadController(cores=4, expected_steps=100_000, set_threads=t.set, get_threads=t.get)
    ran_with, _ = run(ctl, t, {4: 0.030, 64: 0.050}, 60, snap=host(external_pct=0.0, cores=64))
    assert set(ran_with) == {4, 64}  # 1 and 2 never tried
    assert t.n == 4


def test_static_policy_never_waits_nor_probes() -> None:
    t = FakeThreads(2)
    ctl = controller(t, policy="static", expected_steps=100_000)
    ran_with, events = run(ctl, t, TWO_CORES, 400)
    assert set(ran_with) == {2} and ctl.probes == 0 and events == []


def test_a_load_change_on_a_short_run_waits_for_the_budget_too() -> None:
    t = FakeThreads(2)
    ctl = controller(t)
    run(ctl, t, TWO_CORES, 20, snap=host(external_pct=0.0))  # idle: nothing to try
    ran_with, events = run(ctl, t, TWO_CORES, 100, snap=host(external_pct=60.0))
    assert any(e.kind == EventKind.NOTICE and "re-probing" in e.detail for e in events)
    assert set(ran_with) == {2} and ctl.probes == 0  # 120 steps cannot pay for 3 lost


def test_a_load_change_on_a_long_run_reprobes_and_adapts() -> None:
    t = FakeThreads(2)
    ctl = controller(t)
    run(ctl, t, TWO_CORES, 400, snap=host(external_pct=0.0))
    assert ctl.probes == 0
    busy = {1: 0.030, 2: 0.060}  # another job took a core: 2 threads now stall
    run(ctl, t, busy, 40, snap=host(external_pct=60.0))
    assert ctl.probes == 1 and t.n == 1


def test_a_short_train_on_cpu_keeps_torchs_thread_count_throughout() -> None:
    # the whole path: train() builds the controller, which reads the run's length (40)
    from adaptive_nb import train
    from tests.conftest import ce_step, make_data, make_model

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_data(n=160, batch=16)
    report = train(ce_step, model=model, optimizer=opt, data=data, epochs=4, devices="cpu")
    assert report.summary["thread_probes"] == 0
    assert report.summary["threads"] == report.summary["threads_original"]
    assert not [e for e in report.events if e.kind == EventKind.THREADS]
