"""The measurement scripts in ``benchmarks/`` still run against the package (a refactor
once left one importing a folder that no longer existed). Tiny sizes: this checks that
they run and report what they claim to, never a timing."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def test_overhead_rotates_rounds_and_pairs_each_run_with_its_rounds_plain_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import overhead

    calls: list[str] = []
    scale = (10.0, 1.0, 100.0)  # each round on a very different machine state
    factor = {"plain": 1.0, "static": 1.1, "adaptive": 1.2}

    def timed(kind: str) -> tuple[float, float, float, float]:
        rnd = len(calls) // 3
        calls.append(kind)
        v = factor[kind] * scale[rnd]
        return v, v, v / 10, v / 100

    def fake_plain(steps: int) -> tuple[float, float, float, float]:
        return (0.0,) * 4 if steps == 5 else timed("plain")  # 5 steps: the warm-up

    def fake_managed(
        steps: int, policy: str, info: dict[str, list[object]]
    ) -> tuple[float, float, float, float]:
        if steps == 5:
            return (0.0,) * 4
        info.setdefault(f"{policy}_own_pct", []).append(0.1)
        if policy == "adaptive":
            info.setdefault("probes", []).append(0)
            info.setdefault("decisions", []).append("run too short to pay for a probe")
            info.setdefault("threads", []).append(2)
        return timed(policy)

    monkeypatch.setattr(overhead, "plain", fake_plain)
    monkeypatch.setattr(overhead, "managed", fake_managed)
    res = overhead.measure(steps=10, rounds=3)
    assert calls == [
        *("plain", "static", "adaptive"),
        *("static", "adaptive", "plain"),
        *("adaptive", "plain", "static"),
    ]
    # every ratio is against the plain run of the same round, so no spread at all
    assert res["static_ratio_median"] == pytest.approx(1.1)
    assert res["static_ratio_iqr"] == pytest.approx([1.1, 1.1])
    assert res["adaptive_ratio_median"] == pytest.approx(1.2)
    assert res["adaptive_ratio_iqr"] == pytest.approx([1.2, 1.2])
    assert res["adaptive_cpu_ratio_median"] == pytest.approx(1.2)
    assert res["adaptive_step_ratio_median"] == pytest.approx(1.2)
    assert res["static_fixed_extra_ms_median"] == pytest.approx(1000 * 0.1 * 10 / 100)


def test_plain_runs_are_timed_with_the_monitor_sampler_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import overhead

    from adaptive_nb.monitor.sampler import default_monitor

    mon = default_monitor()  # as a previous adaptive_nb run leaves it: sampling
    assert mon.running
    sampling: list[bool] = []
    real_step = overhead.step

    def step(model: object, batch: object) -> object:
        sampling.append(mon.running)
        return real_step(model, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(overhead, "step", step)
    _, _, step_s, fixed = overhead.plain(2)
    assert sampling == [False, False]
    assert step_s > 0 and fixed >= 0


def test_short_run_refuses_too_few_rounds() -> None:
    import short_run

    with pytest.raises(SystemExit):
        short_run.main(["--rounds", "3"])


def test_tick_cost_drives_the_controller_through_ticks() -> None:
    import tick_cost

    observe_s, tick_s = tick_cost.one_run(4, ticks=3, seed=0)
    assert len(observe_s) == 3 * tick_cost.STEPS_PER_TICK and len(tick_s) == 3


def test_dashboard_overhead_kernel_code_imports_this_folder() -> None:
    import dashboard_overhead

    assert dashboard_overhead.HERE == BENCH
    assert (dashboard_overhead.HERE / "dashboard_overhead.py").exists()
