"""Jupyter front-ends of adaptive_nb: magics, live dashboard, server extension.

Everything here imports the core; the core never imports this package. The magics pass
the dashboard to the run themselves; for ``adaptive_nb.train(widget=True)`` and
``RunReport.plot()`` the package facade (:mod:`adaptive_nb`) registers this package's
dashboard and report figures in :mod:`adaptive_nb.run.plugins`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..run.control import RunControl
    from ..run.observers import Observer

__all__ = ["load_ipython_extension", "show_dashboard", "unload_ipython_extension"]

log = logging.getLogger("adaptive_nb")


def show_dashboard(control: RunControl, device_names: list[str], simulated: bool) -> Observer:
    """Create, display and return the live dashboard of a run (see
    :func:`adaptive_nb.jupyter.dashboard.show_dashboard`)."""
    from .dashboard import show_dashboard as show

    return show(control, device_names, simulated)


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%adaptive_train`` (and ``%adaptive``, ``%%adaptive_monitor``) and print
    a one-line summary of the machine."""
    from .magics import AdaptiveMagics, machine_summary

    ipython.register_magics(AdaptiveMagics)
    try:
        from .control_magics import ControlMagics
    except ImportError:  # pragma: no cover - present in every install
        pass
    else:
        ipython.register_magics(ControlMagics)
    print(machine_summary())


def unload_ipython_extension(ipython: Any) -> None:
    """Nothing to undo beyond IPython's own bookkeeping (magics stay registered)."""
