"""A notebook with ``%%adaptive_train`` runs headless (nbclient); the saved widget state
holds the dashboard's bqplot figures and a finished progress bar."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import NotebookKernel
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent

SETUP = """\
import torch
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(net.parameters(), lr=0.1)
data = [(torch.randn(32, 8), torch.randint(0, 2, (32,))) for _ in range(10)]
"""
TRAIN = """\
%%adaptive_train --model net --optimizer opt --data data --steps 40 --interval 0.05
import time
time.sleep(0.01)
x, y = batch
loss = nn.functional.cross_entropy(model(x), y)
"""


def _run(tmp_path: Path, cells: list[str], kernel: NotebookKernel) -> Any:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = kernel.metadata()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "PYTHONPATH",
            os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        )
        client = NotebookClient(
            nb,
            timeout=120,
            kernel_name=kernel.name,
            resources={"metadata": {"path": str(tmp_path)}},
        )
        client.execute()
    return nb


def _widget_models(nb: Any) -> dict[str, dict[str, Any]]:
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return {k: v for k, v in state.items()}


def _of(models: dict[str, dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [m["state"] for m in models.values() if m["model_name"] == name]


@pytest.mark.timeout(180)
def test_train_cell_saves_figures_and_a_finished_progress_bar(
    tmp_path: Path, nb_kernel: NotebookKernel
) -> None:
    cells = ["%load_ext adaptive_nb", SETUP, TRAIN, "print(_adaptive.summary['ended'])"]
    nb = _run(tmp_path, cells, nb_kernel)
    models = _widget_models(nb)
    figures = _of(models, "FigureModel")
    titles = sorted(f["title"] for f in figures)
    assert titles == [
        "Learning rate and evaluation",
        "Memory per device (GiB)",
        "Share of the global batch",
        "Throughput and loss",
        "Utilisation per device (%)",
    ]
    bars = _of(models, "FloatProgressModel")
    assert len(bars) == 1
    assert bars[0]["bar_style"] == "success"
    assert bars[0]["value"] == bars[0]["max"] == 40
    stats = [s["value"] for s in _of(models, "HTMLModel") if "step <b>40</b> / 40" in s["value"]]
    assert stats, "the progress text shows the final step"
    # The plots received data: the throughput line has more than one point.
    lines = [s for s in _of(models, "LinesModel") if s.get("labels") == ["samples/s"]]
    assert len(lines) == 1 and lines[0]["x"]["shape"][0] >= 2
    util = [s for s in _of(models, "LinesModel") if s.get("labels") == ["cpu"]]
    assert len(util) == 1 and util[0]["y"]["shape"][-1] >= 2
    lr = [s for s in _of(models, "LinesModel") if s.get("labels") == ["learning rate"]]
    assert len(lr) == 1 and lr[0]["x"]["shape"][0] == 40  # every step's lr, from the report
    assert nb.cells[3].outputs[0]["text"].strip() == "completed"


@pytest.mark.timeout(180)
def test_monitor_cell_shows_plots_and_a_report(tmp_path: Path, nb_kernel: NotebookKernel) -> None:
    cell = (
        "%%adaptive_monitor --rate 20\nimport time\n"
        "s = sum(i * i for i in range(200_000))\ntime.sleep(0.5)\ns"
    )
    nb = _run(
        tmp_path, ["%load_ext adaptive_nb", cell, "print(_adaptive_monitor.samples)"], nb_kernel
    )
    models = _widget_models(nb)
    titles = sorted(f["title"] for f in _of(models, "FigureModel"))
    assert titles == ["Memory per device (GiB)", "Utilisation per device (%)"]
    outputs = nb.cells[1].outputs
    texts = [o.get("data", {}).get("text/plain", "") for o in outputs]
    assert any(t.startswith("Monitored ") for t in texts)
    assert any(str(sum(i * i for i in range(200_000))) in t for t in texts)  # the cell's value
    assert int(nb.cells[2].outputs[0]["text"]) >= 5
