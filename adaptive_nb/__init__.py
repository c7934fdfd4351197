"""adaptive_nb: adaptive PyTorch training for Jupyter.

In a notebook::

    %load_ext adaptive_nb

    %%adaptive_train --model net --optimizer opt --data loader --epochs 2
    x, y = batch
    loss = F.cross_entropy(model(x), y)

From a script::

    report = adaptive_nb.train(lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
                               model=net, optimizer=opt, data=loader, epochs=2)
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
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


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext adaptive_nb``: register the magics (imports the Jupyter front-end lazily)."""
    from .jupyter import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .jupyter import unload_ipython_extension as _unload

    _unload(ipython)
