"""The JupyterLab extension in a real JupyterLab, driven by headless Debian chromium: the
"Adaptive resources" sidebar shows CPU/RAM (and GPUs or a no-GPU notice), the status bar
summarises, and a ``%%adaptive_train`` run appears while it trains and goes when it stops.
Screenshots: ``build/lab_resources.png`` (light) and ``build/lab_resources_dark.png``."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from lab_session import LabServer, browser_page, chromium_missing, run_command, wait_kernel_idle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing())),
    pytest.mark.timeout(300),
]

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
BUILT_EXTENSION = REPO / "adaptive_nb" / "labextension"

CELLS = [
    "%load_ext adaptive_nb",
    """\
import torch
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(net.parameters(), lr=0.05)
data = [(torch.randn(64, 32), torch.randint(0, 4, (64,))) for _ in range(50)]""",
    """\
%%adaptive_train --model net --optimizer opt --data data --steps 20000 --no-widget
import time
time.sleep(0.01)
x, y = batch
loss = nn.functional.cross_entropy(model(x), y)""",
]

PANEL = "#adaptive-nb-resources"
RUN = f"{PANEL} .jp-AdaptiveNb-run"
STATUS = ".jp-AdaptiveNb-status"


@pytest.fixture
def lab() -> Iterator[LabServer]:
    if not (BUILT_EXTENSION / "package.json").exists():
        pytest.fail(
            f"the JupyterLab extension is not built ({BUILT_EXTENSION} is missing): "
            "run `npm install && npm run build` in labextension/ (pip install -e . does it)"
        )
    with tempfile.TemporaryDirectory(prefix="adaptive_nb_labext_") as ext_dir:
        # This checkout's build comes first on the labextensions path, installed or not.
        os.symlink(BUILT_EXTENSION, Path(ext_dir) / "adaptive-nb")
        args = [
            "--ServerApp.jpserver_extensions={'adaptive_nb.jupyter.server': True}",
            f"--LabApp.extra_labextensions_path={ext_dir}",
        ]
        with LabServer(extra_args=args) as server:
            yield server


def _write_notebooks(root: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, root / "train.ipynb")
    other = nbformat.v4.new_notebook()
    other.metadata["kernelspec"] = nb.metadata["kernelspec"]
    nbformat.write(other, root / "other.ipynb")


def _current_path(page: Any) -> str:
    return str(
        page.evaluate(
            "() => { const w = window.jupyterapp.shell.currentWidget;"
            " return w && w.context ? w.context.path : ''; }"
        )
    )


def _wait_current_path(page: Any, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _current_path(page) == path:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not become the current document ({_current_path(page)!r})")


def test_sidebar_shows_resources_and_an_active_run(lab: LabServer) -> None:
    BUILD.mkdir(exist_ok=True)
    _write_notebooks(lab.root_dir)
    resources = lab.api("GET", "/adaptive-nb/api/resources")

    with browser_page(width=1400, height=900) as page:
        page.goto(lab.url("lab/tree/train.ipynb"))
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
        page.wait_for_function("() => !!window.jupyterapp", timeout=90_000)
        wait_kernel_idle(page)

        # the palette command opens the panel
        commands = page.evaluate("() => window.jupyterapp.commands.listCommands()")
        assert "adaptive-nb:show-resources" in commands
        run_command(page, "adaptive-nb:show-resources")
        panel = page.locator(PANEL)
        panel.wait_for(state="visible")
        cpu = panel.locator('[data-adaptive="cpu"]')
        ram = panel.locator('[data-adaptive="ram"]')
        cpu.wait_for(state="visible")
        assert "% of" in cpu.inner_text() and "cores" in cpu.inner_text()
        assert " GB" in ram.inner_text()
        if resources["gpus"]:
            assert panel.locator(".jp-AdaptiveNb-gpu").count() == len(resources["gpus"])
        else:
            notice = panel.locator('[data-adaptive="no-gpu"]')
            assert "No GPU found" in notice.inner_text()
        assert "No adaptive training is running" in panel.inner_text()

        status = page.locator(STATUS)
        status.wait_for(state="visible")
        assert ("GPU" if resources["gpus"] else "CPU") in status.inner_text()

        # a %%adaptive_train run appears with its notebook, rate and progress
        t0 = time.monotonic()
        # not awaited: the command's promise settles only when every cell has run
        page.evaluate(
            "() => { void window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
        )
        print(f"run-all issued after {time.monotonic() - t0:.1f}s")
        page.locator(RUN).wait_for(state="visible", timeout=90_000)
        page.wait_for_function(
            f"() => /samples\\/s/.test(document.querySelector('{RUN}').textContent)"
            f" && /step [1-9]/.test(document.querySelector('{RUN}').textContent)",
            timeout=30_000,
        )
        print(f"run card with progress after {time.monotonic() - t0:.1f}s")
        card = page.locator(RUN)
        assert card.locator(".jp-AdaptiveNb-link").inner_text() == "train.ipynb"
        assert "/ 20000" in card.inner_text() and "policy adaptive" in card.inner_text()
        page.wait_for_function(
            f"() => document.querySelector('{STATUS}').textContent.includes('1 run')",
            timeout=15_000,
        )
        time.sleep(2.5)  # a few more samples for the sparklines
        page.screenshot(path=str(BUILD / "lab_resources.png"))
        print(f"screenshot after {time.monotonic() - t0:.1f}s")

        # clicking the run's notebook opens (activates) it
        run_command(page, "docmanager:open", {"path": "other.ipynb"})
        _wait_current_path(page, "other.ipynb")
        card.locator(".jp-AdaptiveNb-link").click()
        _wait_current_path(page, "train.ipynb")

        run_command(page, "apputils:change-theme", {"theme": "JupyterLab Dark"})
        page.wait_for_function(
            "() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000
        )
        time.sleep(1.5)
        page.screenshot(path=str(BUILD / "lab_resources_dark.png"))

        # interrupting the kernel ends the run; its card goes away
        run_command(page, "kernelmenu:interrupt")
        page.locator(RUN).wait_for(state="detached", timeout=30_000)
        assert lab.api("GET", "/adaptive-nb/api/runs") == {"runs": []}
        assert "run" not in page.locator(STATUS).inner_text()
