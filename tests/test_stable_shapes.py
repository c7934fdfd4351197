"""Stable chunk shapes: chunks rounded to multiples of 8 when the step-time model says that
is cheap, a small set of sizes per device, sums exact, caps and ``min_chunk`` respected."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from adaptive_nb.layout import Plan
from adaptive_nb.plan.allocation import AllocationController
from adaptive_nb.plan.shapes import ShapeMemory, stable_chunks
from adaptive_nb.run.loop import Run
from adaptive_nb.sim import build_sim_run
from adaptive_nb.sim.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "benchmarks" / "scenarios"


def flat_cost(vec: list[int]) -> float:
    """Launch-dominated devices: 100 ms + 0.01 ms per sample on the slowest."""
    return max(0.1 + 1e-5 * c for c in vec if c > 0)


def linear_cost(vec: list[int]) -> float:
    """Compute-bound devices: time in proportion to the biggest chunk."""
    return float(max(vec))


def test_rounds_to_multiples_of_8_when_cheap() -> None:
    base = [129, 135, 115, 133]
    vec = stable_chunks(base, None, flat_cost)
    assert sum(vec) == sum(base)
    assert all(c % 8 == 0 for c in vec), vec
    assert flat_cost(vec) <= 1.02 * flat_cost(base)


def test_does_not_round_when_it_costs_more_than_two_percent() -> None:
    base = [13, 11, 12]  # a multiple of 8 is ≥ 25 % away from the slowest chunk
    assert stable_chunks(base, None, linear_cost) == base


def test_remainder_goes_to_one_device_and_the_sum_stays_exact() -> None:
    base = [101, 99, 100]  # 300 is not a multiple of 8: one device takes the rest
    vec = stable_chunks(base, None, flat_cost)
    assert sum(vec) == 300
    assert sum(1 for c in vec if c % 8) == 1


def test_caps_and_zeros_are_kept() -> None:
    base = [129, 135, 0, 133, 115]
    caps: list[int | None] = [130, None, 50, 133, None]
    vec = stable_chunks(base, caps, flat_cost)
    assert sum(vec) == sum(base)
    assert vec[2] == 0
    assert vec[0] <= 130 and vec[3] <= 133


def test_fuzz_sum_caps_min_chunk() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 6)
        base = [rng.choice([0, rng.randint(2, 300)]) for _ in range(n)]
        if not any(base):
            base[0] = 17
        caps: list[int | None] = [
            None if rng.random() < 0.5 else c + rng.randint(0, 10) for c in base
        ]
        mem = ShapeMemory()
        for _ in range(rng.randint(0, 6)):
            mem.record([rng.randint(1, 300) for _ in range(n)])
        cost = flat_cost if rng.random() < 0.5 else linear_cost
        vec = stable_chunks(base, caps, cost, mem, min_chunk=2, fault=rng.random() < 0.2)
        assert sum(vec) == sum(base)
        for i in range(n):
            cap = caps[i]
            assert (vec[i] == 0) == (base[i] == 0)
            assert cap is None or vec[i] <= cap
            assert vec[i] == 0 or vec[i] >= 2


def test_prefers_a_size_already_seen() -> None:
    mem = ShapeMemory()
    mem.record([128, 128])
    assert stable_chunks([130, 126], None, linear_cost, mem) == [128, 128]


def test_a_full_set_admits_no_new_size_unless_a_fault_forces_it() -> None:
    mem = ShapeMemory(max_sizes=4)
    for a in (40, 48, 56, 64):
        mem.record([a, 128 - a])
    base = [97, 31]  # far from every size seen, and costly to move to one
    vec = stable_chunks(base, None, linear_cost, mem)
    assert sum(vec) == 128
    assert vec[0] in mem.sizes(0) and vec[1] in mem.sizes(1)
    forced = stable_chunks(base, None, linear_cost, mem, fault=True)
    assert sum(forced) == 128 and forced[0] not in mem.sizes(0)


def test_controller_applies_rounded_chunks_from_its_models() -> None:
    """The controller turns a plan's shares into the rounded chunks: the engine's layout of
    the planned batch is exactly what ``stable_chunks`` chose."""
    _engine, ctl, _ = build_sim_run(
        SCENARIOS / "homogeneous_idle.json",
        policy="adaptive",
        headroom=0.1,
        control_interval=2.0,
        compute=False,
    )
    plan = Plan((0, 1, 2, 3), (0.26, 0.25, 0.25, 0.24), 1, 512)
    for d in ctl.devices:  # the same seeded model on every device: 8 ms + 1 ms/sample
        for b in (64, 128, 192, 256):
            d.time_model.update(b, 0.008 + 0.001 * b)
    stable = ctl._stable(plan, 0.0)
    chunks = stable.chunks()
    assert sum(chunks) == 512
    assert chunks != plan.chunks()
    assert all(c % 8 == 0 for c in chunks)


def _run(policy_shapes: bool, name: str) -> tuple[float, dict[int, set[int]]]:
    AllocationController.stable_shapes = policy_shapes
    seen: dict[int, set[int]] = defaultdict(set)
    scenario = load_scenario(SCENARIOS / name)
    engine, ctl, snaps = build_sim_run(
        SCENARIOS / name, policy="adaptive", headroom=0.1, control_interval=2.0, compute=False
    )
    layout = engine.layout

    def recording(total: int) -> list[list[int]]:
        out = layout(total)
        for micro in out:
            for p, c in enumerate(micro):
                if c:
                    seen[p].add(c)
        return out

    engine.layout = recording  # type: ignore[method-assign]
    model = nn.Linear(1, 1, bias=False)  # the model-free engine never runs it
    run = Run(
        _never,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data=itertools.repeat(torch.empty(scenario.global_batch, 0), scenario.steps),
        epochs=None,
        steps=scenario.steps,
        engine=engine,
        controller=ctl,
        snapshots=snaps,
        policy="adaptive",
        headroom=0.1,
        control_interval=2.0,
        handle_interrupt=False,
    )
    run.execute()
    assert run.ended == "completed"
    return run.samples / engine.clock(), seen


def _never(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:  # pragma: no cover
    raise AssertionError("the model-free engine never calls the step")


def test_fluctuating_load_keeps_few_sizes_per_device_at_the_same_throughput() -> None:
    """``flapping``: a job switches on and off on one GPU every 3 s for 600 steps, so the
    controller re-plans again and again. With stable shapes no device sees more than 4
    chunk sizes (without them one sees 5), and throughput stays within 2 %."""
    try:
        exact_rate, exact_seen = _run(False, "flapping.json")
        rate, seen = _run(True, "flapping.json")
    finally:
        AllocationController.stable_shapes = True
    assert max(len(s) for s in exact_seen.values()) > 4  # the run does stress the sizes
    assert max(len(s) for s in seen.values()) <= 4
    assert rate >= 0.98 * exact_rate
