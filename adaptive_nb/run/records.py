"""What the loop records: one record per control tick (what the machine and the run looked
like, from the latest monitor snapshot mapped to the engine's device names), and the
summary of the whole run at its end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..events import Progress, TickRecord
from ..monitor.snapshot import Snapshot

if TYPE_CHECKING:
    from .loop import Run

__all__ = [
    "progress_of",
    "record_tick",
    "run_summary",
    "tick_record",
    "utilisation_summary",
]


def tick_record(
    now: float,
    step: int,
    snap: Snapshot | None,
    *,
    names: Sequence[str],
    monitor_keys: Sequence[int | None],
    shares: dict[str, float],
    samples_per_s: float,
    loss: float | None,
    threads: int | None,
    predicted_step_s: float | None,
    measured_step_s: float | None,
) -> TickRecord:
    """The tick's record. ``monitor_keys[i]`` is the ``GpuSample.index`` that monitors
    device ``names[i]`` (None: the host CPU and RAM)."""
    in_use = [n for n in names if shares.get(n, 0.0) > 0] or list(names)
    util: dict[str, float] = {}
    used: dict[str, float] = {}
    other: dict[str, float] = {}
    total: dict[str, float] = {}
    if snap is not None:
        gpus = {g.index: g for g in snap.gpus if g.index is not None}
        for name, key in zip(names, monitor_keys, strict=False):
            if key is None:
                h = snap.host
                util[name] = h.cpu_pct
                used[name] = h.proc_rss_mb
                other[name] = max(0.0, h.ram_used_mb - h.proc_rss_mb)
                total[name] = h.ram_total_mb
            elif key in gpus:
                g = gpus[key]
                util[name] = g.util_pct
                used[name] = g.self_mem_mb
                other[name] = g.external_mem_mb
                total[name] = g.mem_total_mb
    return TickRecord(
        t=round(now, 3),
        step=step,
        samples_per_s=samples_per_s,
        loss=loss,
        devices=in_use,
        shares=shares,
        util_pct=util,
        mem_used_mb=used,
        mem_other_mb=other,
        mem_total_mb=total,
        threads=threads,
        predicted_step_s=predicted_step_s,
        measured_step_s=measured_step_s,
    )


def utilisation_summary(
    util: Mapping[str, Sequence[float]], peak_mem: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """Mean and peak utilisation and peak memory of each device over the run's ticks."""
    return {
        name: {
            "mean_pct": round(sum(v) / len(v), 2),
            "peak_pct": round(max(v), 2),
            "peak_mem_mb": round(peak_mem.get(name, 0.0), 1),
        }
        for name, v in util.items()
        if v
    }


def run_summary(run: Run, *, wall_s: float, real_wall_s: float) -> dict[str, Any]:
    """The report's summary of ``run`` (before the controller's own fields and the events).
    ``wall_s`` is on the engine's clock (virtual when simulated), paused and evaluation
    time included; ``real_wall_s`` is real time with the pauses taken out. Throughput and
    overhead are of training alone (pauses and evaluations taken out)."""
    training_s = wall_s - run._paused_s - run._eval_s
    real_training_s = real_wall_s - run._eval_real_s
    names_end = [n for n, s in run.controller.shares().items() if s > 0] or list(
        run.engine.device_names()
    )
    last_loss = run._last_loss
    return {
        "ended": run.ended,
        "steps": run.step,
        "epochs_started": run._epochs_started,
        "samples": run.samples,
        "wall_s": round(wall_s, 4),
        "paused_s": round(run._paused_s, 4),
        "samples_per_s": round(run.samples / training_s, 3) if training_s > 0 else 0.0,
        "final_loss": float(last_loss) if last_loss is not None else None,
        "devices": names_end,
        "policy": run.controller.policy,
        "simulated": run.engine.simulated,
        "reallocations": run.reallocations,
        "oom_recovered": run.oom_recovered,
        "device_failures": run.device_failures,
        "controller_overhead_pct": round(100 * run._own_s / real_training_s, 3)
        if real_training_s > 0
        else None,
        "utilisation": utilisation_summary(run._util, run._peak_mem),
    }


def record_tick(run: Run) -> None:
    """A control tick: the controller decides on the latest snapshot, and the tick's
    record goes to the timeline, the utilisation summary and the observers."""
    now = run._now()
    snap = run.snapshots.latest() if run.snapshots is not None else None
    run._decision(run.controller.tick(now, run.step, snap))
    rec = tick_record(
        now,
        run.step,
        snap,
        names=run.engine.device_names(),
        monitor_keys=run.engine.monitor_keys(),
        shares=run.controller.shares(),
        samples_per_s=run._rate,
        loss=float(run._last_loss) if run._last_loss is not None else None,
        threads=run.controller.threads(),
        predicted_step_s=run.controller.predicted_step_s(),
        measured_step_s=run._step_s or None,
    )
    for name, u in rec.util_pct.items():
        run._util.setdefault(name, []).append(u)
        run._peak_mem[name] = max(run._peak_mem.get(name, 0.0), rec.mem_used_mb.get(name, 0.0))
    run.timeline.append(rec)
    run._observers.call("on_tick", rec)


def progress_of(run: Run, paused: bool = False) -> Progress:
    """The run's progress now (for the observers)."""
    total = run.info.total_steps
    eta = None
    if total is not None and run._step_s > 0:
        eta = max(0, total - run.step) * run._step_s
    groups = run.optimizer.param_groups
    return Progress(
        step=run.step,
        total_steps=total,
        epoch=run.epoch,
        samples=run.samples,
        elapsed_s=run._now(),
        samples_per_s=run._rate,
        eta_s=eta,
        loss=float(run._last_loss) if run._last_loss is not None else None,
        paused=paused,
        lr=float(groups[0]["lr"]) if groups else None,
    )
