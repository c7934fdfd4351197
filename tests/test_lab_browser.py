"""The JupyterLab extension in a real JupyterLab, driven by headless Debian chromium: the
"Adaptive resources" sidebar shows CPU/RAM (and GPUs or a no-GPU notice), the status bar
summarises, and a ``%%adaptive_train`` run appears while it trains and goes when it stops.
Screenshots (``lab_resources.png`` light, ``lab_resources_dark.png``, ``lab_resources_gpus.png``)
go to the test's temporary folder, and to ``$ADAPTIVE_NB_SCREENSHOTS`` when that is set."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
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
    run_command,
    screenshot,
    wait_kernel_idle,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing())),
    pytest.mark.timeout(300),
]

REPO = Path(__file__).resolve().parent.parent
BUILT_EXTENSION = REPO / "adaptive_nb" / "labextension"

CELLS = [
    "%load_ext adaptive_nb",
    TINY_TRAINING_SETUP,
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


# Server-side config for the simulated-GPU test: FakeNvml GPUs whose processes are this
# server's kernels (so the table can name their notebooks) plus one unknown process.
SIMULATED_GPUS_CONFIG = """
import math, threading, time
import psutil
import adaptive_nb.jupyter.server.state as state
from adaptive_nb.monitor._fake_nvml import FakeGpu, FakeNvml

GPUS = [FakeGpu(name="NVIDIA A100-SXM4-40GB", mem_total_mb=40960) for _ in range(2)]
_init = state.ResourceSampler.__init__

def _with_fake_gpus(self, max_age_s=0.75, nvml=None, monitor_factory=None):
    _init(self, max_age_s, FakeNvml(GPUS) if nvml is None else nvml, monitor_factory)

state.ResourceSampler.__init__ = _with_fake_gpus

def _animate():
    me = psutil.Process()
    t0 = time.monotonic()
    while True:
        t = time.monotonic() - t0
        kernels = sorted(p.pid for p in me.children())
        GPUS[0].util_pct = 72 + 18 * math.sin(t / 3)
        GPUS[0].processes = [(pid, 9216.0 + 512 * math.sin(t / 5)) for pid in kernels[:1]]
        GPUS[0].processes.append((4_000_123, 3072.0))
        GPUS[1].util_pct = 35 + 25 * math.sin(t / 4 + 1)
        GPUS[1].processes = [(pid, 5632.0) for pid in kernels[:1]]
        time.sleep(0.25)

threading.Thread(target=_animate, daemon=True).start()
"""


def _start_lab(kernel: NotebookKernel, config_py: str | None = None) -> Iterator[LabServer]:
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
        env = {"JUPYTER_PATH": kernel.env()["JUPYTER_PATH"]}
        if config_py is not None:
            (Path(ext_dir) / "config").mkdir()
            (Path(ext_dir) / "config" / "jupyter_server_config.py").write_text(config_py)
            env["JUPYTER_CONFIG_DIR"] = str(Path(ext_dir) / "config")
        with LabServer(extra_args=args, env=env) as server:
            yield server


@pytest.fixture
def lab(nb_kernel: NotebookKernel) -> Iterator[LabServer]:
    yield from _start_lab(nb_kernel)


@pytest.fixture
def lab_with_simulated_gpus(nb_kernel: NotebookKernel) -> Iterator[LabServer]:
    yield from _start_lab(nb_kernel, SIMULATED_GPUS_CONFIG)


def _write_notebooks(root: Path, kernel: NotebookKernel) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = kernel.metadata()
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


def _open_train_notebook_and_panel(page: Any, lab: LabServer) -> Any:
    page.goto(lab.url("lab/tree/train.ipynb"))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
    page.wait_for_function("() => !!window.jupyterapp", timeout=90_000)
    wait_kernel_idle(page)
    run_command(page, "adaptive-nb:show-resources")
    panel = page.locator(PANEL)
    panel.wait_for(state="visible")
    return panel


def _widen_left_sidebar(page: Any, dx: int) -> None:
    """Drag the handle between the left sidebar and the main area ``dx`` pixels right."""
    handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle").first
    box = handle.bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y, steps=5)
    page.mouse.up()


def _start_training(page: Any) -> None:
    # not awaited: the command's promise settles only when every cell has run
    page.evaluate("() => { void window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    page.locator(RUN).wait_for(state="visible", timeout=90_000)
    page.wait_for_function(
        f"() => /samples\\/s/.test(document.querySelector('{RUN}').textContent)"
        f" && /step [1-9]/.test(document.querySelector('{RUN}').textContent)",
        timeout=30_000,
    )


def test_sidebar_shows_resources_and_an_active_run(
    lab: LabServer, nb_kernel: NotebookKernel, tmp_path: Path
) -> None:
    _write_notebooks(lab.root_dir, nb_kernel)
    resources = lab.api("GET", "/adaptive-nb/api/resources")

    with browser_page(width=1400, height=900) as page:
        panel = _open_train_notebook_and_panel(page, lab)
        commands = page.evaluate("() => window.jupyterapp.commands.listCommands()")
        assert "adaptive-nb:show-resources" in commands
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
        _start_training(page)
        card = page.locator(RUN)
        assert card.locator(".jp-AdaptiveNb-link").inner_text() == "train.ipynb"
        assert "/ 20000" in card.inner_text() and "policy adaptive" in card.inner_text()
        page.wait_for_function(
            f"() => document.querySelector('{STATUS}').textContent.includes('1 run')",
            timeout=15_000,
        )
        time.sleep(2.5)  # a few more samples for the sparklines
        screenshot(page, tmp_path, "lab_resources.png")

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
        screenshot(page, tmp_path, "lab_resources_dark.png")

        # interrupting the kernel ends the run; its card goes away
        run_command(page, "kernelmenu:interrupt")
        page.locator(RUN).wait_for(state="detached", timeout=30_000)
        assert lab.api("GET", "/adaptive-nb/api/runs") == {"runs": []}
        assert "run" not in page.locator(STATUS).inner_text()


def test_simulated_gpus_show_charts_and_the_notebook_of_each_gpu_process(
    lab_with_simulated_gpus: LabServer, nb_kernel: NotebookKernel, tmp_path: Path
) -> None:
    lab = lab_with_simulated_gpus
    _write_notebooks(lab.root_dir, nb_kernel)

    with browser_page(width=1400, height=900) as page:
        panel = _open_train_notebook_and_panel(page, lab)
        gpus = panel.locator(".jp-AdaptiveNb-gpu")
        gpus.first.wait_for(state="visible")
        assert gpus.count() == 2
        assert "simulated" in gpus.nth(0).inner_text()
        assert "GPU 0" in gpus.nth(0).inner_text() and "/ 40.0 GB" in gpus.nth(0).inner_text()
        assert gpus.nth(0).locator("svg.jp-AdaptiveNb-spark").count() == 2
        assert panel.locator('[data-adaptive="no-gpu"]').count() == 0

        # the kernel's GPU memory is attributed to its notebook; the other process is not
        rows = panel.locator('[data-section="processes"] tbody tr')
        page.wait_for_function(
            "() => [...document.querySelectorAll('#adaptive-nb-resources tbody tr')]"
            ".some(r => r.textContent.includes('train.ipynb'))",
            timeout=30_000,
        )
        texts = [rows.nth(i).inner_text() for i in range(rows.count())]
        assert sum("train.ipynb" in t for t in texts) == 2, texts
        assert any("other process" in t and "4000123" in t for t in texts), texts

        _start_training(page)
        page.wait_for_function(
            f"() => /GPU 2\\/2 busy · 1 run · [\\d,.]+ samples\\/s/"
            f".test(document.querySelector('{STATUS}').textContent)",
            timeout=30_000,
        )
        _widen_left_sidebar(page, 90)
        time.sleep(20)  # let the sparklines fill for the picture
        screenshot(page, tmp_path, "lab_resources_gpus.png")

        # a click on the process table's notebook opens it
        run_command(page, "docmanager:open", {"path": "other.ipynb"})
        _wait_current_path(page, "other.ipynb")
        panel.locator("tbody .jp-AdaptiveNb-link").first.click()
        _wait_current_path(page, "train.ipynb")

        run_command(page, "kernelmenu:interrupt")
        page.locator(RUN).wait_for(state="detached", timeout=30_000)
