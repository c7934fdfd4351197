"""Tornado handlers. Every handler needs Jupyter authentication (``@web.authenticated``) and
authorization (``@authorized``, action ``read`` on resource ``adaptive_nb``); a request
without a valid token gets 403 (API handlers never redirect to a login page)."""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .state import KernelMap, ServerState

__all__ = ["API_PREFIX", "AUTH_RESOURCE", "ResourcesHandler", "RunsHandler", "setup_handlers"]

API_PREFIX = "/adaptive-nb/api"
AUTH_RESOURCE = "adaptive_nb"
SETTINGS_KEY = "adaptive_nb"


class _Handler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def state(self) -> ServerState:
        state: ServerState = self.settings[SETTINGS_KEY]
        return state

    def _json(self, data: dict[str, Any]) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data, allow_nan=False))


class ResourcesHandler(_Handler):
    """``GET /adaptive-nb/api/resources``: GPUs (processes with owning notebook), CPU, RAM."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self._json(await self.state.resources())


class RunsHandler(_Handler):
    """``GET /adaptive-nb/api/runs``: active ``%%adaptive_train`` runs of all kernels."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self._json(await self.state.runs())


def setup_handlers(serverapp: Any) -> ServerState:
    """Register the handlers on ``serverapp.web_app`` and return the shared state."""
    web_app = serverapp.web_app
    state = ServerState(
        KernelMap(serverapp.kernel_manager, getattr(serverapp, "session_manager", None)),
        runtime_dir=serverapp.runtime_dir,
    )
    web_app.settings[SETTINGS_KEY] = state
    base = url_path_join(web_app.settings["base_url"], API_PREFIX)
    web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "resources"), ResourcesHandler),
            (url_path_join(base, "runs"), RunsHandler),
        ],
    )
    return state
