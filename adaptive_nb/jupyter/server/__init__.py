"""Jupyter server extension: authenticated JSON endpoints for the JupyterLab sidebar.

* ``GET /adaptive-nb/api/resources``: GPUs (with the notebook owning each GPU process),
  CPU and RAM, from one cached :class:`~adaptive_nb.monitor.Monitor` per server process.
* ``GET /adaptive-nb/api/runs``: the active ``%%adaptive_train`` runs of every kernel, read
  from their status files in Jupyter's runtime directory.

Enabled by ``jupyter_server_config.d/adaptive_nb.json``; or run
``jupyter server extension enable adaptive_nb.jupyter.server``.
"""

from __future__ import annotations

from typing import Any

from .handlers import API_PREFIX, ResourcesHandler, RunsHandler, setup_handlers
from .state import KernelMap, ResourceSampler, ServerState

__all__ = [
    "API_PREFIX",
    "KernelMap",
    "ResourceSampler",
    "ResourcesHandler",
    "RunsHandler",
    "ServerState",
    "_jupyter_server_extension_points",
    "_load_jupyter_server_extension",
    "setup_handlers",
]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "adaptive_nb.jupyter.server"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    setup_handlers(serverapp)
    serverapp.log.info("adaptive_nb: resources and runs API at %s", API_PREFIX)
