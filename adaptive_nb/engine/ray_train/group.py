"""The kernel's side of the Ray Train workers: a :class:`RayGroup` starts a
``TorchTrainer`` whose ``fit()`` runs on a background thread of the kernel (it blocks
until training ends), and talks to the workers through the :class:`~.hub.Hub` actor in
the shape of the DDP engine's :class:`~adaptive_nb.engine.ddp.WorkerGroup` (``start``,
``send``, ``send_all``, ``gather``, ``stop``, ``kill``), with the DDP messages.

A restart of the worker group by Ray Train (a worker died and ``FailureConfig``
allows another attempt, or an elastic resize) shows up here as a new attempt in the hub:
:meth:`gather` then raises :class:`GroupRestarted`, and the engine brings the new
workers to the last applied step (:mod:`.engine`).
"""

from __future__ import annotations

import pickle
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from ...errors import UsageError
from ..ddp import channel as ch
from ..ddp.errors import DDPStartError, WorkerLost
from .hub import Hub
from .worker import train_loop

__all__ = ["GroupRestarted", "RayGroup"]

# What gloo/nccl say on a worker whose peer died (Ray Train then restarts the group).
_PEER_GONE = re.compile(r"Connection (reset|closed) by peer|Broken pipe|NCCL.*remote", re.I)


class GroupRestarted(Exception):
    """Ray Train started a new worker group (attempt ``attempt``, ``world_size`` workers)."""

    def __init__(self, attempt: int, world_size: int, reason: str) -> None:
        super().__init__(reason)
        self.attempt = attempt
        self.world_size = world_size
        self.reason = reason


class RayGroup:
    """``TorchTrainer`` workers (``min_workers``..``max_workers``; equal: a fixed count)."""

    def __init__(
        self,
        min_workers: int,
        max_workers: int,
        *,
        gpus_per_worker: float = 0.0,
        cpus_per_worker: float = 1.0,
        threads: int | None = None,
        max_failures: int = 3,
        storage_path: str | None = None,
        start_timeout_s: float = 300.0,
        restart_timeout_s: float = 300.0,
        resize_interval_s: float = 60.0,
    ) -> None:
        if not 1 <= min_workers <= max_workers:
            raise UsageError(
                f"workers must satisfy 1 ≤ MIN ≤ MAX, got {min_workers}:{max_workers}."
            )
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.world_size = max_workers  # device positions; the attempt may have fewer
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.threads = threads
        self.max_failures = max_failures
        self.storage_path = storage_path
        self.start_timeout_s = start_timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.resize_interval_s = resize_interval_s
        self.hub: Any = None
        self.run_name = f"adaptive_nb_{int(time.time() * 1000)}"
        self.attempt = 0
        self.current_world = 0  # workers in the current attempt
        self.infos: dict[int, dict[str, Any]] = {}
        self.started = False
        self.fit_error: BaseException | None = None
        self.fit_result: Any = None
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._outbox: list[tuple[int, list[int] | None, bytes]] = []
        self._pending: dict[int, deque[tuple[Any, ...]]] = {}

    # -- start ------------------------------------------------------------------------------
    def _trainer(self) -> Any:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        use_gpu = self.gpus_per_worker > 0
        resources = {"CPU": self.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = self.gpus_per_worker
        elastic = self.min_workers != self.max_workers
        # Ray Train V2's ScalingConfig (the default in Ray 2.60; checked up front)
        scaling = ScalingConfig(  # type: ignore[call-arg]
            num_workers=(self.min_workers, self.max_workers) if elastic else self.max_workers,  # type: ignore[arg-type]
            use_gpu=use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=self.resize_interval_s,
        )
        self.hub = ray.remote(Hub).options(num_cpus=0, max_concurrency=1000).remote()
        run = RunConfig(
            name=self.run_name,
            storage_path=self.storage_path,
            failure_config=FailureConfig(max_failures=self.max_failures),
            # the latest and the one before (a restart right after a report may still
            # start from the one before: Ray Train registers a report at its next poll)
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        )
        return TorchTrainer(
            train_loop,
            train_loop_config={"hub": self.hub, "threads": self.threads},
            scaling_config=scaling,
            run_config=run,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        )

    def start(self) -> RayGroup:
        """Start ``fit()`` on a background thread; wait until every worker has joined."""
        if self.started:
            return self
        trainer = self._trainer()

        def fit() -> None:
            try:
                self.fit_result = trainer.fit()
            except BaseException as exc:  # reported by gather / start
                self.fit_error = exc

        self._thread = threading.Thread(target=fit, name="adaptive_nb-ray-fit", daemon=True)
        self._thread.start()
        try:
            self._wait_attempt(0, self.start_timeout_s, "starting the Ray Train workers")
        except WorkerLost as exc:
            self.kill()
            raise DDPStartError(str(exc)) from None
        except BaseException:
            self.kill()
            raise
        self.started = True
        return self

    def _wait_attempt(self, after: int, timeout: float, what: str) -> None:
        """Wait for every worker of an attempt newer than ``after`` to join."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_fit_ended(what)
            attempt, world, infos = ray.get(self.hub.wait_joined.remote(after, 1.0))
            if attempt > after and len(infos) == world:
                self.attempt, self.current_world = attempt, world
                self.infos = {int(r): i for r, i in infos.items()}
                self._pending = {r: deque() for r in range(world)}
                self._seq = 0
                self._outbox = []  # meant for the group that is gone
                return
            if time.monotonic() > deadline:
                raise WorkerLost(
                    f"the Ray Train workers did not all join within {timeout} s ({what})", device=0
                )

    def _raise_if_fit_ended(self, what: str) -> None:
        if self._thread is not None and not self._thread.is_alive():
            err = self.fit_error
            detail = f"{type(err).__name__}: {err}" if err is not None else "it returned"
            raise WorkerLost(f"Ray Train's fit() ended during {what} ({detail})", device=0)

    # -- talk -------------------------------------------------------------------------------
    def _post(self, ranks: list[int] | None, message: tuple[Any, ...]) -> None:
        """Queue ``message``: it leaves with the next :meth:`gather` (one hub call for a
        command and its replies) or :meth:`flush`."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._outbox.append((self._seq, ranks, data))
        self._seq += 1

    def flush(self) -> None:
        """Send the queued messages now (nothing waits for replies)."""
        out, self._outbox = self._outbox, []
        if out and self.hub is not None:
            self.hub.send_many.remote(self.attempt, out)

    def send(self, rank: int, message: tuple[Any, ...]) -> None:
        if rank >= self.current_world:
            raise WorkerLost(f"worker {rank} is not part of the current group", device=rank)
        self._post([rank], message)

    def send_all(self, message: tuple[Any, ...]) -> None:
        self._post(None, message)

    def gather(
        self,
        ranks: Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        what: str = "a reply",
        stop_on: frozenset[str] = frozenset({ch.FAILED, ch.LOST}),
    ) -> dict[int, tuple[Any, ...]]:
        """One reply from each of ``ranks`` (default: every worker of the attempt).
        :class:`GroupRestarted` when Ray Train restarted the group meanwhile (a worker's
        collective failing because its peer died is the first sign, usually);
        :class:`WorkerLost` when ``fit()`` ended or on ``timeout``."""
        import ray

        want = list(range(self.current_world)) if ranks is None else list(ranks)
        replies: dict[int, tuple[Any, ...]] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        peer_gone: str | None = None
        while True:
            for r in want:
                if r not in replies and self._pending.get(r):
                    reply = self._pending[r].popleft()
                    if reply[0] == ch.FAILED and _PEER_GONE.search(str(reply[3])):
                        first = str(reply[3]).splitlines()[0]
                        peer_gone = peer_gone or f"worker {r} lost a peer: {first[:160]}"
                        continue
                    replies[r] = reply
                    if reply[0] in stop_on:
                        return replies
            if len(replies) == len(want):
                return replies
            wait = 0.5 if peer_gone is None else 1.0
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    if peer_gone is not None:
                        raise WorkerLost(
                            f"a worker's peer died ({peer_gone}) and Ray Train did not "
                            "restart the group",
                            device=0,
                        )
                    raise WorkerLost(
                        f"workers {sorted(set(want) - set(replies))} sent no reply within "
                        f"{timeout} s ({what})",
                        device=min(set(want) - set(replies)),
                    )
                wait = min(wait, left)
            missing = [r for r in want if r not in replies and not self._pending.get(r)]
            out, self._outbox = self._outbox, []
            attempt, got = ray.get(self.hub.take.remote(self.attempt, missing, wait, out))
            if attempt != self.attempt:
                self._restarted(peer_gone or f"Ray Train restarted the workers during {what}")
            for r, data in got:
                self._pending.setdefault(r, deque()).append(pickle.loads(data))
            if not got:
                self._raise_if_fit_ended(what)
                if peer_gone is not None and deadline is None:
                    deadline = time.monotonic() + self.restart_timeout_s

    def _restarted(self, reason: str) -> None:
        """Wait for the new group, then raise :class:`GroupRestarted`."""
        self._wait_attempt(self.attempt, self.restart_timeout_s, "restarting the workers")
        raise GroupRestarted(self.attempt, self.current_world, reason)

    # -- end --------------------------------------------------------------------------------
    def stop(self, timeout: float = 60.0) -> None:
        """End the workers' loops (``fit()`` returns), then wait for ``fit()``."""
        if self.hub is not None:
            try:
                import ray

                self.flush()
                ray.get(self.hub.close.remote(), timeout=10)
            except Exception:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        if self.hub is not None and (self._thread is None or not self._thread.is_alive()):
            try:
                import ray

                ray.kill(self.hub)
            except Exception:
                pass
            self.hub = None
        self.started = False

    def kill(self) -> None:
        self.stop(timeout=60.0)
