"""The allocation policies a run can follow (one table, used by validation, controllers,
the control mailbox and the dashboard)."""

from __future__ import annotations

__all__ = ["POLICIES", "POLICY_HELP"]

POLICY_HELP: dict[str, str] = {
    "adaptive": "device set and shares adapt (CPU: threads)",
    "weights": "all devices, shares adapt",
    "static": "equal split, nothing adapts",
}

POLICIES: tuple[str, ...] = tuple(POLICY_HELP)
"""Policy names, default first."""
