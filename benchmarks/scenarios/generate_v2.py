"""Writes the schema-v2 scenarios of this folder (run from the repository root:
``python benchmarks/scenarios/generate_v2.py``). Kept so that every number in them can be
traced to its source and assumption.

Calibration. Large-batch throughput: ResNet-50, fp32, from Lambda's public deep-learning
GPU benchmark tables (samples/s): RTX 4090 ~721, RTX 3090 ~513, RTX A6000 ~514,
A100 40GB ~882, V100 ~369. Lambda publishes those plateau figures, not a per-batch curve:
the *shape* below is our assumption, following the usual pattern (small batches cannot
fill the GPU; near-plateau from batch 64 on recent GPUs; the older, smaller V100
saturates a little earlier). The curve is the replica's idle forward + backward time:
``ms(b) = 1000·b / (fraction(b) · plateau)``.

Nothing here was tuned to the planner's results: the scenarios were written before the
benchmark was run on them, and their figures are reported as they came out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

PLATEAU = {
    "RTX 4090": 721.0,
    "RTX 3090": 513.0,
    "RTX A6000": 514.0,
    "A100 40GB PCIe": 882.0,
    "V100 16GB": 369.0,
}
MEMORY = {"RTX 4090": 24, "RTX 3090": 24, "RTX A6000": 48, "A100 40GB PCIe": 40, "V100 16GB": 16}
BATCHES = (1, 4, 8, 16, 32, 64, 128, 256, 512)
RECENT = (0.10, 0.33, 0.52, 0.70, 0.84, 0.94, 0.98, 1.0, 1.0)  # share of plateau
OLDER = (0.14, 0.42, 0.62, 0.79, 0.90, 0.97, 0.99, 1.0, 1.0)  # V100: saturates earlier

SOURCE = (
    "ResNet-50 fp32 plateau throughputs from Lambda's public GPU benchmark tables "
    "(4090 ~721, 3090 ~513, A6000 ~514, A100 40GB ~882, V100 ~369 samples/s); per-batch "
    "curve shape assumed (near-plateau from batch 64; see generate_v2.py)."
)


def curve(model: str) -> list[list[float]]:
    shape = OLDER if model.startswith("V100") else RECENT
    return [
        [b, round(1000.0 * b / (f * PLATEAU[model]), 3)]
        for b, f in zip(BATCHES, shape, strict=True)
    ]


def gpu(model: str, *, curved: bool = True, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": model, "memory_gb": MEMORY[model]}
    if curved:
        d["curve"] = curve(model)
    else:
        d["samples_per_s"] = PLATEAU[model]
        d["alpha_ms"] = 8
    d.update(extra)
    return d


def base(name: str, description: str, devices: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "description": description,
        "global_batch": 512,
        "steps": 400,
        "seed": 1,
        "noise": 0.03,
        "job": {"mem_base_gb": 2.0, "mem_per_sample_gb": 0.09},
        "comm": {"alpha_ms": 4.0, "per_device_ms": 6.0},
        "primary_extra_ms": 8.0,
        "primary_extra_gb": 1.0,
        "devices": devices,
        "events": [],
    }
    spec.update(over)
    return spec


def bursts(
    devices: list[int], start: float, stop: float, every: float, length: float, gb: float
) -> list[dict[str, Any]]:
    out = []
    t, k = start, 0
    while t < stop:
        dev = devices[k % len(devices)]
        out.append({"at_s": t, "until_s": t + length, "device": dev, "external_mem_gb": gb})
        t += every
        k += 1
    return out


def scenarios() -> list[dict[str, Any]]:
    mixed5 = ["RTX 4090", "RTX 3090", "RTX A6000", "A100 40GB PCIe", "V100 16GB"]
    out = [
        base(
            "curves_mixed_generations",
            SOURCE + " Five generations, idle, measured-style curves instead of the "
            "planner's alpha + b/speed line.",
            [gpu(m) for m in mixed5],
            global_batch=640,
        ),
        base(
            "time_sliced_cotenant",
            "Four A100 40GB (linear timing, Lambda plateau 882 samples/s). From 20 s a "
            "time-sliced co-tenant on GPU 1: NVML reports 99% utilisation, but it costs us "
            "only 1.25x (a light kernel stream sharing the GPU by time slices).",
            [gpu("A100 40GB PCIe", curved=False) for _ in range(4)],
            events=[
                {
                    "at_s": 20,
                    "device": 1,
                    "external_util": 0.99,
                    "external_mem_gb": 4,
                    "slowdown": 1.25,
                }
            ],
        ),
        base(
            "bandwidth_cotenant",
            "Four RTX 4090 (linear timing, plateau 721 samples/s). From 20 s a memory-"
            "bandwidth-heavy co-tenant on GPU 2: NVML reports 30% utilisation, but it "
            "halves our speed (slowdown 2).",
            [gpu("RTX 4090", curved=False) for _ in range(4)],
            events=[
                {
                    "at_s": 20,
                    "device": 2,
                    "external_util": 0.3,
                    "external_mem_gb": 3,
                    "slowdown": 2.0,
                }
            ],
        ),
        base(
            "memory_bursts_lag",
            "Four RTX 3090 (linear timing, plateau 513), batch 768 (192 per GPU needs "
            "~19-20 GB of 24). Every 7 s from 15 s to 85 s another job holds 8 GB on GPU 1 "
            "or 2 for 4 s; the monitor reports 2.5 s late, so the planner learns of a burst "
            "only after it hit. OOM must be recovered, no batch lost.",
            [gpu("RTX 3090", curved=False) for _ in range(4)],
            global_batch=768,
            monitor_lag_s=2.5,
            events=bursts([1, 2], 15, 85, 7, 4, 8),
        ),
        base(
            "forward_fraction_mix",
            "Two A100 40GB whose forward is 50% of compute and two RTX 3090 whose forward "
            "is 20% (linear timing, Lambda plateaus). The engine times forward and "
            "estimates backward as 2x forward, as the real DataParallel engine does, so "
            "it reports the A100s 1.5x slower and the 3090s 0.6x faster than they are.",
            [
                gpu("A100 40GB PCIe", curved=False, forward_fraction=0.5),
                gpu("A100 40GB PCIe", curved=False, forward_fraction=0.5),
                gpu("RTX 3090", curved=False, forward_fraction=0.2),
                gpu("RTX 3090", curved=False, forward_fraction=0.2),
            ],
        ),
        base(
            "sixteen_gpu",
            SOURCE + " Sixteen GPUs (4 each of RTX 4090, RTX 3090, A100 40GB, V100 16GB), "
            "batch 2048; at 30 s jobs land on GPUs 3 (util 0.6) and 9 (util 0.5).",
            [gpu(m) for m in ("RTX 4090", "RTX 3090", "A100 40GB PCIe", "V100 16GB") * 4],
            global_batch=2048,
            steps=300,
            events=[
                {"at_s": 30, "device": 3, "external_util": 0.6, "external_mem_gb": 4},
                {"at_s": 30, "device": 9, "external_util": 0.5, "external_mem_gb": 4},
            ],
        ),
        base(
            "everything_eight_gpu",
            SOURCE + " Eight GPUs (2 each of RTX 4090, RTX 3090, A100 40GB, V100 16GB) with "
            "curves; forward fractions 0.2-0.5; a time-sliced co-tenant (util 0.99, "
            "slowdown 1.25) on GPU 1 from 15 s; a bandwidth-heavy one (util 0.3, slowdown "
            "2) on GPU 4 from 25 s; 9 GB memory bursts on the 16 GB V100s (GPUs 3 and 7); "
            "monitor 2.5 s late; GPU 5 fails at 50 s.",
            [
                gpu("RTX 4090", forward_fraction=0.3),
                gpu("RTX 3090", forward_fraction=0.2),
                gpu("A100 40GB PCIe", forward_fraction=0.5),
                gpu("V100 16GB", forward_fraction=0.4),
                gpu("RTX 4090", forward_fraction=0.3),
                gpu("RTX 3090", forward_fraction=0.2),
                gpu("A100 40GB PCIe", forward_fraction=0.5),
                gpu("V100 16GB", forward_fraction=0.4),
            ],
            global_batch=1024,
            steps=500,
            monitor_lag_s=2.5,
            events=[
                {
                    "at_s": 15,
                    "device": 1,
                    "external_util": 0.99,
                    "external_mem_gb": 3,
                    "slowdown": 1.25,
                },
                {
                    "at_s": 25,
                    "device": 4,
                    "external_util": 0.3,
                    "external_mem_gb": 3,
                    "slowdown": 2.0,
                },
                *bursts([3, 7], 10, 80, 9, 4, 9),
                {"at_s": 50, "device": 5, "fail": True},
            ],
        ),
    ]
    return out


def main() -> None:
    for spec in scenarios():
        path = HERE / f"{spec['name']}.json"
        path.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
        print(path)


if __name__ == "__main__":
    main()
