"""The primary device (master parameters, gather, loss, optimizer step): chosen at the start
from what is known then, moved between steps only when a measured gain pays for the copy,
and carried out by the engines with positions stable in every plan array."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ce_step, make_data, make_model
from test_backward_timing import BWD, FWD, DeviceClocks, TimedNet, _stub
from torch import nn

import adaptive_nb
from adaptive_nb.bench.runner import run_policy
from adaptive_nb.engine.dataparallel import DataParallelEngine
from adaptive_nb.events import Event, EventKind
from adaptive_nb.layout import Plan
from adaptive_nb.monitor.snapshot import Snapshot
from adaptive_nb.plan import allocation
from adaptive_nb.plan.allocation import AllocationController
from adaptive_nb.plan.base import Controller
from adaptive_nb.plan.primary import MoveCost, move_pays, start_primary
from adaptive_nb.run.loop import Run
from adaptive_nb.sim import SimSnapshots, SimulatedEngine, parse_scenario
from adaptive_nb.step import StepOutcome

# -- the pure choice ----------------------------------------------------------------------


def test_start_primary_stays_on_position_0_unless_another_is_clearly_better() -> None:
    assert start_primary([0, 1, 2]) == 0  # nothing known
    assert start_primary([0, 1], speed=[100.0, 105.0]) == 0  # within the margin
    assert start_primary([0, 1, 2], speed=[100.0, 300.0, 200.0]) == 1  # 0 is slow
    assert start_primary([0, 1], available_mb=[3000.0, 40000.0]) == 1  # 0 is nearly full
    assert start_primary([0, 1], util=[0.9, 0.0]) == 1  # 0 is busy, 1 idle
    assert start_primary([0, 1], util=[0.9, 0.95]) == 0  # all busy: no better choice
    # the fastest is full: the fastest of the rest
    assert start_primary([0, 1, 2], available_mb=[20e3, 2e3, 20e3], speed=[1.0, 9.0, 3.0]) == 2
    assert start_primary([2, 3]) == 2  # only the usable positions count
    with pytest.raises(ValueError, match="no usable device"):
        start_primary([])


def test_a_move_must_gain_clearly_and_pay_for_its_copy() -> None:
    assert not move_pays(0.100, 0.097, 0.0, min_gain=0.05, payback_s=60.0)  # 3 %: noise
    assert move_pays(0.100, 0.090, 0.5, min_gain=0.05, payback_s=60.0)  # 10 %, 67 s saved
    # 10 % faster, but the copy (40 s) is not paid back twice within a minute
    assert not move_pays(0.100, 0.090, 40.0, min_gain=0.05, payback_s=60.0)


def test_move_cost_is_assumed_until_a_move_is_measured() -> None:
    cost = MoveCost(assumed_gbps=4.0)
    assert cost.seconds(8 * 10**9) == pytest.approx(2.0)
    cost.record(8 * 10**9, 0.5)  # 16 GB/s measured
    assert cost.seconds(8 * 10**9) == pytest.approx(0.5)
    cost.record(10**9, None)  # not measured: keeps the last measurement
    assert cost.measured_gbps == pytest.approx(16.0)


# -- the controller on simulated fleets ---------------------------------------------------


def _scenario(**over: Any) -> Any:
    return parse_scenario(_spec(**over))


def _spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "primary_test",
        "global_batch": 256,
        "steps": 300,
        "seed": 1,
        "noise": 0.0,
        "job": {"mem_base_gb": 1.0, "mem_per_sample_gb": 0.02},
        "comm": {"alpha_ms": 2.0, "per_device_ms": 1.0},
        "primary_extra_ms": 30.0,
        "primary_extra_gb": 0.5,
        "devices": [
            {"name": "G", "memory_gb": 24, "samples_per_s": 1000, "alpha_ms": 10} for _ in range(3)
        ],
        "events": [],
    }
    spec.update(over)
    return spec


def _controller(sc: Any) -> tuple[SimulatedEngine, AllocationController]:
    engine = SimulatedEngine(sc, compute=False)
    ctl = AllocationController(
        engine, policy="adaptive", control_interval=1.0, snapshots=SimSnapshots(engine.fleet)
    )
    return engine, ctl


def test_the_controller_starts_on_a_fast_device_when_position_0_is_slow() -> None:
    devices = [
        {"name": "slow", "memory_gb": 24, "samples_per_s": 300, "alpha_ms": 10},
        {"name": "fast", "memory_gb": 24, "samples_per_s": 1000, "alpha_ms": 10},
        {"name": "fast", "memory_gb": 24, "samples_per_s": 1000, "alpha_ms": 10},
    ]
    engine, ctl = _controller(_scenario(devices=devices))
    assert ctl.primary == 1 and ctl.plan.primary == 1 and engine.plan.primary == 1
    assert ctl.plan.devices == (1, 0, 2)
    assert len(ctl.plan.shares) == 3  # arrays stay positional
    assert ctl.plan.chunks(256)[1] >= 1  # the primary always computes
    assert ctl.summary()["primary"] == "sim GPU 1 (fast)"


def test_the_controller_starts_off_position_0_when_it_is_nearly_full() -> None:
    full = [{"at_s": 0, "device": 0, "external_util": 0.0, "external_mem_gb": 22}]
    _, ctl = _controller(_scenario(events=full))
    assert ctl.primary != 0


def test_an_engine_that_cannot_move_its_primary_keeps_position_0() -> None:
    class Fixed(SimulatedEngine):
        movable_primary = False

    devices = [
        {"name": "slow", "memory_gb": 24, "samples_per_s": 300, "alpha_ms": 10},
        {"name": "fast", "memory_gb": 24, "samples_per_s": 1000, "alpha_ms": 10},
    ]
    engine = Fixed(_scenario(devices=devices), compute=False)
    ctl = AllocationController(engine, snapshots=SimSnapshots(engine.fleet))
    assert ctl.primary == 0 and ctl.plan.devices[0] == 0


def _primary_events(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if e.kind == EventKind.DEVICES and "primary" in e.detail]


HEAVY = [{"at_s": 20, "device": 0, "external_util": 0.95, "external_mem_gb": 0}]


def test_a_heavy_job_on_the_primary_moves_it_once_in_a_simulated_run() -> None:
    """At 20 s a job takes 95 % of GPU 0 for good: the primary (and its 30 ms of loss and
    optimizer work, which no share can shed) moves off it, once; the move's copy is charged
    on the virtual clock."""
    result = run_policy(_scenario(events=HEAVY), "adaptive")
    assert not result.failed, result.reason
    moves = _primary_events(result.events)
    assert len(moves) == 1, [e.detail for e in result.events]
    assert moves[0].t >= 20 and "moves from sim GPU 0 (G) to sim GPU" in moves[0].detail
    assert "MB" in moves[0].detail  # the copy's size and estimated seconds are told
    still = run_policy(_scenario(events=HEAVY), "static")  # never moves: slower after 20 s
    assert result.samples_per_s > 1.1 * still.samples_per_s


def test_the_report_of_a_simulated_training_run_tells_the_move(tmp_path: Path) -> None:
    """The user's path (``train`` on ``sim:``, the real model computing on the CPU)."""
    spec = _spec(events=HEAVY, steps=200)
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(spec))
    model = make_model()
    data = make_data(n=256 * 4, batch=256)
    report = adaptive_nb.train(
        ce_step,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        data=data,
        steps=200,
        devices=f"sim:{path}",
    )
    assert report.summary["primary_moves"] == 1
    assert report.summary["primary"] != "sim GPU 0 (G)"
    assert len(_primary_events(report.events)) == 1


def test_a_small_predicted_gain_does_not_move_the_primary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 91.5 % co-tenant on GPU 0 from 20 s: moving would gain ~4 % (< ``min_gain``), so
    the primary stays; without the hysteresis the same run moves it."""
    load = [{"at_s": 20, "device": 0, "external_util": 0.915, "external_mem_gb": 0}]
    assert not _primary_events(run_policy(_scenario(events=load), "adaptive").events)
    monkeypatch.setattr(allocation, "move_pays", lambda now, new, cost, **kw: new < now)
    moved = _primary_events(run_policy(_scenario(events=load), "adaptive").events)
    assert moved and "→" in moved[0].detail


def test_moves_are_spaced_by_the_set_change_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A heavy job hopping between GPU 0 and GPU 1 every 12 s: the primary follows at most
    once per ``set_change_interval`` (30 s); with no spacing it would chase the load."""
    hops = [
        {"at_s": t, "until_s": t + 12, "device": k % 2, "external_util": 0.95}
        for k, t in enumerate(range(10, 150, 12))
    ]
    for e in hops:
        e["external_mem_gb"] = 0
    spaced = [
        e.t
        for e in _primary_events(run_policy(_scenario(events=hops, steps=800), "adaptive").events)
    ]
    assert len(spaced) >= 2
    assert all(b - a >= 30.0 for a, b in itertools.pairwise(spaced)), spaced
    init = AllocationController.__init__

    def unspaced(self: AllocationController, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        self.primary_interval = 0.0

    monkeypatch.setattr(AllocationController, "__init__", unspaced)
    chased = [
        e.t
        for e in _primary_events(run_policy(_scenario(events=hops, steps=800), "adaptive").events)
    ]
    assert len(chased) > len(spaced) + 2


# -- the engine carries the move out exactly ----------------------------------------------


class _MoveAt(Controller):
    """Puts a plan with another primary in force at a given step (what the allocation
    controller does when a move pays), and keeps the shares otherwise."""

    def __init__(self, engine: DataParallelEngine, at_step: int) -> None:
        self.engine, self.at_step = engine, at_step
        self.outcomes: list[StepOutcome] = []

    def observe(self, outcome: StepOutcome) -> None:
        self.outcomes.append(outcome)

    def tick(self, now: float, step: int, snapshot: Snapshot | None) -> list[Event]:
        if step == self.at_step:
            self.engine.apply_plan(Plan((1, 0, 2), (0.3, 0.3, 0.4), 1, 12))
        return []


class _CpuStub(DataParallelEngine):
    """The DataParallel engine with CUDA stubbed (see test_backward_timing): every
    position's device is the CPU, so a move exercises the order and bookkeeping."""

    def torch_device(self, position: int) -> torch.device:
        return torch.device("cpu")

    def prepare(self, model: nn.Module) -> nn.Module:
        wrapper = self.wrap(model)
        wrapper.device_ids, wrapper.dim, wrapper.output_device = [0, 1, 2], 0, 0
        wrapper.src_device_obj = torch.device("cpu")
        return wrapper


def test_training_across_a_primary_move_equals_a_plain_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clocks = DeviceClocks()
    _stub(monkeypatch, clocks)
    for d in (0, 1, 2):
        monkeypatch.setitem(FWD, d, 1e-3)
        monkeypatch.setitem(BWD, d, 2e-3)
    engine = _CpuStub([0, 1, 2], clock=clocks, names=["A", "B", "C"], min_chunk=1)
    engine.apply_plan(Plan((0, 1, 2), (0.5, 0.25, 0.25), 1, 12))
    model = TimedNet(clocks)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(6)
    ]
    seen: list[tuple[int, list[int]]] = []

    def step(m: nn.Module, b: Any) -> torch.Tensor:
        out = m(b[0])
        wrapper = engine.wrapper
        assert wrapper is not None
        seen.append((engine.primary, list(wrapper.positions)))
        return nn.functional.cross_entropy(out, b[1])

    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    controller = _MoveAt(engine, 3)
    Run(
        step,
        model=model,
        optimizer=opt,
        data=data,
        epochs=None,
        steps=len(data),
        engine=engine,
        controller=controller,
        snapshots=None,
        policy="static",
        headroom=0.1,
        control_interval=0.0,
        handle_interrupt=False,
    ).execute()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for x, y in data:
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert engine.primary_moves == 1 and engine.primary == 1
    assert seen[:3] == [(0, [0, 1, 2])] * 3  # position 0 first until the move
    assert seen[3:] == [(1, [1, 0, 2])] * 3  # then the new primary first, positions kept
    assert engine.wrapper is not None and engine.wrapper.output_device == 1
    # the loss and the optimizer update are charged to the primary of their step
    phases = [o.device_phase_s for o in controller.outcomes if o.device_phase_s]
    assert phases, "the stubbed engine measured no step"
    extra = [{p for p, k in ph.items() if "loss" in k and "optimizer" in k} for ph in phases]
    assert (
        {0} in extra
        and {1} in extra
        and extra.index({1}) > max(i for i, e in enumerate(extra) if e == {0})
    )


def test_a_move_before_prepare_puts_the_model_straight_on_the_new_primary() -> None:
    engine = _CpuStub([0, 1], names=["A", "B"], min_chunk=1)
    engine.apply_plan(Plan((1, 0), (0.5, 0.5), 1, 8))
    assert engine.primary == 1 and engine.primary_moves == 0  # nothing to copy yet
    assert engine.primary_device() == torch.device("cpu")


# -- on a GPU machine ---------------------------------------------------------------------


@pytest.mark.gpu
def test_a_primary_move_on_gpus_trains_as_a_plain_loop() -> None:
    """The real move: module, gradients and Adam's state go to the new primary (two GPUs),
    or the move's order and bookkeeping on replicas emulated on one GPU (``[0, 0]``,
    nothing crosses devices then); training equals a plain loop on one device."""
    count = torch.cuda.device_count()
    ids = [0, 1] if count >= 2 else [0, 0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    ref = copy.deepcopy(model).cuda(0)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
        for _ in range(6)
    ]
    engine = DataParallelEngine(ids, min_chunk=1)
    engine.apply_plan(Plan((0, 1), (0.6, 0.4), 1, 64))

    class MoveAt(_MoveAt):
        def tick(self, now: float, step: int, snapshot: Snapshot | None) -> list[Event]:
            if step == self.at_step:
                self.engine.apply_plan(Plan((1, 0), (0.3, 0.7), 1, 64))
            return []

    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    Run(
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        model=model,
        optimizer=opt,
        data=data,
        epochs=None,
        steps=len(data),
        engine=engine,
        controller=MoveAt(engine, 3),
        snapshots=None,
        policy="static",
        headroom=0.1,
        control_interval=0.0,
        handle_interrupt=False,
    ).execute()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for x, y in data:
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x.cuda(0)), y.cuda(0)).backward()
        ref_opt.step()
    assert engine.primary_moves == 1 and engine.primary == 1
    assert engine.last_move_s is not None and engine.last_move_s >= 0.0
    where = torch.device("cuda", ids[1])
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert a.device == where
        torch.testing.assert_close(a.detach().cuda(0), b.detach(), rtol=1e-4, atol=1e-5)
        for value in opt.state[a].values():
            if value.dim() > 0:
                assert value.device == where  # the optimizer state followed the parameters
