"""The planner against brute force on small cases, micro-batches, the greedy search."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from adaptive_nb.layout import Plan
from adaptive_nb.plan.planner import (
    DeviceModel,
    Overhead,
    best_plan,
    evaluate,
    plan_for_subset,
    solve_split,
    static_plan,
)


def brute_split(models: list[DeviceModel], batch: int) -> float:
    """Best max-time over all integer splits with every chunk in [1, cap]."""
    best = math.inf
    for chunks in itertools.product(range(1, batch + 1), repeat=len(models)):
        if sum(chunks) != batch:
            continue
        if any(m.cap is not None and c > m.cap for m, c in zip(models, chunks, strict=True)):
            continue
        best = min(best, max(m.time(c) for m, c in zip(models, chunks, strict=True)))
    return best


def brute_plan(models: list[DeviceModel], batch: int, overhead: Overhead, primary: int) -> float:
    """Best step time over every subset containing the primary and every split (m=1)."""
    best = math.inf
    others = [m for m in models if m.position != primary]
    first = next(m for m in models if m.position == primary)
    for r in range(len(others) + 1):
        for combo in itertools.combinations(others, r):
            chosen = [first, *combo]
            t = brute_split(chosen, batch)
            best = min(best, t + overhead(len(chosen)))
    return best


def random_models(rng: random.Random, n: int, caps: bool) -> list[DeviceModel]:
    return [
        DeviceModel(
            i,
            alpha=rng.uniform(0, 0.05),
            beta=rng.uniform(0.001, 0.02),
            cap=rng.choice([None, rng.randint(2, 8)]) if caps else None,
        )
        for i in range(n)
    ]


def test_solve_split_matches_brute_force() -> None:
    rng = random.Random(1)
    for _ in range(150):
        models = random_models(rng, rng.randint(1, 3), caps=True)
        batch = rng.randint(len(models), 12)
        chunks = solve_split(models, batch)
        expected = brute_split(models, batch)
        if math.isinf(expected):
            assert chunks is None
            continue
        assert chunks is not None and sum(chunks) == batch
        got = max(m.time(c) for m, c in zip(models, chunks, strict=True))
        assert got == pytest_approx(expected)


def pytest_approx(x: float) -> object:
    import pytest

    return pytest.approx(x, rel=1e-9, abs=1e-12)


def test_best_plan_matches_brute_force_over_subsets() -> None:
    rng = random.Random(2)
    for _ in range(80):
        models = random_models(rng, rng.randint(1, 4), caps=rng.random() < 0.5)
        batch = rng.randint(4, 10)
        overhead = Overhead(rng.uniform(0, 0.01), rng.uniform(0, 0.03))
        expected = brute_plan(models, batch, overhead, primary=0)
        plan = best_plan(models, len(models), batch, overhead, primary=0, max_micro_batches=1)
        if math.isinf(expected):
            assert plan is None
            continue
        assert plan is not None and plan.primary == 0 and plan.micro_batches == 1
        assert plan.predicted_step_s == pytest_approx(expected)
        assert sum(plan.chunks()) == batch


def test_slow_device_is_left_out_when_overhead_outweighs_it() -> None:
    models = [DeviceModel(0, 0.01, 0.001), DeviceModel(1, 0.01, 0.001), DeviceModel(2, 0.3, 0.05)]
    plan = best_plan(models, 3, 64, Overhead(0.002, 0.005), primary=0)
    assert plan is not None and plan.devices == (0, 1)
    assert plan.shares[2] == 0.0


def test_shares_follow_speed() -> None:
    models = [DeviceModel(0, 0.0, 0.002), DeviceModel(1, 0.0, 0.001)]  # device 1 twice as fast
    plan = best_plan(models, 2, 300, Overhead(), primary=0)
    assert plan is not None
    assert plan.chunks() == [100, 200]


def test_micro_batches_when_nothing_fits() -> None:
    models = [DeviceModel(0, 0.01, 0.001, cap=40), DeviceModel(1, 0.01, 0.001, cap=40)]
    plan = best_plan(models, 2, 200, Overhead(0.001, 0.0), primary=0)
    assert plan is not None and plan.micro_batches == 3
    for chunks in plan.layout(200):
        assert all(c <= 40 for c in chunks)
    assert sum(sum(c) for c in plan.layout(200)) == 200


def test_nothing_fits_at_all() -> None:
    models = [DeviceModel(0, 0.0, 0.001, cap=0)]
    assert best_plan(models, 1, 10, Overhead(), primary=0) is None


def test_evaluate_is_infinite_when_a_cap_drops_below_the_chunk() -> None:
    models = [DeviceModel(0, 0.0, 0.001), DeviceModel(1, 0.0, 0.001)]
    plan = best_plan(models, 2, 100, Overhead(), primary=0)
    assert plan is not None
    assert evaluate(plan, models, Overhead()) == pytest_approx(0.05)
    squeezed = [DeviceModel(0, 0.0, 0.001, cap=10), DeviceModel(1, 0.0, 0.001, cap=10)]
    assert math.isinf(evaluate(plan, squeezed, Overhead()))


def test_greedy_beyond_eight_devices_is_near_exact() -> None:
    rng = random.Random(3)
    for _ in range(5):
        models = random_models(rng, 10, caps=False)
        overhead = Overhead(0.002, 0.004)
        greedy = best_plan(models, 10, 512, overhead, primary=0)
        subsets = [[0, *c] for r in range(10) for c in itertools.combinations(range(1, 10), r)]
        exact = best_plan(models, 10, 512, overhead, primary=0, subsets=subsets)
        assert greedy is not None and exact is not None
        assert greedy.predicted_step_s is not None and exact.predicted_step_s is not None
        assert greedy.predicted_step_s <= exact.predicted_step_s * 1.02


def test_static_plan_equal_split_and_micro_batches() -> None:
    plan = static_plan([0, 1, 2], 3, 10)
    assert plan is not None and plan.layout(10) == [[4, 3, 3]]
    capped = static_plan([0, 1], 2, 100, caps=[30, None])
    assert capped is not None and capped.micro_batches == 2
    assert capped.layout(100) == [[25, 25], [25, 25]]


def test_plan_for_subset_reports_shares_by_position() -> None:
    models = [DeviceModel(0, 0.0, 0.001), DeviceModel(1, 0.0, 0.001), DeviceModel(2, 0.0, 0.001)]
    plan = plan_for_subset(models, [0, 2], 3, 10, Overhead(), 1)
    assert isinstance(plan, Plan)
    assert plan.devices == (0, 2) and plan.shares[1] == 0.0
    assert plan.chunks() == [5, 0, 5]


# -- min_chunk: a device gets at least that many samples, or none -------------------------


def _three(slow_beta: float = 3.0) -> list[DeviceModel]:
    return [DeviceModel(0, 0.0, 1.0), DeviceModel(1, 0.0, 1.0), DeviceModel(2, 0.0, slow_beta)]


def test_solve_split_gives_every_device_at_least_min_chunk() -> None:
    assert solve_split(_three(), 9) == [4, 4, 1]  # the slow device's best is one sample
    assert min(solve_split(_three(), 9, min_chunk=2) or [0]) >= 2
    assert solve_split(_three(), 5, min_chunk=2) is None  # 3 devices cannot all get 2
    capped = [DeviceModel(0, 0.0, 1.0), DeviceModel(1, 0.0, 1.0, cap=1)]
    assert solve_split(capped, 6, min_chunk=2) is None  # a cap under min_chunk


def test_a_device_that_cannot_get_min_chunk_is_left_out_of_the_plan() -> None:
    """Batch 9: with one-sample chunks allowed the slow device takes 1 (step 4 vs 5); with
    min_chunk 2 giving it 2 would cost 6, so the plan leaves it out instead of giving it
    fewer than 2 (what the engine would do to that chunk anyway)."""
    loose = best_plan(_three(), 3, 9, Overhead(), primary=0)
    assert loose is not None and loose.devices == (0, 1, 2) and loose.chunks(9)[2] == 1
    plan = best_plan(_three(), 3, 9, Overhead(), primary=0, min_chunk=2)
    assert plan is not None and plan.devices == (0, 1)
    assert plan.chunks(9) in ([5, 4, 0], [4, 5, 0])
    assert plan.predicted_step_s == pytest.approx(5.0)
    assert evaluate(plan, _three(), Overhead(), 9, min_chunk=2) == pytest.approx(5.0)


def test_min_chunk_holds_in_every_micro_batch() -> None:
    """A's cap forces micro-batches; without the minimum the slow B would take one sample
    of each; with min_chunk 3 no micro-batch gives any device fewer than 3."""
    models = [DeviceModel(0, 0.0, 1.0, cap=10), DeviceModel(1, 0.0, 5.0)]
    loose = best_plan(models, 2, 22, Overhead(), primary=0)
    assert loose is not None and any(0 < c < 3 for m in loose.layout(22) for c in m)
    plan = best_plan(models, 2, 22, Overhead(), primary=0, min_chunk=3)
    assert plan is not None
    for chunks in plan.layout(22):
        assert all(c == 0 or c >= 3 for c in chunks), chunks


def _full_scan(
    models: list[DeviceModel], batch: int, overhead: Overhead, primary: int, min_chunk: int
) -> Plan | None:
    """best_plan's search without pruning: every subset at every micro-batch count tried,
    the first strict minimum kept (the enumeration before branch and bound)."""
    idx = next(i for i, m in enumerate(models) if m.position == primary)
    others = [i for i in range(len(models)) if i != idx]
    subsets = [[idx, *c] for r in range(len(others) + 1) for c in itertools.combinations(others, r)]
    best: Plan | None = None
    m_fit: int | None = None
    for m in range(1, 65):
        if m_fit is not None and m > m_fit + 1:
            break
        found: Plan | None = None
        for s in subsets:
            p = plan_for_subset(models, s, len(models), batch, overhead, m, min_chunk)
            if p is not None and (found is None or p.predicted_step_s < found.predicted_step_s):  # type: ignore[operator]
                found = p
        if found is not None:
            m_fit = m if m_fit is None else m_fit
            if best is None or found.predicted_step_s < best.predicted_step_s:  # type: ignore[operator]
                best = found
        if m >= batch:
            break
    return best


def test_pruned_subset_search_finds_what_the_full_scan_finds() -> None:
    """Branch and bound over subsets returns the very plan the full enumeration returns
    (same devices, shares, micro-batches, time) on random fleets of up to 8 devices."""
    rng = random.Random(7)
    for trial in range(60):
        n = rng.randint(1, 8)
        models = random_models(rng, n, caps=trial % 2 == 0)
        batch = rng.randint(n, 300)
        overhead = Overhead(rng.uniform(0, 0.01), rng.uniform(0, 0.01))
        min_chunk = rng.choice([1, 1, 2])
        got = best_plan(models, n, batch, overhead, primary=0, min_chunk=min_chunk)
        want = _full_scan(models, batch, overhead, 0, min_chunk)
        assert got == want, (trial, got, want)
