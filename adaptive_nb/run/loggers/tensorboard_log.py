"""``log="tensorboard:DIR"``: the run's scalars and events in a TensorBoard log directory
(``torch.utils.tensorboard.SummaryWriter``, imported only when the run starts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...events import RunInfo
from .base import MetricLogger

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(MetricLogger):
    """Scalars with ``add_scalar(name, value, step)``; events as text (tag ``events``)."""

    kind = "TensorBoard"

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.log_dir = log_dir
        self._writer: Any = None

    def open(self, info: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        devices = ", ".join(info.devices)
        self._writer.add_text(
            "run",
            f"run {info.run_id}: policy {info.policy}, devices {devices}, "
            f"global batch {info.global_batch}, simulated {info.simulated}",
            0,
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self, ended: str | None) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
