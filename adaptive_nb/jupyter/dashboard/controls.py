"""Dashboard controls: Pause, Resume, Stop, policy, device include/exclude, headroom.

Widget handlers run on whatever thread delivers widget messages (a kernel subshell while
a cell runs, with ipykernel 7 and JupyterLab ≥ 4.4). They only call the thread-safe
methods of :class:`adaptive_nb.control.RunControl` (and ``note``, which only records a
string); the training loop applies the requests at the next step boundary and reports
each as an event. Widget state (enabled buttons, selected policy) is updated by the
dashboard's flush, never by a handler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets

from ...policies import POLICIES
from ...run.control import RunControl

__all__ = ["RunControls", "accept_on_frontend_subshell"]

log = logging.getLogger("adaptive_nb.dashboard")


def accept_on_frontend_subshell(widget: widgets.Widget) -> bool:
    """Let the frontend's choice of kernel subshell stand for messages to ``widget``.

    ipykernel 7 routes a comm's incoming messages to the subshell that last *sent* on it
    (``BaseComm._reply_subshell_for``). A widget created or updated by the running
    training cell has sent from the main shell, which is busy until the cell ends, so its
    clicks would wait for the end of training. Our handlers only post to the thread-safe
    :class:`RunControl`, so they may run on the subshell the frontend picked
    (JupyterLab ≥ 4.4, ``commsOverSubshells``). Returns False where there is nothing to
    change (no kernel, or a kernel without this routing)."""
    comm = getattr(widget, "comm", None)
    original = getattr(comm, "_reply_subshell_for", None)
    if comm is None or original is None or getattr(original, "_adaptive_nb", False):
        return False

    def route(data: Any, default: Any) -> Any:
        original(data, default)  # keeps ipykernel's bookkeeping of request ids
        return default

    route._adaptive_nb = True  # type: ignore[attr-defined]
    comm._reply_subshell_for = route
    return True


class RunControls:
    """The control bar of a training run (``widget`` is what gets displayed)."""

    def __init__(
        self,
        control: RunControl,
        device_names: Sequence[str],
        *,
        policy: str = "adaptive",
        headroom: float = 0.1,
        note: Callable[[str], None] | None = None,
        delivery: str = "",
    ) -> None:
        """``delivery``: why clicks cannot reach the kernel during a cell (see
        :mod:`.click_delivery`); empty when they can or it is unknown."""
        self.control = control
        self._note = note or (lambda _text: None)
        self._syncing = False
        button = widgets.Layout(width="auto", min_width="92px")
        self.pause_button = widgets.Button(
            description="Pause",
            icon="pause",
            tooltip="Pause after the current step",
            layout=button,
        )
        self.resume_button = widgets.Button(
            description="Resume",
            icon="play",
            tooltip="Resume training",
            disabled=True,
            layout=button,
        )
        self.stop_button = widgets.Button(
            description="Stop",
            icon="stop",
            button_style="danger",
            tooltip="Finish the current step, stop, keep the report",
            layout=button,
        )
        self.policy = widgets.Dropdown(
            options=list(POLICIES),
            value=policy if policy in POLICIES else POLICIES[0],
            description="Policy",
            layout=widgets.Layout(width="190px"),
            style={"description_width": "48px"},
        )
        self.headroom = widgets.FloatSlider(
            value=headroom,
            min=0.0,
            max=0.5,
            step=0.05,
            description="Headroom",
            readout_format=".0%",
            continuous_update=False,
            tooltip="Memory kept free on each GPU",
            layout=widgets.Layout(width="250px"),
            style={"description_width": "68px"},
        )
        self.device_toggles = [
            widgets.ToggleButton(
                value=True,
                description=name,
                icon="check",
                tooltip=f"Use {name} (untick to exclude it from the next steps)",
                layout=widgets.Layout(width="auto"),
            )
            for name in device_names
        ]
        self.pause_button.on_click(self._on_pause)
        self.resume_button.on_click(self._on_resume)
        self.stop_button.on_click(self._on_stop)
        self.policy.observe(self._on_policy, names="value")
        self.headroom.observe(self._on_headroom, names="value")
        for position, toggle in enumerate(self.device_toggles):
            toggle.observe(self._device_handler(position), names="value")
        for widget in self.widgets():
            accept_on_frontend_subshell(widget)

        rows: list[widgets.Widget] = [
            widgets.HBox(
                [
                    self.pause_button,
                    self.resume_button,
                    self.stop_button,
                    self.policy,
                    self.headroom,
                ],
                layout=widgets.Layout(align_items="center", flex_flow="row wrap"),
            )
        ]
        if len(self.device_toggles) > 1:
            rows.append(
                widgets.HBox(
                    [widgets.Label("Devices:"), *self.device_toggles],
                    layout=widgets.Layout(align_items="center", flex_flow="row wrap"),
                )
            )
        self.delivery_note = widgets.HTML(
            f"<span style='font-size:12px;color:#b45309'>⚠ {delivery}</span>" if delivery else "",
            layout=widgets.Layout(display="" if delivery else "none"),
        )
        self.delivery_note.add_class("adaptive-nb-delivery-note")
        rows.append(self.delivery_note)
        self.widget = widgets.VBox(rows)

    # -- handlers (any thread): only RunControl calls ----------------------------------
    def _on_pause(self, _button: Any = None) -> None:
        self.control.pause()
        self._note("pause requested")

    def _on_resume(self, _button: Any = None) -> None:
        self.control.resume()
        self._note("resume requested")

    def _on_stop(self, _button: Any = None) -> None:
        self.control.stop()
        self._note("stop requested: finishing the current step")

    def _on_policy(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        try:
            self.control.set_policy(str(change["new"]))
            self._note(f"policy {change['new']} requested")
        except ValueError as exc:
            log.warning("%s", exc)

    def _on_headroom(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        try:
            self.control.set_headroom(float(change["new"]))
            self._note(f"headroom {float(change['new']):.0%} requested")
        except ValueError as exc:
            log.warning("%s", exc)

    def _device_handler(self, position: int) -> Callable[[dict[str, Any]], None]:
        def handler(change: dict[str, Any]) -> None:
            if self._syncing:
                return
            enabled = bool(change["new"])
            self.control.set_device_enabled(position, enabled)
            name = self.device_toggles[position].description
            self._note(f"{'include' if enabled else 'exclude'} {name} requested")

        return handler

    # -- state (called by the dashboard's flush) ----------------------------------------
    def show_state(self, *, paused: bool, ended: bool, policy: str | None = None) -> None:
        """Enable the buttons that make sense now; reflect the run's policy."""
        self.pause_button.disabled = ended or paused
        self.resume_button.disabled = ended or not paused
        self.stop_button.disabled = ended
        self.policy.disabled = ended
        self.headroom.disabled = ended
        for toggle in self.device_toggles:
            toggle.disabled = ended
            icon = "check" if toggle.value else "times"
            if toggle.icon != icon:
                toggle.icon = icon
        if policy in POLICIES and policy != self.policy.value:
            self._syncing = True
            try:
                self.policy.value = policy
            finally:
                self._syncing = False

    def show_delivery(self, *, background: bool) -> None:
        """Hide the delivery note for a background run (its cell has ended, clicks arrive)."""
        display = "none" if background or not self.delivery_note.value else ""
        if self.delivery_note.layout.display != display:
            self.delivery_note.layout.display = display

    def widgets(self) -> list[widgets.Widget]:
        return [
            self.pause_button,
            self.resume_button,
            self.stop_button,
            self.policy,
            self.headroom,
            *self.device_toggles,
        ]
