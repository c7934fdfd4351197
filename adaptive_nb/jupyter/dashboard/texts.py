"""The dashboard's text panels (header, progress figures, status line, event log) as
HTML; a mixin of :class:`~.observer.Dashboard`, kept apart so that the observer module
holds the threading and throttling only."""

from __future__ import annotations

import html

from ...events import Event, Progress, RunInfo, TickRecord
from .format import event_row_html, fmt_duration, fmt_number, fmt_rate

__all__ = ["DashboardText", "completed"]


def completed(ended: str) -> bool:
    return ended in ("finished", "completed", "done")


class DashboardText:
    """HTML of the dashboard's text panels, from the dashboard's state."""

    title: str
    monitor_only: bool
    simulated: bool
    device_names: list[str]
    _policy: str
    _tick: TickRecord | None

    # -- HTML pieces ------------------------------------------------------------------------
    def _header_html(self, info: RunInfo | None = None, policy: str | None = None) -> str:
        names = list(info.devices) if info is not None and info.devices else self.device_names
        simulated = self.simulated or bool(info and info.simulated)
        parts = [f"<b style='font-size:15px'>{html.escape(self.title)}</b>"]
        if self.monitor_only:
            parts.append("resource monitor")
        elif info is not None:
            parts.append(f"run <code>{html.escape(info.run_id)}</code>")
        if not self.monitor_only:
            parts.append(f"policy <b>{html.escape(policy or self._policy)}</b>")
            if info is not None and info.global_batch:
                parts.append(f"global batch {info.global_batch}")
        if names:
            devs = ", ".join(html.escape(n) for n in names)
            parts.append(f"{len(names)} device{'s' if len(names) != 1 else ''}: {devs}")
        badge = ""
        if simulated:
            badge = (
                " <span title='Devices are simulated: timings and memory come from a model, "
                "not from hardware' style='background:#b45309;color:white;font-weight:700;"
                "border-radius:4px;padding:1px 8px;margin-left:6px;letter-spacing:0.5px'>"
                "SIMULATED</span>"
            )
        return (
            "<div style='line-height:1.6'>"
            + " <span style='color:#9ca3af'>·</span> ".join(parts)
            + badge
            + "</div>"
        )

    def _stats_html(
        self,
        p: Progress | None = None,
        info: RunInfo | None = None,
        ended: str | None = None,
        skipped: int = 0,
    ) -> str:
        if self.monitor_only:
            tick = self._tick
            el = fmt_duration(tick.t) if tick is not None else "0:00"
            return f"<span style='font-size:13px'>elapsed <b>{el}</b></span>"
        if p is None:
            return "<span style='color:#6b7280;font-size:13px'>waiting for the first step…</span>"
        total = p.total_steps
        if total:
            steps = f"step <b>{p.step:,}</b> / {total:,}"
        else:
            epochs = info.epochs if info is not None else None
            ep = f"epoch {p.epoch + 1}" + (f" / {epochs}" if epochs else "")
            steps = f"step <b>{p.step:,}</b> ({ep}, length unknown)"
        eta = "–" if ended is not None else fmt_duration(p.eta_s)
        items = [
            steps,
            f"<b>{fmt_rate(p.samples_per_s)}</b>",
            f"ETA {eta}",
            f"elapsed {fmt_duration(p.elapsed_s)}",
        ]
        if p.loss is not None:
            items.append(f"loss {fmt_number(p.loss, 4)}")
        if p.lr is not None:
            items.append(f"lr {fmt_number(p.lr, 3)}")
        if skipped:
            items.append(
                f"<span style='color:#dc2626'>{skipped} step{'s' if skipped != 1 else ''} "
                "skipped (non-finite gradients)</span>"
            )
        sep = " <span style='color:#9ca3af'>·</span> "
        return f"<span style='font-size:13px'>{sep.join(items)}</span>"

    def _status_html(
        self, paused: bool = False, ended: str | None = None, note: str = "", where: str = ""
    ) -> str:
        if ended is not None:
            colour, text = "#15803d", f"Run {ended}{where}"
            if not completed(ended):
                colour = "#b91c1c" if ended.startswith("error") else "#b45309"
            if self.monitor_only:
                colour, text = "#15803d", f"Monitoring {ended}"
        elif paused:
            colour, text = "#b45309", "Paused: press Resume to continue"
        else:
            colour, text = "#2563eb", "Monitoring" if self.monitor_only else "Running"
        extra = f" <span style='color:#6b7280'>({html.escape(note)})</span>" if note else ""
        return (
            f"<span style='font-size:13px'><span style='color:{colour}'>●</span> "
            f"<b>{html.escape(text)}</b>{extra}</span>"
        )

    @staticmethod
    def _events_html(events: list[tuple[Event, int]], total: int = 0) -> str:
        if not events:
            return "<span style='color:#6b7280;font-size:12px'>no events yet</span>"
        rows = "".join(event_row_html(e, n) for e, n in reversed(events))
        more = ""
        shown = sum(n for _, n in events)
        if total > shown:
            more = (
                f"<div style='color:#6b7280'>… {total - shown} earlier events in the report</div>"
            )
        return (
            "<table style='font-size:12px;border-collapse:collapse;width:100%'>"
            "<tr style='color:#6b7280;text-align:left'><th style='padding-right:8px'>time</th>"
            "<th style='padding-right:8px'>step</th><th style='padding-right:8px'>what</th>"
            f"<th>detail</th></tr>{rows}</table>{more}"
        )
