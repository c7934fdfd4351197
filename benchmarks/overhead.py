"""Overhead of adaptive_nb's loop on CPU: a plain PyTorch loop vs ``adaptive_nb.train``.

Same model (3-layer MLP, batch 512, ≈ 30 ms steps on 2 cores), same data, one process.
Each round runs plain, ``policy="static"`` and ``policy="adaptive"`` once, in an order
that rotates from round to round (so drift of the machine does not favour one of them);
each static/adaptive run is divided by the plain run *of the same round*, and we report
the median of those per-round ratios with their IQR, next to the ratio of the medians.
``static`` is the cost of the loop + monitor (nothing adapts); ``adaptive`` adds the CPU
thread policy (which may also gain). Process CPU time (all threads, the monitor's
included) is reported beside wall time, and so is the median interval between step
starts (the per-step cost, robust to bursts of load from other jobs) with the fixed cost
per run outside the steps (start-up, final report): on a shared machine they move less.

The process-wide monitor that ``train`` starts keeps sampling (2 Hz thread) after a run;
left running, it would sample during the *plain* runs too and the comparison would leave
its cost out. So its sampler is stopped before every plain run (``train`` restarts the
same monitor; the restart, a thread start, is counted against adaptive_nb).

    .venv/bin/python benchmarks/overhead.py [--steps 100] [--rounds 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import pairwise
from typing import Any

import torch
from torch import nn

import adaptive_nb
from adaptive_nb.monitor.sampler import default_monitor

KINDS = ("plain", "static", "adaptive")


def make_job(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, list[Any]]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(512, 512, generator=g), torch.randint(0, 10, (512,), generator=g))
        for _ in range(8)
    ]
    return model, opt, data


STARTS: list[float] = []  # when each step of the current run began (perf_counter)


def step(model: nn.Module, batch: Any) -> torch.Tensor:
    STARTS.append(time.perf_counter())
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def stop_sampler() -> None:
    """Stop the default monitor's sampling thread (if running) without forgetting it."""
    mon = default_monitor()
    mon.stop()


Timing = tuple[float, float, float, float]
"""Seconds: wall, process CPU, median step (start to start), fixed cost outside the steps."""


def timing(t0: float, c0: float) -> Timing:
    """From the run's start times and the step starts recorded by :func:`step`. The median
    step interval is robust to bursts of load from other processes; the fixed part is what
    happens before the first step and after the last one beyond a median step."""
    end, used = time.perf_counter(), time.process_time() - c0
    gaps = [b - a for a, b in pairwise(STARTS)]
    step_s = statistics.median(gaps) if gaps else end - t0
    fixed = (STARTS[0] - t0) + max(0.0, end - STARTS[-1] - step_s) if STARTS else 0.0
    return end - t0, used, step_s, fixed


def plain(steps: int) -> Timing:
    """A plain PyTorch loop."""
    model, opt, data = make_job()
    stop_sampler()
    STARTS.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    while done < steps:
        for b in data:
            if done >= steps:
                break
            opt.zero_grad(set_to_none=True)
            step(model, b).backward()
            opt.step()
            done += 1
    return timing(t0, c0)


def managed(steps: int, policy: str, info: dict[str, list[Any]]) -> Timing:
    """``adaptive_nb.train`` (its monitor thread included in the CPU time)."""
    model, opt, data = make_job()
    STARTS.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    report = adaptive_nb.train(
        step, model=model, optimizer=opt, data=data, steps=steps, policy=policy, devices="cpu"
    )
    elapsed = timing(t0, c0)
    s = report.summary
    info.setdefault(f"{policy}_own_pct", []).append(float(s["controller_overhead_pct"]))
    if policy == "adaptive":
        info.setdefault("probes", []).append(int(s.get("thread_probes", 0)))
        info.setdefault("decisions", []).append(str(s.get("thread_decision", "")))
        info.setdefault("threads", []).append(s.get("threads"))
    return elapsed


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def measure(steps: int, rounds: int) -> dict[str, Any]:
    """Rotated rounds of plain / static / adaptive; per-round ratios against plain."""
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    step_s: dict[str, list[float]] = {k: [] for k in KINDS}
    fixed: dict[str, list[float]] = {k: [] for k in KINDS}
    info: dict[str, list[Any]] = {}
    plain(5)  # warm up allocator and kernels (not measured)
    managed(5, "static", {})
    for r in range(rounds):
        order = KINDS[r % 3 :] + KINDS[: r % 3]
        for kind in order:
            got = plain(steps) if kind == "plain" else managed(steps, kind, info)
            for into, value in zip((times, cpu, step_s, fixed), got, strict=True):
                into[kind].append(value)
    stop_sampler()
    out: dict[str, Any] = {
        "steps": steps,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "step_ms_plain": round(1000 * statistics.median(times["plain"]) / steps, 2),
    }
    for kind in ("static", "adaptive"):
        ratios = [a / p for a, p in zip(times[kind], times["plain"], strict=True)]
        q1, med, q3 = quartiles(ratios)
        out[f"{kind}_ratio_median"] = round(med, 4)
        out[f"{kind}_ratio_iqr"] = [round(q1, 4), round(q3, 4)]
        out[f"{kind}_ratio_of_medians"] = round(
            statistics.median(times[kind]) / statistics.median(times["plain"]), 4
        )
        cpu_ratios = [a / p for a, p in zip(cpu[kind], cpu["plain"], strict=True)]
        c1, cmed, c3 = quartiles(cpu_ratios)
        out[f"{kind}_cpu_ratio_median"] = round(cmed, 4)
        out[f"{kind}_cpu_ratio_iqr"] = [round(c1, 4), round(c3, 4)]
        step_ratios = [a / p for a, p in zip(step_s[kind], step_s["plain"], strict=True)]
        s1, smed, s3 = quartiles(step_ratios)
        out[f"{kind}_step_ratio_median"] = round(smed, 4)
        out[f"{kind}_step_ratio_iqr"] = [round(s1, 4), round(s3, 4)]
        extra = [1000 * (a - p) for a, p in zip(fixed[kind], fixed["plain"], strict=True)]
        out[f"{kind}_fixed_extra_ms_median"] = round(statistics.median(extra), 2)
        out[f"{kind}_own_time_pct_median"] = round(statistics.median(info[f"{kind}_own_pct"]), 3)
    out["adaptive_probes"] = sum(info["probes"])
    out["adaptive_decisions"] = sorted(set(info["decisions"]))
    out["adaptive_threads"] = sorted({t for t in info["threads"] if t is not None})
    return out


def print_result(res: dict[str, Any]) -> None:
    print(
        f"plain loop: {res['step_ms_plain']:.1f} ms/step (median of {res['rounds']} runs of "
        f"{res['steps']} steps, torch threads {res['torch_threads']})"
    )
    for kind in ("static", "adaptive"):
        q1, q3 = res[f"{kind}_ratio_iqr"]
        print(
            f"policy={kind:<8}: {kind}/plain median {res[f'{kind}_ratio_median']:.4f} "
            f"(IQR {q1:.4f}–{q3:.4f} over {res['rounds']} rounds; ratio of medians "
            f"{res[f'{kind}_ratio_of_medians']:.4f}); own time "
            f"{res[f'{kind}_own_time_pct_median']:.3f}% of wall"
        )
        c1, c3 = res[f"{kind}_cpu_ratio_iqr"]
        print(
            f"{'':<16}  process CPU time {kind}/plain median "
            f"{res[f'{kind}_cpu_ratio_median']:.4f} (IQR {c1:.4f}–{c3:.4f})"
        )
        s1, s3 = res[f"{kind}_step_ratio_iqr"]
        print(
            f"{'':<16}  median step interval {kind}/plain median "
            f"{res[f'{kind}_step_ratio_median']:.4f} (IQR {s1:.4f}–{s3:.4f}); fixed cost "
            f"per run beyond plain's: {res[f'{kind}_fixed_extra_ms_median']:.1f} ms (median)"
        )
    print(
        f"adaptive thread probes over all rounds: {res['adaptive_probes']}; decisions: "
        f"{', '.join(res['adaptive_decisions'])}; threads held: {res['adaptive_threads']}"
    )
    if res["step_ms_plain"] < 20:
        print("warning: step time under 20 ms; the goal is stated for steps ≥ 20 ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = ap.parse_args(argv)
    res = measure(args.steps, args.rounds)
    print_result(res)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
