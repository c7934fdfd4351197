"""Jupyter front-ends of adaptive_nb: magics, live dashboard, server extension.

Everything here imports the core; the core never imports this package (the one plug-in
point is :func:`show_dashboard`, looked up by name when ``train(widget=True)``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..control import RunControl
    from ..events import Observer

__all__ = ["load_ipython_extension", "show_dashboard", "unload_ipython_extension"]

log = logging.getLogger("adaptive_nb")


def show_dashboard(control: RunControl, device_names: list[str], simulated: bool) -> Observer:
    """Create the live dashboard for a run, display it in the current cell's output, and
    return it (it is an :class:`~adaptive_nb.events.Observer`)."""
    from IPython.display import display

    from .dashboard import Dashboard

    dashboard = Dashboard(control=control, device_names=device_names, simulated=simulated)
    display(dashboard)
    return dashboard


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
