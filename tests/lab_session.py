"""Reusable helpers for tests that drive a real JupyterLab in headless Chromium.

Usage (sync Playwright API)::

    from lab_session import LabServer, browser_page, open_notebook, run_command
    # (pytest puts tests/ on sys.path; tests/ has no __init__.py)

    with LabServer() as lab:                      # JupyterLab on a free 127.0.0.1 port
        (lab.root_dir / "demo.ipynb").write_text(...)
        with browser_page() as page:              # Debian chromium, never downloaded
            open_notebook(page, lab, "demo.ipynb")
            run_command(page, "notebook:run-all-cells")
            screenshot(page, tmp_path, "demo.png")  # tmp_path; copied to $ADAPTIVE_NB_SCREENSHOTS

* :class:`LabServer` starts ``python -m jupyterlab`` with a random token, ``--allow-root``,
  no browser, a temporary root dir and temporary settings/workspace/runtime dirs (so no
  news pop-ups or stale layouts). ``lab.url(path)`` adds the token; ``lab.api(...)`` calls
  the REST API. It exposes the app as ``window.jupyterapp`` so tests can run commands.
* :func:`browser_page` yields a Playwright ``Page`` in a fresh context; everything is
  closed on exit even when the test fails.
* :func:`screenshot` writes a picture into the test's temporary folder, and copies it into
  the folder named by ``ADAPTIVE_NB_SCREENSHOTS`` only when that is set (e.g.
  ``ADAPTIVE_NB_SCREENSHOTS=docs/images`` to refresh the README's pictures): tests never
  write into the checkout otherwise.
* :func:`chromium_missing` returns a reason string when the browser test cannot run
  (no ``/usr/bin/chromium`` or no Playwright); use it with ``pytest.mark.skipif``.

Teardown is robust: the server runs in its own process group which is terminated, then
killed, and the temporary folders are removed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "SCREENSHOTS_ENV",
    "TINY_TRAINING_SETUP",
    "LabServer",
    "browser_page",
    "chromium_missing",
    "free_port",
    "open_notebook",
    "run_command",
    "screenshot",
    "wait_kernel_idle",
]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
)
REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS_ENV = "ADAPTIVE_NB_SCREENSHOTS"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chromium_missing() -> str | None:
    """Why a browser test cannot run here, or None when it can. Under CI (``CI`` set)
    nothing is missing by definition: `make test` installs chromium, so a missing browser
    must fail the tests, not skip them."""
    if os.environ.get("CI"):
        return None
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (python) not installed"
    return None


class LabServer:
    """A JupyterLab server for one test session (context manager).

    ``root_dir``: notebooks folder (a temp folder by default, removed on stop).
    ``extra_args``: more command-line options for ``jupyter lab``.
    ``env``: extra environment variables for the server (and so its kernels).
    The repository root is put on the kernels' ``PYTHONPATH``.
    """

    def __init__(
        self,
        root_dir: Path | str | None = None,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        startup_timeout: float = 90.0,
    ) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="adaptive_nb_lab_"))
        self._own_root = root_dir is None
        self.root_dir = Path(root_dir) if root_dir is not None else self._tmp / "notebooks"
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.port = 0
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.python = python
        self.startup_timeout = startup_timeout
        self.log_path = self._tmp / "jupyterlab.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> LabServer:
        settings = self._tmp / "settings"
        notif = settings / "@jupyterlab" / "apputils-extension"
        notif.mkdir(parents=True, exist_ok=True)
        (notif / "notification.jupyterlab-settings").write_text(
            json.dumps({"checkForUpdates": False, "fetchNews": "false"})
        )
        env = dict(os.environ)
        env.update(
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(self._tmp / "workspaces"),
            JUPYTER_RUNTIME_DIR=str(self._tmp / "runtime"),
            PYTHONPATH=os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            PYDEVD_DISABLE_FILE_VALIDATION="1",
        )
        env.update(self.extra_env)
        last_error = ""
        for _attempt in range(3):  # a port can be taken between free_port() and bind
            self.port = free_port()
            cmd = [
                self.python,
                "-m",
                "jupyterlab",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                "--ServerApp.open_browser=False",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={self.root_dir}",
                "--allow-root",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                *self.extra_args,
            ]
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
            self._proc = subprocess.Popen(
                cmd,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.root_dir),
                start_new_session=True,
            )
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                last_error = str(exc)
                self._terminate()
        self._cleanup_tmp()
        raise RuntimeError(f"JupyterLab did not start: {last_error}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited ({self._proc.returncode}):\n{self.log()}")
            try:
                self.api("GET", "/api/status", timeout=2.0)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        raise RuntimeError(f"server not ready after {self.startup_timeout}s:\n{self.log()}")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None

    def _cleanup_tmp(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def stop(self) -> None:
        """Stop the server (and its kernels) and remove temporary folders."""
        try:
            self._terminate()
        finally:
            self._cleanup_tmp()

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- access -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "lab") -> str:
        """Browser URL for ``path`` (e.g. ``"lab/tree/demo.ipynb"``) with the token."""
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}/{path.lstrip('/')}{sep}token={self.token}"

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 10.0) -> Any:
        """Call the server's REST API; returns the decoded JSON (or None)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the server log."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


@contextmanager
def browser_page(*, width: int = 1400, height: int = 1000, headless: bool = True) -> Iterator[Any]:
    """A Playwright ``Page`` in Debian chromium (sync API); closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=list(CHROMIUM_ARGS), headless=headless
        )
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            try:
                page = context.new_page()
                page.set_default_timeout(30_000)
                yield page
            finally:
                context.close()
        finally:
            browser.close()


def open_notebook(page: Any, lab: LabServer, path: str, *, timeout_ms: int = 90_000) -> None:
    """Open ``path`` (relative to the root dir) in JupyterLab and wait until its kernel
    is idle."""
    page.goto(lab.url(f"lab/tree/{path}"))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout_ms)
    page.wait_for_function("() => !!window.jupyterapp", timeout=timeout_ms)
    wait_kernel_idle(page, timeout_ms=timeout_ms)


def wait_kernel_idle(page: Any, *, timeout_ms: int = 90_000) -> None:
    """Wait until the current notebook's kernel exists and is idle."""
    page.wait_for_function(
        """() => {
            const w = window.jupyterapp.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session
                && w.sessionContext.session.kernel;
            return !!k && k.status === 'idle';
        }""",
        timeout=timeout_ms,
    )


def run_command(
    page: Any, command: str, args: Mapping[str, Any] | None = None, *, wait: bool = False
) -> Any:
    """Run a JupyterLab command (e.g. ``"notebook:run-all-cells"``) in the page.

    By default returns at once (running cells resolve only when they finish); with
    ``wait=True`` waits for the command's promise and returns its JSON-able result."""
    if wait:
        return page.evaluate(
            "([c, a]) => window.jupyterapp.commands.execute(c, a)", [command, dict(args or {})]
        )
    page.evaluate(
        "([c, a]) => { window.jupyterapp.commands.execute(c, a); }", [command, dict(args or {})]
    )
    return None


def screenshot(target: Any, tmp_dir: Path, name: str, **kwargs: Any) -> Path:
    """Screenshot ``target`` (a Playwright Page or Locator) to ``tmp_dir / name`` and
    return that path; also copy it into ``$ADAPTIVE_NB_SCREENSHOTS`` when that is set.
    ``kwargs`` go to Playwright's ``screenshot`` (e.g. ``full_page=True``)."""
    path = tmp_dir / name
    target.screenshot(path=str(path), **kwargs)
    keep = os.environ.get(SCREENSHOTS_ENV)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / name)
    return path


TINY_TRAINING_SETUP = """\
import torch
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(net.parameters(), lr=0.05)
data = [(torch.randn(64, 32), torch.randint(0, 4, (64,))) for _ in range(50)]"""
"""A notebook cell defining `net`, `opt` and `data` for a small CPU training run."""
