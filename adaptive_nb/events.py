"""Records that flow out of a training run: events, per-tick records, progress.

Plain data: controllers emit :class:`Event` records, the run loop emits the rest and hands
them to its observers (:mod:`adaptive_nb.run.observers`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Event", "EventKind", "Progress", "RunInfo", "TickRecord"]


class EventKind:
    """Names of event kinds (plain strings so reports stay JSON)."""

    START = "start"
    THREADS = "threads"  # CPU intra-op thread count changed
    HOLD = "hold"  # controller decided there is nothing to gain
    REALLOCATE = "reallocate"  # batch shares changed
    DEVICES = "devices"  # device set changed
    DEVICE_DROPPED = "device_dropped"
    DEVICE_READMITTED = "device_readmitted"
    OOM = "oom"  # out of memory recovered
    MICROBATCH = "microbatch"  # micro-batch count changed
    POLICY = "policy"
    HEADROOM = "headroom"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    INTERRUPT = "interrupt"
    ERROR = "error"
    NOTICE = "notice"
    NONFINITE = "nonfinite"  # inf/NaN gradients: the optimizer step was skipped
    EVAL = "eval"  # an evaluation ran (its metrics in Event.metrics and the report)
    END = "end"


@dataclass(frozen=True)
class Event:
    """Something the run did or decided. ``t`` is seconds since the run started;
    ``metrics``: the numbers behind an ``EVAL`` event (None for other kinds), so that
    front-ends never parse ``detail``, which is text for people."""

    t: float
    kind: str
    detail: str
    step: int = 0
    metrics: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.metrics is None:
            del out["metrics"]
        return out


@dataclass(frozen=True)
class RunInfo:
    """What a run is, known before the first step."""

    run_id: str
    total_steps: int | None  # None when an epoch's length is unknown
    epochs: int | None
    policy: str
    devices: list[str]  # display names, e.g. ["cpu"] or ["GPU 0 (A100)", ...]
    simulated: bool
    global_batch: int | None
    started_at: float  # time.time()


@dataclass(frozen=True)
class Progress:
    """State after a completed step (sent at most a few times per second)."""

    step: int
    total_steps: int | None
    epoch: int
    samples: int
    elapsed_s: float
    samples_per_s: float  # recent throughput
    eta_s: float | None
    loss: float | None
    paused: bool = False
    lr: float | None = None  # learning rate of the first parameter group


@dataclass(frozen=True)
class TickRecord:
    """One record per control tick: what the machine and the run looked like."""

    t: float
    step: int
    samples_per_s: float
    loss: float | None
    devices: list[str]  # display names of the devices in use
    shares: dict[str, float]  # device name -> share of the global batch (sums to 1)
    util_pct: dict[str, float] = field(default_factory=dict)  # device name -> utilisation %
    mem_used_mb: dict[str, float] = field(default_factory=dict)  # this run's memory
    mem_other_mb: dict[str, float] = field(default_factory=dict)  # other processes
    mem_total_mb: dict[str, float] = field(default_factory=dict)
    threads: int | None = None  # CPU intra-op threads
    predicted_step_s: float | None = None
    measured_step_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
