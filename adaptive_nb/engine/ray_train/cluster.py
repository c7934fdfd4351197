"""Connecting to Ray: a local Ray started for the run, or an existing cluster.

A local Ray started here listens on the loopback interface only (Ray's own switch for
that, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which makes every Ray process take
``127.0.0.1`` as the node address), without the dashboard, and with Ray's token
authentication on: that is Ray 2.60's default for a new local cluster (``ray.init``
generates ``~/.ray/auth_token`` when missing); ``RAY_AUTH_MODE=disabled`` in the
environment would switch it off, so it is refused here rather than obeyed. An existing
cluster (``ray_address``) is joined in token mode (``RAY_AUTH_MODE=token`` is set when
unset: Ray turns it on by itself only for a cluster it finds locally) with the token Ray
finds in the environment (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``): authentication is never disabled for it either.

A Ray the notebook has already connected to (``ray.is_initialized()``) is used as it is
and left running.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ...errors import UsageError

__all__ = ["RayConnection", "check_auth_mode"]

_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def check_auth_mode(address: str | None) -> None:
    """Refuse an environment that would run Ray without token authentication."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        where = f"the Ray cluster at {address}" if address else "the local Ray"
        raise UsageError(
            f"RAY_AUTH_MODE={mode} is set in this environment: adaptive_nb does not start or "
            f"join {where} without token authentication. Unset RAY_AUTH_MODE (or set it to "
            "'token'); for a remote cluster put its token in RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH."
        )


@contextmanager
def _local_start_env() -> Iterator[None]:
    """While the local Ray starts (the Ray processes inherit this environment): the node
    address is 127.0.0.1, and the workers get the kernel's ``sys.path`` (as DDP ranks do),
    so what the step imports from the notebook's directory imports there too."""
    from ray._private import ray_constants

    paths = [p or os.getcwd() for p in sys.path]
    old = {k: os.environ.get(k) for k in (_LOOPBACK_SWITCH, "PYTHONPATH")}
    old_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_SWITCH] = "0"
    extra = [old["PYTHONPATH"]] if old["PYTHONPATH"] else []
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*paths, *extra]))
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RayConnection:
    """Ray for one run: :meth:`open` connects (or starts), :meth:`close` shuts down only
    what :meth:`open` started."""

    def __init__(self, address: str | None, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.started_here = False

    def open(self) -> None:
        import ray

        if ray.is_initialized():
            return
        check_auth_mode(self.address)
        if self.address:
            # Ray enables token mode by itself only for a cluster it finds locally; for an
            # explicit address it must be asked to (the token: RAY_AUTH_TOKEN,
            # RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            ray.init(address=self.address, log_to_driver=False)
            return
        with _local_start_env():
            ray.init(
                num_cpus=self.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        self.started_here = True

    def close(self) -> None:
        if self.started_here:
            import ray

            ray.shutdown()
            self.started_here = False
