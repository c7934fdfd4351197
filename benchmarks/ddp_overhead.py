"""What the DDP engine costs over a plain hand-written DDP loop, on the same CPU job.

Two groups of 2 gloo ranks (1 torch thread each) stay up side by side; only one computes
at a time. Blocks of ``--steps`` steps alternate (engine, plain, engine, plain, ...;
``--rounds`` of each) so that load from elsewhere on the machine hits both alike.

* engine (``--mode engine``): :class:`adaptive_nb.engine.ddp.DDPEngine` driven step by
  step from this process as the run loop drives it (``expect_next`` the next token of the
  block, ``forward_backward`` on a token, ``optimizer_step``; ``--lockstep``: no run-ahead),
  equal shares; a block ends with one more round trip (``rank_log``) so its last update is
  counted. Also printed: how long the ranks waited for the kernel's command between two
  steps (measured in the ranks; a plain loop never waits), which load disturbs less than
  the wall-time ratio.
* loop (``--mode loop``): the whole of ``adaptive_nb.start(engine="ddp", workers=W,
  policy="static")`` (the loop's bookkeeping, controller, ticks and callbacks included) on
  the same job; a callback marks the block boundaries, settles the step sent ahead and
  waits there while the plain loop runs its block.
* plain: the textbook loop in fresh processes started by this file (``--plain-rank``):
  ``DistributedDataParallel``, each rank slicing its half of the same global batch, mean
  loss, ``backward``, ``optimizer.step``; rank 0 times the block between two barriers.
  It shares no code with the engine.

``--groups G`` starts fresh processes (both groups) G times, ``--rounds`` each: two
processes running the same code can differ by 5–10 % for as long as they live (where their
memory landed, which core they share), so one pair of groups can favour either side; the
per-group medians and their median say how much.

Per-step time = block wall time / steps. Prints each round's ratio engine/plain, the
median and the spread (min–max), and the ratio of the best (fastest) rounds of each, which
load from elsewhere disturbs least. Goal: median ratio ≤ 1.05. Also the CPU time per step
(from the kernel's counters: this process, and each rank process), medians over the
rounds: what the engine's ranks spend beyond the plain ranks, and what the kernel spends
(on a machine with no core to spare it takes that time from a rank). Results:
benchmarks/ddp_results.md.

    .venv/bin/python benchmarks/ddp_overhead.py --steps 100 --rounds 7 --groups 5
    .venv/bin/python benchmarks/ddp_overhead.py --steps 100 --rounds 7 --groups 5 --mode loop
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 256
IN, HIDDEN, OUT = 256, 512, 10  # --batch / --hidden change BATCH / HIDDEN


def set_size(batch: int, hidden: int) -> None:
    global BATCH, HIDDEN
    BATCH, HIDDEN = batch, hidden


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
    )


def make_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, IN, generator=g), torch.randint(0, OUT, (BATCH,), generator=g))
        for _ in range(n)
    ]


def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# -- the plain loop (its own processes) ---------------------------------------------------
def plain_rank(rank: int, world: int, batches: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    model = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = make_data(batches)
    per = BATCH // world
    i = 0
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "quit":
            break
        n = int(cmd[1])
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = data[i % len(data)]
            i += 1
            xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs), ys).backward()
            opt.step()
        dist.barrier()
        if rank == 0:
            print(time.perf_counter() - t0, flush=True)
    dist.destroy_process_group()


class Plain:
    def __init__(self, world: int, batches: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--plain-rank",
                    str(r),
                    "--world",
                    str(world),
                    "--batches",
                    str(batches),
                    "--batch",
                    str(BATCH),
                    "--hidden",
                    str(HIDDEN),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for r in range(world)
        ]

    def block(self, steps: int) -> float:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(f"run {steps}\n")
            p.stdin.flush()
        assert self.procs[0].stdout is not None
        return float(self.procs[0].stdout.readline())

    def close(self) -> None:
        for p in self.procs:
            try:
                assert p.stdin is not None
                p.stdin.write("quit\n")
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--groups", type=int, default=1, help="fresh engine and plain processes this many times"
    )
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--plain-rank", type=int, default=None)
    ap.add_argument("--mode", choices=("engine", "loop"), default="engine")
    ap.add_argument("--lockstep", action="store_true", help="engine mode without run-ahead")
    args = ap.parse_args()
    set_size(args.batch, args.hidden)
    if args.plain_rank is not None:
        plain_rank(args.plain_rank, args.world, args.batches)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    data = make_data(args.batches)
    rounds: list[Round] = []
    group_medians: list[float] = []
    for g in range(args.groups):
        got = one_group(args, data, g)
        group_medians.append(statistics.median(r.ratio for r in got))
        rounds += got
    ratios = [r.ratio for r in rounds]
    what = (
        f"{args.groups} group{'s' if args.groups > 1 else ''} × {args.rounds} rounds of "
        f"{args.steps} steps, {args.world} ranks, batch {BATCH}, hidden {HIDDEN}, mode "
        f"{args.mode}{' lockstep' if args.lockstep else ''}"
    )
    print(
        f"median ratio {statistics.median(ratios):.3f} (spread {min(ratios):.3f}–"
        f"{max(ratios):.3f}; {what}); median difference "
        f"{statistics.median(r.engine - r.plain for r in rounds) * 1e3:.2f} ms/step"
    )
    if args.groups > 1:
        print(
            "median ratio per group (fresh processes): "
            + ", ".join(f"{m:.3f}" for m in group_medians)
            + f"; median of the groups {statistics.median(group_medians):.3f}"
        )
    best_e, best_p = min(r.engine for r in rounds), min(r.plain for r in rounds)
    print(
        f"best rounds (least disturbed): engine {best_e * 1e3:.2f} ms/step, plain "
        f"{best_p * 1e3:.2f} ms/step, ratio {best_e / best_p:.3f}"
    )
    kernel = statistics.median(r.kernel_cpu for r in rounds) * 1e3
    mine = statistics.median(r.engine_rank_cpu for r in rounds) * 1e3
    theirs = statistics.median(r.plain_rank_cpu for r in rounds) * 1e3
    print(
        f"CPU per step (median): kernel {kernel:.3f} ms; each engine rank {mine:.3f} ms, "
        f"each plain rank {theirs:.3f} ms ({mine - theirs:+.3f} ms)"
    )


@dataclasses.dataclass
class Round:
    engine: float  # seconds per step
    plain: float
    kernel_cpu: float  # CPU seconds per step
    engine_rank_cpu: float  # per rank
    plain_rank_cpu: float

    @property
    def ratio(self) -> float:
        return self.engine / self.plain


def one_group(args: argparse.Namespace, data: list[Any], g: int) -> list[Round]:
    """Start both groups of ranks, warm them up, run the rounds, close both."""
    plain = Plain(args.world, args.batches)
    if args.mode == "loop":
        engine_block, finish, engine_pids = loop_blocks(args, data)
    else:
        engine_block, finish, engine_pids = engine_blocks(args, data)
    plain_pids = [p.pid for p in plain.procs]
    out: list[Round] = []
    try:
        engine_block(20)  # warm-up of both
        plain.block(20)
        for r in range(args.rounds):
            k0, r0 = own_cpu(), ranks_cpu(engine_pids())
            e = engine_block(args.steps) / args.steps
            k1, r1 = own_cpu(), ranks_cpu(engine_pids())
            p0 = ranks_cpu(plain_pids)
            p = plain.block(args.steps) / args.steps
            p1 = ranks_cpu(plain_pids)
            n = args.steps
            out.append(
                Round(e, p, (k1 - k0) / n, (r1 - r0) / n / args.world, (p1 - p0) / n / args.world)
            )
            print(
                f"group {g} round {r}: engine {e * 1e3:.2f} ms/step, plain {p * 1e3:.2f} "
                f"ms/step, ratio {e / p:.3f}",
                flush=True,
            )
    finally:
        finish()
        plain.close()
    return out


Block = Callable[[int], float]
Pids = Callable[[], list[int]]


def own_cpu() -> float:
    """This process's CPU seconds (user + system, every thread)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def ranks_cpu(pids: list[int]) -> float:
    """The CPU seconds of these processes (user + system), from /proc (10 ms ticks)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def engine_blocks(
    args: argparse.Namespace, data: list[Any]
) -> tuple[Block, Callable[[], None], Pids]:
    """Blocks of steps of a DDPEngine driven as the run loop drives it."""
    from adaptive_nb.engine.ddp import DDPEngine

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = DDPEngine(
        step_fn,
        model=model,
        optimizer=opt,
        data=data,
        world_size=args.world,
        threads=1,
        run_ahead=not args.lockstep,
    )
    engine.start()
    epochs = (args.rounds * args.steps + 40) // args.batches + 1
    tokens = list(engine.iter_batches(data, epochs))
    position = 0

    idle: list[float] = []

    def block(n: int) -> float:
        nonlocal position
        t0 = time.perf_counter()
        for i in range(n):
            # the loop says so when another step follows (not at the end of a block)
            engine.expect_next(tokens[position + 1] if i + 1 < n else None)
            engine.forward_backward(None, tokens[position])
            engine.optimizer_step()
            if i > 0:  # a rank's wait for this step's command, after its previous reply
                idle.extend(float(r["idle_s"]) for r in engine.last_replies.values())
            position += 1
        engine.rank_log()  # one round trip: the block's last update has been applied
        return time.perf_counter() - t0

    def finish() -> None:
        engine.close()
        if idle:
            print(
                f"ranks waiting for the kernel between steps: median "
                f"{statistics.median(idle) * 1e3:.3f} ms, mean {statistics.mean(idle) * 1e3:.3f}"
                f" ms per step and rank ({len(idle)} steps×ranks)"
            )

    return block, finish, lambda: list(engine.group.pids)


def loop_blocks(
    args: argparse.Namespace, data: list[Any]
) -> tuple[Block, Callable[[], None], Pids]:
    """Blocks of steps of the whole run loop (``adaptive_nb.start``), marked by a callback."""
    import adaptive_nb

    ready = threading.Event()  # the run reached the end of a block
    go = threading.Event()  # the next block may start
    marks: list[float] = []
    want = [0]  # the step at which the current block ends

    class Marks:
        def on_step_end(self, step: int, loss: float | None, history: Any) -> None:
            if step != want[0]:
                return
            run = adaptive_nb.last_run()
            assert run is not None
            run.engine.rank_log()  # type: ignore[attr-defined]  # the step sent ahead: settled
            marks.append(time.perf_counter())
            ready.set()
            go.wait()
            go.clear()

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    total = 20 + args.rounds * args.steps
    run = adaptive_nb.start(
        step_fn,
        model=model,
        optimizer=opt,
        data=data,
        steps=total + 1,
        devices="cpu",
        engine="ddp",
        workers=args.world,
        policy="static",
        callbacks=[Marks()],
    )
    done = [0]

    def block(n: int) -> float:
        want[0] = done[0] + n
        t0 = time.perf_counter()
        if done[0] == 0:
            ready.clear()
        else:
            go.set()
        ready.wait()
        ready.clear()
        done[0] += n
        return marks[-1] - t0

    def finish() -> None:
        want[0] = -1
        go.set()
        run.wait(timeout=600)

    def pids() -> list[int]:
        live = adaptive_nb.last_run()
        assert live is not None
        return list(live.engine.group.pids)  # type: ignore[attr-defined]

    return block, finish, pids


if __name__ == "__main__":
    main()
