"""What a DDP rank does per step beyond a plain DDP loop, without any messaging: the rank's
own step code (:meth:`adaptive_nb.engine.ddp.rank.RankJob.forward_backward` on a token,
then :meth:`~adaptive_nb.engine.ddp.rank.RankJob.apply`) against the textbook step
(``zero_grad``, forward, ``backward``, ``optimizer.step``) on the same model and batches,
in this one process (a gloo group of size 1, 1 torch thread), alternating blocks.

It isolates the rank's bookkeeping (plan layout, slicing, gradient stamps, loss sum,
memory reading, the completion term reduced with the gradients) from the kernel↔rank messages and
from the other rank, so load from elsewhere disturbs it less than ``ddp_overhead.py``.

    .venv/bin/python benchmarks/ddp_rank_cost.py --batch 8 --hidden 16
    .venv/bin/python benchmarks/ddp_rank_cost.py --profile   # where the rank's time goes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ddp_overhead as job  # the same model, data and step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    job.set_size(args.batch, args.hidden)

    from adaptive_nb.engine.ddp.data import describe_data, iter_tokens
    from adaptive_nb.engine.ddp.launcher import free_port
    from adaptive_nb.engine.ddp.rank import RankJob

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    data = job.make_data(16)
    model = job.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rank = RankJob(
        {"step": job.step_fn, "model": model, "optimizer": opt, "data": describe_data(data)},
        0,
        1,
    )
    tokens = list(iter_tokens(data, 10_000 // 16))
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    plain_model = DistributedDataParallel(job.make_model())
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
    at = 0

    def rank_block(n: int) -> float:
        nonlocal at
        t0 = time.perf_counter()
        for _ in range(n):
            rank.forward_backward(tokens[at % len(tokens)])
            rank.apply(hyper)
            at += 1
        return (time.perf_counter() - t0) / n

    def plain_block(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            x, y = data[i % len(data)]
            plain_opt.zero_grad(set_to_none=True)
            F.cross_entropy(plain_model(x), y).backward()
            plain_opt.step()
        return (time.perf_counter() - t0) / n

    rank_block(30)
    plain_block(30)
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(rank_block, args.steps)
        pstats.Stats(profile).sort_stats("cumtime").print_stats(25)
        return
    ranked, plain = [], []
    for _ in range(args.rounds):
        ranked.append(rank_block(args.steps))
        plain.append(plain_block(args.steps))
    med = statistics.median
    print(
        f"per step (median of {args.rounds} rounds of {args.steps}; batch {args.batch}, hidden "
        f"{args.hidden}): rank {med(ranked) * 1e3:.3f} ms, plain {med(plain) * 1e3:.3f} ms; "
        f"rank's own cost {(med(ranked) - med(plain)) * 1e3:.3f} ms"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
