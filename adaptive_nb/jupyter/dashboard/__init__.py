"""Live dashboard of a training run (ipywidgets + bqplot) and report figures."""

from __future__ import annotations

from .observer import Dashboard
from .report_view import report_figures

__all__ = ["Dashboard", "report_figures"]
