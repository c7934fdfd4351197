"""``log="mlflow"`` / ``"mlflow:URI"``: the run as an MLflow run (experiment
``adaptive_nb``): parameters once at the start, metrics with ``step=``, events as the
``events.txt`` artifact at the end. Metrics are batched (written at each control tick and
at the end) because a tracking-store call per value would slow every step."""

from __future__ import annotations

import time
from typing import Any

from ...events import RunInfo
from .base import MetricLogger

__all__ = ["EXPERIMENT", "MlflowLogger"]

EXPERIMENT = "adaptive_nb"
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


class MlflowLogger(MetricLogger):
    """``tracking_uri`` None: MLflow's own default (``MLFLOW_TRACKING_URI`` or local)."""

    kind = "MLflow"

    def __init__(self, tracking_uri: str | None) -> None:
        super().__init__()
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None
        self._client: Any = None
        self._pending: list[Any] = []
        self._events: list[str] = []

    def open(self, info: RunInfo) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        exp_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(EXPERIMENT)
        )
        run = client.create_run(exp_id, run_name=info.run_id, tags={"adaptive_nb.run": "1"})
        self._client, self.run_id = client, run.info.run_id
        params = {
            "run_id": info.run_id,
            "policy": info.policy,
            "devices": ", ".join(info.devices),
            "simulated": info.simulated,
            "global_batch": info.global_batch,
            "total_steps": info.total_steps,
            "epochs": info.epochs,
        }
        for key, value in params.items():
            client.log_param(self.run_id, key, str(value))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, v, now, step) for k, v in values.items())

    def text(self, step: int, tag: str, text: str) -> None:
        self._events.append(f"step {step}\t{text}")

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if self._client is None:
            return
        for i in range(0, len(pending), _BATCH):
            self._client.log_batch(self.run_id, metrics=pending[i : i + _BATCH])

    def close(self, ended: str | None) -> None:
        client = self._client
        if client is None:
            return
        try:
            self.flush()
            if self._events:
                client.log_text(self.run_id, "\n".join(self._events) + "\n", "events.txt")
        finally:
            self._client = None
            client.set_terminated(self.run_id, status=_status(ended))


def _status(ended: str | None) -> str:
    """MLflow's run status for how the run ended (None: the logger itself failed)."""
    if ended is None or ended.startswith("error"):
        return "FAILED"
    return "FINISHED" if ended in ("completed", "finished") else "KILLED"
