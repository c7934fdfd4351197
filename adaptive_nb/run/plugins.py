"""Plug-in points of the run layer, filled from above.

The run loop never looks up an upper layer (the simulated fleet, the Jupyter front-end)
by name. Instead the package facade (:mod:`adaptive_nb`) or a front-end registers here:

- a *device provider* per device kind in ``devices="KIND:ARG"`` (``sim`` for a simulated
  fleet): ``provider(arg, policy=, headroom=, control_interval=)`` returns the engine,
  controller and snapshot source of a run;
- the *dashboard factory* used by ``train(widget=True)``:
  ``factory(control, device_names, simulated) -> Observer``;
- the *report plotter* behind :meth:`RunReport.plot <adaptive_nb.run.report.RunReport.plot>`.

Torch-free and import-free, so that registering costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import UsageError

__all__ = [
    "dashboard_factory",
    "device_provider",
    "register_dashboard",
    "register_device_provider",
    "register_report_plotter",
    "report_plotter",
]

DeviceProvider = Callable[..., tuple[Any, Any, Any]]
DashboardFactory = Callable[[Any, list[str], bool], Any]
ReportPlotter = Callable[[Any], list[Any]]

_providers: dict[str, DeviceProvider] = {}
_dashboard: list[DashboardFactory] = []
_plotter: list[ReportPlotter] = []


def register_device_provider(kind: str, provider: DeviceProvider) -> None:
    """Serve ``devices="KIND:ARG"`` with ``provider`` (replaces an earlier one)."""
    _providers[kind] = provider


def device_provider(kind: str) -> DeviceProvider:
    try:
        return _providers[kind]
    except KeyError:
        raise UsageError(
            f"devices={kind}:… needs the {kind!r} device provider, which is not installed: "
            "import adaptive_nb (the package) before calling train()."
        ) from None


def register_dashboard(factory: DashboardFactory) -> None:
    """The live dashboard shown by ``train(widget=True)``."""
    _dashboard[:] = [factory]


def dashboard_factory() -> DashboardFactory:
    if not _dashboard:
        raise UsageError(
            "widget=True shows the notebook dashboard, which is not available here: "
            "use progress=True for a text progress line, or pass observers=[...]."
        )
    return _dashboard[0]


def register_report_plotter(plotter: ReportPlotter) -> None:
    """What draws :meth:`RunReport.plot`."""
    _plotter[:] = [plotter]


def report_plotter() -> ReportPlotter:
    if not _plotter:
        raise UsageError(
            "RunReport.plot() draws with the notebook front-end, which is not available "
            "here: use report.to_csv(...) or report.timeline_rows() instead."
        )
    return _plotter[0]
