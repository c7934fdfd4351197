"""Simulated-fleet scenario files: loading and validation.

A scenario describes GPUs (speed, memory), the job's memory needs, communication cost and
timed events (external jobs, failures). See ``benchmarks/scenarios/`` for examples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError

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


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_gb: float
    samples_per_s: float
    alpha_ms: float = 0.0


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
    """Another job on ``device`` from ``at_s`` until ``until_s`` (None: to the end)."""

    at_s: float
    device: int
    external_util: float = 0.0
    external_mem_gb: float = 0.0
    until_s: float | None = None

    def active(self, t: float) -> bool:
        return self.at_s <= t and (self.until_s is None or t < self.until_s)


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


_TOP = {
    "name",
    "global_batch",
    "steps",
    "seed",
    "noise",
    "devices",
    "job",
    "comm",
    "primary_extra_ms",
    "primary_extra_gb",
    "events",
    "description",
}


class _Fields:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, what: str, got: Any) -> UsageError:
        return UsageError(f"scenario {self.where}: `{field}` {what}, got {got!r}.")

    def number(
        self,
        obj: dict[str, Any],
        key: str,
        field: str,
        *,
        default: float | None = None,
        lo: float = 0.0,
        lo_open: bool = False,
        hi: float | None = None,
        hi_open: bool = False,
    ) -> float:
        if key not in obj:
            if default is None:
                raise UsageError(f"scenario {self.where}: missing `{field}`.")
            return default
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(field, "must be a number", v)
        bad_lo = v <= lo if lo_open else v < lo
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            lo_s = f"> {lo}" if lo_open else f">= {lo}"
            rng = lo_s if hi is None else f"{lo_s} and {'<' if hi_open else '<='} {hi}"
            raise self.fail(field, f"must be {rng}", v)
        return float(v)

    def integer(
        self, obj: dict[str, Any], key: str, field: str, *, default: int | None = None, lo: int = 0
    ) -> int:
        if key not in obj:
            if default is None:
                raise UsageError(f"scenario {self.where}: missing `{field}`.")
            return default
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(field, "must be a whole number", v)
        if v < lo:
            raise self.fail(field, f"must be >= {lo}", v)
        return int(v)

    def obj(self, v: Any, field: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(field, "must be an object", v)
        unknown = sorted(set(v) - allowed)
        if unknown:
            raise UsageError(
                f"scenario {self.where}: unknown field `{field}.{unknown[0]}` "
                f"(known: {', '.join(sorted(allowed))})."
            )
        return v


def parse_scenario(data: Any, where: str = "<dict>") -> Scenario:
    """Validate a decoded scenario; raises :class:`UsageError` naming the bad field."""
    f = _Fields(where)
    top = f.obj(data, "scenario", _TOP)
    name = top.get("name")
    if not isinstance(name, str) or not name.strip():
        raise f.fail("name", "must be a non-empty string", name)
    global_batch = f.integer(top, "global_batch", "global_batch", lo=1)
    steps = f.integer(top, "steps", "steps", lo=1)
    seed = f.integer(top, "seed", "seed", default=0)
    noise = f.number(top, "noise", "noise", default=0.0, hi=0.5)
    devs = top.get("devices")
    if not isinstance(devs, list) or not devs:
        raise f.fail("devices", "must be a non-empty list", devs)
    devices = []
    for i, d in enumerate(devs):
        field = f"devices[{i}]"
        dd = f.obj(d, field, {"name", "memory_gb", "samples_per_s", "alpha_ms"})
        dname = dd.get("name")
        if not isinstance(dname, str) or not dname.strip():
            raise f.fail(f"{field}.name", "must be a non-empty string", dname)
        devices.append(
            DeviceSpec(
                name=dname,
                memory_gb=f.number(dd, "memory_gb", f"{field}.memory_gb", lo_open=True),
                samples_per_s=f.number(dd, "samples_per_s", f"{field}.samples_per_s", lo_open=True),
                alpha_ms=f.number(dd, "alpha_ms", f"{field}.alpha_ms", default=0.0),
            )
        )
    if "job" not in top:
        raise UsageError(f"scenario {where}: missing `job`.")
    jj = f.obj(top["job"], "job", {"mem_base_gb", "mem_per_sample_gb"})
    job = JobSpec(
        mem_base_gb=f.number(jj, "mem_base_gb", "job.mem_base_gb"),
        mem_per_sample_gb=f.number(jj, "mem_per_sample_gb", "job.mem_per_sample_gb"),
    )
    cc = f.obj(top.get("comm", {}), "comm", {"alpha_ms", "per_device_ms"})
    comm = CommSpec(
        alpha_ms=f.number(cc, "alpha_ms", "comm.alpha_ms", default=0.0),
        per_device_ms=f.number(cc, "per_device_ms", "comm.per_device_ms", default=0.0),
    )
    primary_extra_ms = f.number(top, "primary_extra_ms", "primary_extra_ms", default=0.0)
    primary_extra_gb = f.number(top, "primary_extra_gb", "primary_extra_gb", default=0.0)
    evs = top.get("events", [])
    if not isinstance(evs, list):
        raise f.fail("events", "must be a list", evs)
    loads: list[LoadEvent] = []
    failures: list[FailEvent] = []
    allowed = {"at_s", "until_s", "device", "external_util", "external_mem_gb", "fail"}
    for i, e in enumerate(evs):
        field = f"events[{i}]"
        ee = f.obj(e, field, allowed)
        at = f.number(ee, "at_s", f"{field}.at_s")
        dev = f.integer(ee, "device", f"{field}.device")
        if dev >= len(devices):
            raise f.fail(f"{field}.device", f"must name one of the {len(devices)} devices", dev)
        if ee.get("fail", False) is not False:
            if ee["fail"] is not True:
                raise f.fail(f"{field}.fail", "must be true or false", ee["fail"])
            extra = sorted(set(ee) - {"at_s", "device", "fail"})
            if extra:
                raise f.fail(
                    f"{field}.{extra[0]}", "does not apply to a failure event", ee[extra[0]]
                )
            failures.append(FailEvent(at, dev))
            continue
        until = None
        if "until_s" in ee and ee["until_s"] is not None:
            until = f.number(ee, "until_s", f"{field}.until_s")
            if until <= at:
                raise f.fail(f"{field}.until_s", f"must be after at_s ({at})", until)
        util = f.number(
            ee, "external_util", f"{field}.external_util", default=0.0, hi=1.0, hi_open=True
        )
        mem = f.number(ee, "external_mem_gb", f"{field}.external_mem_gb", default=0.0)
        if util == 0 and mem == 0:
            raise UsageError(
                f"scenario {where}: `{field}` changes nothing: give external_util, "
                "external_mem_gb or fail: true."
            )
        loads.append(LoadEvent(at, dev, util, mem, until))
    return Scenario(
        name=name,
        global_batch=global_batch,
        steps=steps,
        seed=seed,
        noise=noise,
        devices=tuple(devices),
        job=job,
        comm=comm,
        primary_extra_ms=primary_extra_ms,
        primary_extra_gb=primary_extra_gb,
        loads=tuple(loads),
        failures=tuple(failures),
        path=where,
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
