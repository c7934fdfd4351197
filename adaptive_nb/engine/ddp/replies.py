"""What the kernel makes of the ranks' ``DONE`` replies for one step: a
:class:`~adaptive_nb.step.StepOutcome` keyed by device position (shared by the DDP and
Ray Train engines, whose workers run the same rank code)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...step import StepOutcome

__all__ = ["step_outcome"]


def step_outcome(stats: Mapping[int, Mapping[str, Any]], batch: int, wall: float) -> StepOutcome:
    """``stats``: each position's measurements (``loss_sum``, ``forward_s``,
    ``backward_s``, ``batch``, ``peak_mb``, ``pieces``); ``batch``: the global batch;
    ``wall``: the kernel's seconds for the step. Compute time excludes all-reduce waits."""
    loss = sum(s["loss_sum"] for s in stats.values()) / batch if batch else 0.0
    return StepOutcome(
        loss=float(loss),  # (a tensor made here costs the kernel ~50 µs a step, cold)
        samples=batch,
        wall_s=wall,
        device_time_s={p: s["forward_s"] + s["backward_s"] for p, s in stats.items()},
        device_batch={p: s["batch"] for p, s in stats.items() if s["batch"] > 0},
        peak_mem_mb={p: s["peak_mb"] for p, s in stats.items()},
        micro_batches=max(s["pieces"] for s in stats.values()),
        device_phase_s={
            p: {"forward": s["forward_s"], "backward": s["backward_s"]} for p, s in stats.items()
        },
    )
