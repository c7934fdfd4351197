"""Simulated-fleet scenario files: loading, validation and the scenario's values.

A scenario describes GPUs (speed as ``samples_per_s``/``alpha_ms`` or a measured
``curve``, memory, the share of compute spent in forward), the job's memory needs,
communication cost, timed events (external jobs with what NVML reports of them and what
they truly cost us, failures) and how late the simulated NVML is (``monitor_lag_s``).
The file format is declared in :mod:`.schema`; see ``benchmarks/scenarios/`` for examples.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .schema import check_semantics, check_shape

__all__ = [
    "CommSpec",
    "DeviceSpec",
    "FailEvent",
    "JobSpec",
    "LoadEvent",
    "Scenario",
    "load_scenario",
    "parse_scenario",
]

DEFAULT_FORWARD_FRACTION = 1.0 / 3.0


@dataclass(frozen=True)
class DeviceSpec:
    """One GPU. Idle compute time (forward + backward) for a per-device batch ``b``: from
    ``curve`` when given (``ms1`` up to ``b1``, linear between points, the last segment
    extended beyond), else ``alpha_ms + 1000·b/samples_per_s``."""

    name: str
    memory_gb: float
    samples_per_s: float | None = None
    alpha_ms: float = 0.0
    curve: tuple[tuple[float, float], ...] | None = None
    forward_fraction: float = DEFAULT_FORWARD_FRACTION

    def idle_ms(self, b: float) -> float:
        """Idle compute milliseconds (forward + backward) for ``b`` samples."""
        if self.curve is None:
            assert self.samples_per_s is not None
            return self.alpha_ms + 1000.0 * b / self.samples_per_s
        pts = self.curve
        if b <= pts[0][0]:
            return pts[0][1]
        j = min(bisect.bisect_left([p[0] for p in pts], b), len(pts) - 1)
        (b0, m0), (b1, m1) = pts[j - 1], pts[j]
        return m0 + (m1 - m0) * (b - b0) / (b1 - b0)


@dataclass(frozen=True)
class JobSpec:
    mem_base_gb: float
    mem_per_sample_gb: float


@dataclass(frozen=True)
class CommSpec:
    alpha_ms: float = 0.0
    per_device_ms: float = 0.0


@dataclass(frozen=True)
class LoadEvent:
    """Another job on ``device`` from ``at_s`` until ``until_s`` (None: to the end).
    ``external_util`` and ``external_mem_gb`` are what NVML reports; ``slowdown`` (None:
    ``1/(1 − external_util)``) is what it truly does to our compute time."""

    at_s: float
    device: int
    external_util: float = 0.0
    external_mem_gb: float = 0.0
    until_s: float | None = None
    slowdown: float | None = None

    def active(self, t: float) -> bool:
        return self.at_s <= t and (self.until_s is None or t < self.until_s)

    def multiplier(self) -> float:
        """The factor on our compute time while this event is active."""
        if self.slowdown is not None:
            return self.slowdown
        return 1.0 / max(1e-6, 1.0 - self.external_util)


@dataclass(frozen=True)
class FailEvent:
    """``device`` fails at ``at_s`` and errors on every use afterwards."""

    at_s: float
    device: int


@dataclass(frozen=True)
class Scenario:
    name: str
    global_batch: int
    steps: int
    seed: int
    noise: float
    devices: tuple[DeviceSpec, ...]
    job: JobSpec
    comm: CommSpec
    primary_extra_ms: float
    primary_extra_gb: float
    loads: tuple[LoadEvent, ...]
    failures: tuple[FailEvent, ...]
    path: str = ""
    monitor_lag_s: float = 0.0


def _device(d: dict[str, Any]) -> DeviceSpec:
    curve = d.get("curve")
    return DeviceSpec(
        name=d["name"],
        memory_gb=float(d["memory_gb"]),
        samples_per_s=float(d["samples_per_s"]) if "samples_per_s" in d else None,
        alpha_ms=float(d.get("alpha_ms", 0.0)),
        curve=None if curve is None else tuple((float(b), float(ms)) for b, ms in curve),
        forward_fraction=float(d.get("forward_fraction", DEFAULT_FORWARD_FRACTION)),
    )


def parse_scenario(data: Any, where: str = "<dict>") -> Scenario:
    """Validate a decoded scenario; raises :class:`UsageError` naming the file, the field
    path (e.g. ``devices[2].curve[1]``) and the bad value."""
    check_shape(data, where)
    check_semantics(data, where)
    loads: list[LoadEvent] = []
    failures: list[FailEvent] = []
    for e in data.get("events", []):
        if e.get("fail", False):
            failures.append(FailEvent(float(e["at_s"]), int(e["device"])))
            continue
        until = e.get("until_s")
        slow = e.get("slowdown")
        loads.append(
            LoadEvent(
                at_s=float(e["at_s"]),
                device=int(e["device"]),
                external_util=float(e.get("external_util", 0.0)),
                external_mem_gb=float(e.get("external_mem_gb", 0.0)),
                until_s=None if until is None else float(until),
                slowdown=None if slow is None else float(slow),
            )
        )
    comm = data.get("comm", {})
    return Scenario(
        name=data["name"],
        global_batch=int(data["global_batch"]),
        steps=int(data["steps"]),
        seed=int(data.get("seed", 0)),
        noise=float(data.get("noise", 0.0)),
        devices=tuple(_device(d) for d in data["devices"]),
        job=JobSpec(float(data["job"]["mem_base_gb"]), float(data["job"]["mem_per_sample_gb"])),
        comm=CommSpec(float(comm.get("alpha_ms", 0.0)), float(comm.get("per_device_ms", 0.0))),
        primary_extra_ms=float(data.get("primary_extra_ms", 0.0)),
        primary_extra_gb=float(data.get("primary_extra_gb", 0.0)),
        loads=tuple(loads),
        failures=tuple(failures),
        path=where,
        monitor_lag_s=float(data.get("monitor_lag_s", 0.0)),
    )


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario JSON file (UsageError naming the path and field)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"scenario file {p} not found.") from None
    except OSError as exc:
        raise UsageError(f"cannot read scenario file {p}: {exc.strerror or exc}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"scenario {p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})."
        ) from None
    return parse_scenario(data, str(p))
