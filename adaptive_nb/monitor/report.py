"""What a monitor-only run (``%%adaptive_monitor``) measured: peak and mean CPU, RAM and
per-GPU utilisation and memory, plus the conversion of one monitor sample into a
:class:`~adaptive_nb.events.TickRecord` so monitor-only plots reuse the run dashboard.

Pure core code: no Jupyter imports.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..events import TickRecord
from .snapshot import GpuSample, Snapshot

__all__ = ["DeviceUsage", "MonitorReport", "gpu_label", "snapshot_record", "summarize"]

CPU_LABEL = "CPU"


def gpu_label(gpu: GpuSample) -> str:
    """Display name of a GPU reading, e.g. ``"GPU 0 (A100)"`` (NVML index when the GPU
    is not visible to torch)."""
    if gpu.index is not None:
        return f"GPU {gpu.index} ({gpu.name})"
    return f"GPU nvml:{gpu.nvml_index} ({gpu.name})"


def snapshot_record(snapshot: Snapshot, t0: float) -> TickRecord:
    """One monitor sample as a tick record (no training: throughput 0, no shares).
    The CPU's memory is the host RAM: this process, other processes, total."""
    h = snapshot.host
    names = [CPU_LABEL]
    util = {CPU_LABEL: h.cpu_pct}
    used = {CPU_LABEL: h.proc_rss_mb}
    other = {CPU_LABEL: max(0.0, h.ram_used_mb - h.proc_rss_mb)}
    total = {CPU_LABEL: h.ram_total_mb}
    for g in snapshot.gpus:
        name = gpu_label(g)
        names.append(name)
        util[name] = g.util_pct
        used[name] = g.self_mem_mb
        other[name] = g.external_mem_mb
        total[name] = g.mem_total_mb
    return TickRecord(
        t=round(snapshot.t - t0, 3),
        step=0,
        samples_per_s=0.0,
        loss=None,
        devices=names,
        shares={},
        util_pct=util,
        mem_used_mb=used,
        mem_other_mb=other,
        mem_total_mb=total,
    )


@dataclass(frozen=True)
class DeviceUsage:
    """Utilisation (%) and memory (MB) of one device over the monitored time. For the CPU,
    memory is the host RAM in use by all processes; ``self_mem_peak_mb`` is this
    process's RSS (or its memory on a GPU)."""

    name: str
    util_peak_pct: float
    util_mean_pct: float
    mem_peak_mb: float
    mem_mean_mb: float
    mem_total_mb: float
    self_mem_peak_mb: float
    simulated: bool = False


@dataclass(frozen=True, repr=False)
class MonitorReport:
    """Summary of a monitored cell."""

    duration_s: float
    samples: int
    cpu: DeviceUsage | None
    process_cpu_peak_pct: float  # this process; 100 = one core
    process_cpu_mean_pct: float
    cpu_cores: float
    gpus: list[DeviceUsage] = field(default_factory=list)
    notice: str | None = None  # why GPUs were not monitored, if they were not

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str, str]]:
        """``(device, utilisation, memory)`` text rows for display."""
        out: list[tuple[str, str, str]] = []
        devices = ([self.cpu] if self.cpu is not None else []) + list(self.gpus)
        for d in devices:
            sim = " (simulated)" if d.simulated else ""
            util = f"peak {d.util_peak_pct:.0f}%, mean {d.util_mean_pct:.0f}%"
            mem = (
                f"peak {_gib(d.mem_peak_mb)}, mean {_gib(d.mem_mean_mb)} of "
                f"{_gib(d.mem_total_mb)} (this process peak {_gib(d.self_mem_peak_mb)})"
            )
            name = "CPU / RAM" if d is self.cpu else d.name
            out.append((name + sim, util, mem))
        return out

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        head = (
            f"Monitored {self.duration_s:.1f} s ({self.samples} samples); this process used "
            f"peak {self.process_cpu_peak_pct:.0f}% / mean {self.process_cpu_mean_pct:.0f}% "
            f"CPU (100% = one core; {self.cpu_cores:g} cores usable)"
        )
        lines = [head] + [f"  {n}: utilisation {u}; memory {m}" for n, u, m in self.rows()]
        if self.notice:
            lines.append(f"  GPUs: {self.notice}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td><b>{html.escape(n)}</b></td><td>{html.escape(u)}</td>"
            f"<td>{html.escape(m)}</td></tr>"
            for n, u, m in self.rows()
        )
        notice = f"<div>GPUs: {html.escape(self.notice)}</div>" if self.notice else ""
        return (
            "<div class='adaptive-nb-monitor-report'>"
            f"<b>Monitored {self.duration_s:.1f} s</b> ({self.samples} samples) · this process "
            f"CPU peak {self.process_cpu_peak_pct:.0f}%, mean {self.process_cpu_mean_pct:.0f}% "
            f"(100% = one core; {self.cpu_cores:g} cores usable)"
            "<table><tr><th>device</th><th>utilisation</th><th>memory</th></tr>"
            f"{cells}</table>{notice}</div>"
        )


def _gib(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MB"


def _peak_mean(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return max(values), sum(values) / len(values)


def summarize(
    snapshots: Sequence[Snapshot],
    duration_s: float | None = None,
    notice: str | None = None,
) -> MonitorReport:
    """Peak/mean figures over ``snapshots`` (oldest first). ``duration_s`` defaults to
    the time between the first and last sample."""
    if duration_s is None:
        duration_s = snapshots[-1].t - snapshots[0].t if len(snapshots) > 1 else 0.0
    if not snapshots:
        return MonitorReport(float(duration_s), 0, None, 0.0, 0.0, 0.0, [], notice)
    hosts = [s.host for s in snapshots]
    cpu_peak, cpu_mean = _peak_mean([h.cpu_pct for h in hosts])
    ram_peak, ram_mean = _peak_mean([h.ram_used_mb for h in hosts])
    cpu = DeviceUsage(
        name=CPU_LABEL,
        util_peak_pct=cpu_peak,
        util_mean_pct=cpu_mean,
        mem_peak_mb=ram_peak,
        mem_mean_mb=ram_mean,
        mem_total_mb=max(h.ram_total_mb for h in hosts),
        self_mem_peak_mb=max(h.proc_rss_mb for h in hosts),
    )
    proc_peak, proc_mean = _peak_mean([h.proc_cpu_pct for h in hosts])

    by_gpu: dict[str, list[GpuSample]] = {}
    for snap in snapshots:
        for g in snap.gpus:
            by_gpu.setdefault(g.uuid or gpu_label(g), []).append(g)
    gpus: list[DeviceUsage] = []
    for readings in by_gpu.values():
        util_peak, util_mean = _peak_mean([g.util_pct for g in readings])
        mem_peak, mem_mean = _peak_mean([g.mem_used_mb for g in readings])
        gpus.append(
            DeviceUsage(
                name=gpu_label(readings[-1]),
                util_peak_pct=util_peak,
                util_mean_pct=util_mean,
                mem_peak_mb=mem_peak,
                mem_mean_mb=mem_mean,
                mem_total_mb=max(g.mem_total_mb for g in readings),
                self_mem_peak_mb=max(g.self_mem_mb for g in readings),
                simulated=any(g.simulated for g in readings),
            )
        )
    return MonitorReport(
        duration_s=float(duration_s),
        samples=len(snapshots),
        cpu=cpu,
        process_cpu_peak_pct=proc_peak,
        process_cpu_mean_pct=proc_mean,
        cpu_cores=hosts[-1].cpu_cores,
        gpus=gpus,
        notice=notice,
    )
