"""Short human formats for the dashboard (durations, rates, sizes, events)."""

from __future__ import annotations

import html
import math

from ...events import Event

__all__ = ["event_row_html", "fmt_duration", "fmt_number", "fmt_rate", "kind_label"]

_KIND_LABELS = {
    "start": ("start", "#6b7280"),
    "threads": ("threads", "#2563eb"),
    "hold": ("hold", "#6b7280"),
    "reallocate": ("reallocate", "#2563eb"),
    "devices": ("devices", "#7c3aed"),
    "device_dropped": ("device dropped", "#dc2626"),
    "device_readmitted": ("device back", "#16a34a"),
    "oom": ("OOM recovered", "#ea580c"),
    "microbatch": ("micro-batches", "#ea580c"),
    "policy": ("policy", "#0891b2"),
    "headroom": ("headroom", "#0891b2"),
    "pause": ("paused", "#ca8a04"),
    "resume": ("resumed", "#16a34a"),
    "stop": ("stopped", "#dc2626"),
    "interrupt": ("interrupted", "#dc2626"),
    "error": ("error", "#dc2626"),
    "notice": ("notice", "#6b7280"),
    "nonfinite": ("step skipped", "#dc2626"),
    "eval": ("evaluation", "#0d9488"),
    "end": ("end", "#6b7280"),
}


def fmt_duration(seconds: float | None) -> str:
    """``75.2`` → ``"1:15"``; ``3725`` → ``"1:02:05"``; None → ``"–"``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    total = round(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_number(value: float | None, digits: int = 3) -> str:
    """Readable number: thousands separators above 100, ``digits`` significant below."""
    if value is None or not math.isfinite(value):
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_rate(samples_per_s: float | None) -> str:
    return "–" if samples_per_s is None else f"{fmt_number(samples_per_s)} samples/s"


def kind_label(kind: str) -> tuple[str, str]:
    """Display label and colour of an event kind."""
    return _KIND_LABELS.get(kind, (kind, "#6b7280"))


def event_row_html(event: Event, repeats: int = 1) -> str:
    """One ``<tr>`` of the event log."""
    label, colour = kind_label(event.kind)
    times = f" <span style='color:#6b7280'>×{repeats}</span>" if repeats > 1 else ""
    return (
        "<tr>"
        f"<td style='color:#6b7280;padding:1px 8px 1px 0;white-space:nowrap'>"
        f"{fmt_duration(event.t)}</td>"
        f"<td style='color:#6b7280;padding:1px 8px 1px 0;text-align:right'>{event.step}</td>"
        f"<td style='padding:1px 8px 1px 0;white-space:nowrap'><span style='background:{colour};"
        f"color:white;border-radius:3px;padding:0 5px;font-size:11px'>{html.escape(label)}"
        f"</span></td>"
        f"<td style='padding:1px 0'>{html.escape(event.detail)}{times}</td>"
        "</tr>"
    )
