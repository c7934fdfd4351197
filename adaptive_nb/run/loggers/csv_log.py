"""``log="csv:PATH"``: the run streamed to a CSV file while it trains, one row per value,
flushed per row, so ``tail -f`` or pandas sees it live. Long format
(``wall_time, step, name, value, text``) because devices may appear during a run:
``pandas.read_csv(PATH).pivot_table(index="step", columns="name", values="value")``."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import IO, Any

from ...events import RunInfo
from .base import MetricLogger

__all__ = ["COLUMNS", "CsvLogger"]

COLUMNS = ("wall_time", "step", "name", "value", "text")


class CsvLogger(MetricLogger):
    """Rows ``(wall_time, step, name, value, "")`` for scalars, ``(…, tag, "", text)`` for
    events; a ``run`` row with the run's description first."""

    kind = "CSV"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fh: IO[str] | None = None
        self._writer: Any = None

    def open(self, info: RunInfo) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._fh)
        self._row(COLUMNS)
        devices = "|".join(info.devices)
        self._row(
            (time.time(), 0, "run", "", f"{info.run_id} policy={info.policy} devices={devices}")
        )

    def _row(self, row: tuple[Any, ...]) -> None:
        if self._writer is None or self._fh is None:
            return
        self._writer.writerow(row)
        self._fh.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        for name, value in values.items():
            self._row((now, step, name, repr(float(value)), ""))

    def text(self, step: int, tag: str, text: str) -> None:
        self._row((time.time(), step, tag, "", text))

    def close(self, ended: str | None) -> None:
        fh, self._fh, self._writer = self._fh, None, None
        if fh is not None:
            fh.close()
