"""Per-step overhead of the Ray Train engine against the DDP engine, on the same CPU job.

Both groups stay up side by side (2 gloo ranks / 2 Ray Train workers, 1 torch thread
each; the Ray one on a local Ray started here, loopback only, as a run starts it); only
one computes at a time. Blocks of ``--steps`` steps alternate (ddp, ray, ddp, ray, ...;
``--rounds`` of each) so that load from elsewhere on the machine hits both alike. Each
engine is driven step by step from this process as the run loop drives it
(``forward_backward`` on a token, ``optimizer_step``; no run-ahead), with equal shares;
a block ends with one more round trip (``rank_log``) so that its last update is counted.

Per-step time = block wall time / steps. Prints each round's per-step times, the
difference ray − ddp (the overhead of going through Ray: the hub actor's calls instead of
a socket, Ray's worker processes), the median and the spread; then the cost of one Ray
Train checkpoint (``ray.train.report`` with the state, ``--checkpoints`` of them) at this
model size, taken after ``--ckpt-gap`` s of steps and right after another. Results:
benchmarks/ray_results.md.

    .venv/bin/python benchmarks/ray_overhead.py --steps 100 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_nb.engine.ddp import DDPEngine
from adaptive_nb.engine.ray_train import RayConnection, RayEngine

IN, OUT = 256, 10


def make_job(hidden: int, batch: int, batches: int) -> tuple[nn.Module, Any, list[Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, hidden), nn.ReLU(), nn.Linear(hidden, OUT))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(batch, IN, generator=g), torch.randint(0, OUT, (batch,), generator=g))
        for _ in range(batches)
    ]
    return model, opt, data


def step(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def block(engine: Any, tokens: list[Any]) -> float:
    """Per-step seconds of one block of steps (the last update included)."""
    t0 = time.perf_counter()
    for token in tokens:
        engine.forward_backward(None, token)
        engine.optimizer_step()
    engine.rank_log()  # one more round trip: the last update has been applied
    return (time.perf_counter() - t0) / len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--ckpt-gap", type=float, default=5.0)
    args = parser.parse_args()

    n = args.steps * args.rounds + 10
    ddp_model, ddp_opt, data = make_job(args.hidden, args.batch, n)
    ray_model, ray_opt, _ = make_job(args.hidden, args.batch, n)
    t0 = time.perf_counter()
    connection = RayConnection(None, num_cpus=2)
    connection.open()
    ray_start_s = time.perf_counter() - t0
    ddp = DDPEngine(step, model=ddp_model, optimizer=ddp_opt, data=data, world_size=2, threads=1)
    rayeng = RayEngine(
        step,
        model=ray_model,
        optimizer=ray_opt,
        data=data,
        min_workers=2,
        max_workers=2,
        threads=1,
        checkpoint_every_s=-1,  # checkpoints only when asked (timed below)
    )
    try:
        ddp.start()
        t0 = time.perf_counter()
        rayeng.start()
        fit_start_s = time.perf_counter() - t0
        tokens = list(ddp.iter_batches(data, 1))
        warm, rest = tokens[:10], tokens[10:]
        block(ddp, warm)
        block(rayeng, warm)
        rows = []
        for r in range(args.rounds):
            chunk = rest[r * args.steps : (r + 1) * args.steps]
            d = block(ddp, chunk)
            y = block(rayeng, chunk)
            rows.append((d, y))
            print(
                f"round {r}: ddp {d * 1e3:.2f} ms/step  ray {y * 1e3:.2f} ms/step  "
                f"overhead {(y - d) * 1e3:+.2f} ms ({y / d:.2f}x)",
                flush=True,
            )
        ckpt, back_to_back = [], []
        for i in range(2 * args.checkpoints):
            spaced = i % 2 == 0
            if spaced:  # steps for --ckpt-gap s first (Ray Train polls its workers every 2 s)
                t_end = time.perf_counter() + args.ckpt_gap
                while time.perf_counter() < t_end:
                    block(rayeng, warm)
            else:  # right after the previous one
                block(rayeng, warm[:1])
            t0 = time.perf_counter()
            rayeng.checkpoint()
            (ckpt if spaced else back_to_back).append(time.perf_counter() - t0)
    finally:
        ddp.close()
        rayeng.close()
        connection.close()
    over = [y - d for d, y in rows]
    ratio = [y / d for d, y in rows]
    params = sum(p.numel() for p in ddp_model.parameters())
    print(
        f"\nmodel {IN}-{args.hidden}-{OUT} ({params} parameters), global batch {args.batch}, "
        f"2 ranks/workers x 1 thread, {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"ddp  per step: median {statistics.median(d for d, _ in rows) * 1e3:.2f} ms"
        f"\nray  per step: median {statistics.median(y for _, y in rows) * 1e3:.2f} ms"
        f"\noverhead ray - ddp: median {statistics.median(over) * 1e3:+.2f} ms/step "
        f"(min {min(over) * 1e3:+.2f}, max {max(over) * 1e3:+.2f}); ratio median "
        f"{statistics.median(ratio):.2f}x (min {min(ratio):.2f}, max {max(ratio):.2f})"
    )
    for label, times in (
        (f"{args.ckpt_gap:g} s after the previous one", ckpt),
        ("right after the previous one", back_to_back),
    ):
        print(
            f"one Ray Train checkpoint (report barrier + state write), {label}: median "
            f"{statistics.median(times) * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, max "
            f"{max(times) * 1e3:.0f}; {len(times)} taken)"
        )
    print(
        f"local Ray start {ray_start_s:.1f} s; TorchTrainer start to workers ready "
        f"{fit_start_s:.1f} s"
    )


if __name__ == "__main__":
    main()
