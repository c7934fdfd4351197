"""Where the prebuilt JupyterLab extension lives (for ``jupyter labextension develop``)."""

from __future__ import annotations

__all__ = ["_jupyter_labextension_paths"]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The prebuilt extension: ``adaptive_nb/labextension`` → labextensions/adaptive-nb."""
    return [{"src": "labextension", "dest": "adaptive-nb"}]
