"""The live dashboard in a real JupyterLab, driven by headless Debian chromium: figures
render and update while a ``%%adaptive_train`` cell runs, and Pause / Resume / Stop take
effect during the run (widget messages arrive on a kernel subshell)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import NotebookKernel
from lab_session import (
    TINY_TRAINING_SETUP,
    LabServer,
    browser_page,
    chromium_missing,
    open_notebook,
    run_command,
    screenshot,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing())),
    pytest.mark.timeout(300),
]

REPO = Path(__file__).resolve().parent.parent

CELLS = [
    "%load_ext adaptive_nb",
    TINY_TRAINING_SETUP,
    """\
%%adaptive_train --model net --optimizer opt --data data --steps 4000 --interval 0.25
import time
time.sleep(0.02)
x, y = batch
loss = nn.functional.cross_entropy(model(x), y)""",
    "r = _adaptive\n"
    "kinds = ' '.join(e.kind for e in r.events)\n"
    "print(f\"RESULT {r.summary['ended']} {r.summary['steps']} {kinds} END\")",
]


# one print of one string, ended by a marker: "RESULT <ended> <number> [<words>...] END" on a
# line of its own; only the whole line matches, never a first stream chunk
RESULT_LINE = re.compile(r"^RESULT (\S+) (\d+)((?: \S+)*) END$", re.MULTILINE)


def _step(page: Any) -> int:
    text = page.locator(".adaptive-nb-dashboard").inner_text()
    m = re.search(r"step ([\d,]+) / ", text)
    return int(m.group(1).replace(",", "")) if m else -1


def _wait_step_above(page: Any, n: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _step(page)
        if s > n:
            return s
        time.sleep(0.1)
    raise AssertionError(f"training did not pass step {n} (at {_step(page)})")


def _button(page: Any, name: str) -> Any:
    return page.locator(".adaptive-nb-dashboard button", has_text=name)


def _wait_result(page: Any, timeout: float) -> tuple[str, int, list[str]]:
    """Poll the notebook's outputs until one holds a whole ``RESULT ... END`` line (an
    output can be read while its text is still arriving) and return (ended, number,
    words in between)."""
    deadline = time.monotonic() + timeout
    texts: list[str] = []
    while True:
        texts = page.evaluate(
            "() => [...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.innerText)"
        )
        for text in texts:
            m = RESULT_LINE.search(text)
            if m is not None:
                return m.group(1), int(m.group(2)), m.group(3).split()
        if time.monotonic() >= deadline:
            raise AssertionError(f"no whole RESULT ... END line after {timeout} s: {texts[-3:]!r}")
        time.sleep(0.2)


def _write_notebook(path: Path, cells: list[str], kernel: NotebookKernel) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = kernel.metadata()
    nbformat.write(nb, path)


def test_dashboard_renders_updates_and_obeys_pause_resume_stop(
    tmp_path: Path, nb_kernel: NotebookKernel
) -> None:
    with LabServer(env={"JUPYTER_PATH": nb_kernel.env()["JUPYTER_PATH"]}) as lab:
        _write_notebook(lab.root_dir / "train.ipynb", CELLS, nb_kernel)
        with browser_page(width=1280, height=1400) as page:
            try:
                _drive(page, lab, tmp_path)
            except BaseException:
                shot = screenshot(page, tmp_path, "dashboard_failure.png", full_page=True)
                print(f"failure screenshot: {shot}")
                raise
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def _drive(page: Any, lab: LabServer, shots: Path) -> None:
    open_notebook(page, lab, "train.ipynb")
    run_command(page, "application:toggle-left-area")
    run_command(page, "notebook:run-all-cells")

    dash = page.locator(".adaptive-nb-dashboard")
    dash.wait_for(timeout=90_000)
    figures = dash.locator(".bqplot.figure")
    page.wait_for_function(
        "() => document.querySelectorAll('.adaptive-nb-dashboard .bqplot.figure svg').length >= 5",
        timeout=30_000,
    )
    assert figures.count() == 5  # utilisation, throughput, memory, shares, lr/evaluation

    # the plots update while training runs
    s1 = _wait_step_above(page, 5)
    line = dash.locator(".bqplot.figure").nth(1).locator("path.line").first
    d1 = line.get_attribute("d")
    _wait_step_above(page, s1 + 20)
    time.sleep(0.6)
    assert line.get_attribute("d") != d1, "the throughput line did not move"
    assert dash.locator("rect.bar, .bar").count() > 0  # memory and share bars

    # Pause: training stops advancing
    _button(page, "Pause").click()
    dash.get_by_text("Paused: press Resume to continue").wait_for(timeout=15_000)
    paused_at = _step(page)
    time.sleep(1.5)
    assert _step(page) == paused_at, "steps advanced while paused"

    # Resume: training advances again
    _button(page, "Resume").click()
    _wait_step_above(page, paused_at + 10, timeout=20)

    # Stop: the run ends early and keeps its report
    time.sleep(1.0)
    _button(page, "Stop").click()
    dash.get_by_text("Run stopped").wait_for(timeout=20_000)
    ended, steps, kinds = _wait_result(page, timeout=30.0)
    assert ended == "stopped"
    assert 0 < steps < 4000
    assert steps >= paused_at + 10
    for kind in ("pause", "resume", "stop"):
        assert kind in kinds
    assert kinds.index("pause") < kinds.index("resume") < kinds.index("stop")
    # the final progress text agrees with the report
    assert f"step {steps:,} / 4,000" in dash.inner_text()

    page.wait_for_timeout(500)
    dash.scroll_into_view_if_needed()
    screenshot(dash, shots, "dashboard.png")
    screenshot(page, shots, "dashboard_page.png", full_page=True)


SIM_CELLS = [
    "%load_ext adaptive_nb",
    """\
import torch
import torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
x_all = torch.randn(512 * 24, 32)
y_all = (x_all[:, :4].sum(1) > 0).long() + (x_all[:, 4] > 1).long()
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x_all, y_all), batch_size=512, shuffle=True
)
net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 3))
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)""",
    "%%adaptive_train --model net --optimizer opt --data loader --steps 360 --interval 2 "
    f"--devices sim:{REPO}/examples/mixed_workstation.json\n"
    """\
x, y = batch
loss = F.cross_entropy(model(x), y)""",
    "print(f\"RESULT {_adaptive.summary['ended']} {_adaptive.summary['reallocations']} END\")",
]


def test_simulated_fleet_dashboard_is_labelled_and_shows_every_device(
    tmp_path: Path, nb_kernel: NotebookKernel
) -> None:
    with LabServer(env={"JUPYTER_PATH": nb_kernel.env()["JUPYTER_PATH"]}) as lab:
        _write_notebook(lab.root_dir / "sim.ipynb", SIM_CELLS, nb_kernel)
        with browser_page(width=1280, height=1500) as page:
            open_notebook(page, lab, "sim.ipynb")
            run_command(page, "application:toggle-left-area")
            run_command(page, "notebook:run-all-cells")
            dash = page.locator(".adaptive-nb-dashboard")
            dash.wait_for(timeout=90_000)
            # mid-run, while another (simulated) job holds GPU 2
            _wait_step_above(page, 120, timeout=120)
            screenshot(dash, tmp_path, "dashboard_simulated_running.png")
            ended, _reallocations, _ = _wait_result(page, timeout=180.0)
            assert ended == "completed"
            assert dash.get_by_text("SIMULATED", exact=True).is_visible()
            text = dash.inner_text()
            assert "step 360 / 360" in text and "Run completed" in text
            # one include/exclude toggle per simulated GPU, and bars for each
            assert dash.locator("button", has_text="RTX 3090").count() == 2
            assert dash.locator("button", has_text="RTX 4090").count() == 1
            assert dash.locator(".bqplot.figure rect").count() >= 4 * 3
            page.wait_for_timeout(500)
            screenshot(dash, tmp_path, "dashboard_simulated.png")
