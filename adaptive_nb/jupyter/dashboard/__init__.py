"""Live dashboard of a training run (ipywidgets + bqplot) and report figures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .observer import Dashboard
from .report_view import report_figures

if TYPE_CHECKING:
    from ...run.control import RunControl

__all__ = ["Dashboard", "report_figures", "show_dashboard"]


def show_dashboard(control: RunControl, device_names: list[str], simulated: bool) -> Dashboard:
    """Create the live dashboard for a run, display it in the current cell's output, and
    return it (it is an :class:`~adaptive_nb.run.observers.Observer`)."""
    from IPython.display import display

    dashboard = Dashboard(control=control, device_names=device_names, simulated=simulated)
    display(dashboard)
    return dashboard
