"""Cost of the GPU allocation controller per step (``observe``) and per control tick
(``tick``: read the snapshot, update forecasts, re-plan) at 1, 4, 8 and 16 devices.

No GPU and no model: a stub engine takes the controller's plans and a closed loop makes
each step's measurements from the plan in force (devices of different speeds, one of
them loaded by another job half of the time, memory growing with the chunk), as the real
engine would report them; every tick gets a synthetic NVML snapshot of those devices.
Steps take 0.2 s of virtual time and ticks come every 2 s (the default control
interval), so the device set may change at most every 30 s (every 15th tick): ticks that
search device subsets are the expensive ones and are reported apart (max).

    .venv/bin/python benchmarks/tick_cost.py [--ticks 120] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import torch

from adaptive_nb.layout import Plan
from adaptive_nb.monitor.snapshot import GpuSample, HostSample, Snapshot
from adaptive_nb.plan.allocation import AllocationController
from adaptive_nb.step import StepOutcome

BATCH = 256
STEP_S = 0.2
STEPS_PER_TICK = 10
DEVICE_COUNTS = (1, 4, 8, 16)


class StubEngine:
    """Holds the plan the controller applies; nothing runs. Its primary can move (as the
    DataParallel engine's), so ticks include the controller's primary check."""

    movable_primary = True

    def __init__(self, n: int) -> None:
        self.n = n
        self.plan: Plan | None = None

    def device_names(self) -> list[str]:
        return [f"GPU {i}" for i in range(self.n)]

    def monitor_keys(self) -> list[int | None]:
        return list(range(self.n))

    def apply_plan(self, plan: Plan) -> None:
        self.plan = plan

    def move_bytes(self) -> int:
        return 400 * 2**20  # a 25M-parameter model with Adam

    @property
    def last_batch(self) -> int:
        return BATCH


class Fleet:
    """Per-device speed (seconds per sample) and load; outcomes for a plan."""

    def __init__(self, n: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.per_sample = [0.0004 * (1.0 + 0.5 * (i % 3)) for i in range(n)]
        self.n = n

    def loaded(self, pos: int, now: float) -> bool:
        return self.n > 1 and pos == self.n - 1 and int(now // 20) % 2 == 1

    def outcome(self, plan: Plan, now: float) -> StepOutcome:
        chunks = plan.chunks(BATCH)
        times, batch, mem = {}, {}, {}
        for pos, b in enumerate(chunks):
            if b <= 0:
                continue
            slow = 2.0 if self.loaded(pos, now) else 1.0
            noise = 1.0 + 0.03 * self.rng.random()
            times[pos] = (0.005 + self.per_sample[pos] * b) * slow * noise
            batch[pos] = b
            mem[pos] = 1500.0 + 12.0 * b
        slowest = max(times.values())
        return StepOutcome(
            loss=torch.zeros(()),
            samples=BATCH,
            wall_s=slowest + 0.002 * len(times),
            device_time_s=times,
            device_batch=batch,
            peak_mem_mb=mem,
        )

    def snapshot(self, now: float, plan: Plan) -> Snapshot:
        gpus = []
        for i in range(self.n):
            ours = i in plan.devices
            util = 90.0 if ours else (60.0 if self.loaded(i, now) else 0.0)
            used = 4000.0 if ours else 500.0
            gpus.append(
                GpuSample(
                    index=i,
                    nvml_index=i,
                    uuid=f"GPU-stub-{i}",
                    name=f"Stub GPU {i}",
                    util_pct=util,
                    mem_used_mb=used,
                    mem_free_mb=40960.0 - used,
                    mem_total_mb=40960.0,
                    simulated=True,
                )
            )
        host = HostSample(
            cpu_pct=30.0,
            per_core_pct=(),
            ram_used_mb=8000,
            ram_available_mb=8000,
            ram_total_mb=16000,
            proc_cpu_pct=100.0,
            proc_rss_mb=2000,
            cpu_cores=16,
        )
        return Snapshot(t=now, host=host, gpus=tuple(gpus))


def one_run(n: int, ticks: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-call seconds of observe and of tick over ``ticks`` control ticks."""
    engine = StubEngine(n)
    ctl = AllocationController(engine)
    fleet = Fleet(n, seed)
    observe_s, tick_s = [], []
    clock = time.perf_counter
    step = 0
    for _ in range(ticks):
        for _ in range(STEPS_PER_TICK):
            assert engine.plan is not None
            out = fleet.outcome(engine.plan, step * STEP_S)
            t0 = clock()
            ctl.observe(out)
            observe_s.append(clock() - t0)
            step += 1
        now = step * STEP_S
        assert engine.plan is not None
        snap = fleet.snapshot(now, engine.plan)
        t0 = clock()
        ctl.tick(now, step, snap)
        tick_s.append(clock() - t0)
    return observe_s, tick_s


def measure(n: int, ticks: int, repeats: int) -> dict[str, Any]:
    obs_med, tick_med, tick_p90, tick_max = [], [], [], []
    for r in range(repeats):
        observe_s, tick_s = one_run(n, ticks, seed=r)
        obs_med.append(statistics.median(observe_s))
        tick_med.append(statistics.median(tick_s))
        tick_p90.append(statistics.quantiles(tick_s, n=10)[-1])
        tick_max.append(max(tick_s[1:]))  # the first tick also builds the first models
    return {
        "devices": n,
        "observe_us_median": round(1e6 * statistics.median(obs_med), 1),
        "observe_us_range": [round(1e6 * min(obs_med), 1), round(1e6 * max(obs_med), 1)],
        "tick_ms_median": round(1e3 * statistics.median(tick_med), 3),
        "tick_ms_p90": round(1e3 * statistics.median(tick_p90), 3),
        "tick_ms_max": round(1e3 * statistics.median(tick_max), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=120, help="control ticks per run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per device count")
    ap.add_argument("--devices", type=int, nargs="*", default=list(DEVICE_COUNTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = []
    for n in args.devices:
        res = measure(n, args.ticks, args.repeats)
        results.append(res)
        lo, hi = res["observe_us_range"]
        print(
            f"{n:>2} device(s): observe {res['observe_us_median']:.1f} µs/step "
            f"(runs {lo:.1f}–{hi:.1f}); tick median {res['tick_ms_median']:.3f} ms, "
            f"p90 {res['tick_ms_p90']:.3f} ms, max {res['tick_ms_max']:.3f} ms "
            "(medians over runs)"
        )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
