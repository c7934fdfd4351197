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
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .control import RunControl
    from .errors import LossError, UsageError
    from .events import BaseObserver, Event, EventKind, Observer, Progress, RunInfo, TickRecord
    from .loop import Run, active_run, last_run, start, train
    from .report import RunReport

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
    "RunControl": ".control",
    "LossError": ".errors",
    "UsageError": ".errors",
    "BaseObserver": ".events",
    "Event": ".events",
    "EventKind": ".events",
    "Observer": ".events",
    "Progress": ".events",
    "RunInfo": ".events",
    "TickRecord": ".events",
    "Run": ".loop",
    "active_run": ".loop",
    "last_run": ".loop",
    "start": ".loop",
    "train": ".loop",
    "RunReport": ".report",
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
