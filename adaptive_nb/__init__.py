"""adaptive_nb: adaptive PyTorch training for Jupyter.

In a notebook::

    %load_ext adaptive_nb

    %%adaptive_train --model net --optimizer opt --data loader --epochs 2
    x, y = batch
    loss = F.cross_entropy(model(x), y)

From a script::

    report = adaptive_nb.train(lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
                               model=net, optimizer=opt, data=loader, epochs=2)

Public names are imported on first use, so that the Jupyter server extension (which only
needs the monitor) does not import torch.

This module is the composition root: it is the one place above every layer, and it wires
the upper layers into the run layer's plug-in points (:mod:`adaptive_nb.run.plugins`):
``devices="sim:…"`` → the simulated fleet, ``train(widget=True)`` → the notebook dashboard,
``RunReport.plot()`` → the notebook report figures. Each is imported only when used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .run import plugins as _plugins

if TYPE_CHECKING:
    from .errors import LossError, UsageError
    from .events import Event, EventKind, Progress, RunInfo, TickRecord
    from .run.api import active_run, last_run, start, train
    from .run.control import RunControl
    from .run.loop import Run
    from .run.observers import BaseObserver, Observer
    from .run.report import RunReport

__all__ = [
    "BaseObserver",
    "Event",
    "EventKind",
    "LossError",
    "Observer",
    "Progress",
    "Run",
    "RunControl",
    "RunInfo",
    "RunReport",
    "TickRecord",
    "UsageError",
    "__version__",
    "active_run",
    "last_run",
    "load_ipython_extension",
    "start",
    "train",
]

_LAZY = {
    "RunControl": ".run.control",
    "LossError": ".errors",
    "UsageError": ".errors",
    "BaseObserver": ".run.observers",
    "Event": ".events",
    "EventKind": ".events",
    "Observer": ".run.observers",
    "Progress": ".events",
    "RunInfo": ".events",
    "TickRecord": ".events",
    "Run": ".run.loop",
    "active_run": ".run.api",
    "last_run": ".run.api",
    "start": ".run.api",
    "train": ".run.api",
    "RunReport": ".run.report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adaptive_nb' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _sim_provider(path: str, **options: Any) -> tuple[Any, Any, Any]:
    from .sim import build_sim_run

    return build_sim_run(path, **options)


def _dashboard(control: Any, device_names: list[str], simulated: bool) -> Any:
    from .jupyter.dashboard import show_dashboard

    return show_dashboard(control, device_names, simulated)


def _report_figures(report: Any) -> list[Any]:
    from .jupyter.dashboard.report_view import report_figures

    figures: list[Any] = report_figures(report)
    return figures


_plugins.register_device_provider("sim", _sim_provider)
_plugins.register_dashboard(_dashboard)
_plugins.register_report_plotter(_report_figures)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext adaptive_nb``: register the magics (imports the Jupyter front-end lazily)."""
    from .jupyter import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .jupyter import unload_ipython_extension as _unload

    _unload(ipython)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The prebuilt JupyterLab extension (``adaptive_nb/labextension`` → ``adaptive-nb``),
    for ``jupyter labextension develop``."""
    return [{"src": "labextension", "dest": "adaptive-nb"}]
