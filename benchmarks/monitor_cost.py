"""What monitoring costs: mean time of one sample (host + 4 simulated GPUs) and the CPU
share the 2 Hz background thread takes.

    .venv/bin/python benchmarks/monitor_cost.py [--samples 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from adaptive_nb.monitor import HostSampler, Monitor
from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml


def four_gpus() -> FakeNvml:
    pid = os.getpid()
    return FakeNvml(
        [
            FakeGpu(
                name=f"Simulated A100 #{k}",
                mem_total_mb=40960.0,
                util_pct=50.0,
                processes=[(pid, 8000.0), (pid + 1, 2000.0)],
                power_w=250.0,
                temperature_c=60.0,
            )
            for k in range(4)
        ]
    )


def per_sample_cost(samples: int) -> dict[str, float]:
    host = HostSampler()
    mon = Monitor(nvml=four_gpus(), host=host, capacity=samples)
    mon.sample_now()  # static GPU info is read once; measure the steady state
    times_all: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        mon.sample_now()
        times_all.append(time.perf_counter() - t0)
    t_host: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        host.sample()
        t_host.append(time.perf_counter() - t0)
    t_gpu: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        mon.gpu.sample()
        t_gpu.append(time.perf_counter() - t0)
    return {
        "sample_mean_us": statistics.fmean(times_all) * 1e6,
        "sample_p99_us": sorted(times_all)[int(0.99 * len(times_all))] * 1e6,
        "host_mean_us": statistics.fmean(t_host) * 1e6,
        "gpus4_mean_us": statistics.fmean(t_gpu) * 1e6,
    }


def thread_cpu_share(seconds: float, rate_hz: float) -> dict[str, float]:
    """CPU time used by the sampler thread itself (its own clock) over wall time."""
    mon = Monitor(rate_hz=rate_hz, nvml=four_gpus())
    cpu = {"s": 0.0}
    orig = mon.sample_now

    def timed() -> object:
        t0 = time.thread_time()
        snap = orig()
        if threading.current_thread().name == "adaptive_nb-monitor":
            cpu["s"] += time.thread_time() - t0
        return snap

    mon.sample_now = timed  # type: ignore[method-assign]
    p0, w0 = time.process_time(), time.perf_counter()
    mon.start()
    time.sleep(seconds)
    mon.stop()
    wall = time.perf_counter() - w0
    proc = time.process_time() - p0
    return {
        "samples": float(mon.samples_taken),
        "thread_cpu_pct_of_one_core": 100.0 * cpu["s"] / wall,
        "process_cpu_pct_of_one_core": 100.0 * proc / wall,  # includes the idle main thread
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=2.0)
    args = ap.parse_args()
    cost = per_sample_cost(args.samples)
    print(
        f"one sample (host + 4 simulated GPUs): mean {cost['sample_mean_us']:.0f} us, "
        f"p99 {cost['sample_p99_us']:.0f} us"
    )
    print(
        f"  host only: {cost['host_mean_us']:.0f} us; 4 GPUs only: {cost['gpus4_mean_us']:.0f} us"
    )
    share = thread_cpu_share(args.seconds, args.rate)
    print(
        f"{args.rate:g} Hz thread over {args.seconds:g} s ({share['samples']:.0f} samples): "
        f"{share['thread_cpu_pct_of_one_core']:.3f} % of one core "
        f"(whole process while idle: {share['process_cpu_pct_of_one_core']:.3f} %)"
    )


if __name__ == "__main__":
    main()
