"""The mailbox between the kernel and the Ray Train workers: one Ray actor (:class:`Hub`)
holding, per training attempt, a command queue per rank and one reply queue.

Why an actor and not a socket back to the kernel: on a remote cluster the workers may
not be able to reach the kernel, while every process of a Ray job can call an actor. The
kernel and the workers exchange the same pickled tuples as the DDP engine
(:mod:`adaptive_nb.engine.ddp.channel`), as bytes.

Attempts: every (re)start of the worker group by Ray Train makes each worker
:meth:`Hub.join` again; the first join of a rank that already joined the current attempt
(or a new world size) opens a new attempt, and messages of an older attempt are dropped,
so a worker of a failed group can never answer for the new one. Commands carry a
sequence number and are delivered in that order whatever order the actor calls run in.

This module does not import ``ray``: the class is made an actor by
:func:`adaptive_nb.engine.ray_train.group.RayGroup` (``ray.remote(Hub)``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["Hub"]

STOP_ALL = b""  # what a worker receives once the hub is closed: leave the loop


class Hub:
    """Asynchronous Ray actor: the commands and replies of the current attempt."""

    def __init__(self) -> None:
        self.attempt = 0
        self.world = 0
        self.joined: dict[int, dict[str, Any]] = {}
        self.inbox: dict[int, asyncio.Queue[bytes]] = {}
        self.replies: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.next_seq = 0
        self.early: dict[int, tuple[list[int] | None, bytes]] = {}
        self.closed = False
        self.changed = asyncio.Event()
        self.replied = asyncio.Event()

    # -- workers ----------------------------------------------------------------------------
    def join(self, rank: int, world_size: int, info: dict[str, Any]) -> int:
        """A worker of the current attempt says who it is; returns the attempt number."""
        if self.attempt == 0 or rank in self.joined or world_size != self.world:
            self.attempt += 1
            self.world = world_size
            self.joined = {}
            self.inbox = {r: asyncio.Queue() for r in range(world_size)}
            self.replies = asyncio.Queue()
            self.next_seq = 0
            self.early = {}
        self.joined[rank] = dict(info)
        self._notify()
        return self.attempt

    async def recv(self, attempt: int, rank: int) -> bytes:
        """The next command for ``rank`` (waits); :data:`STOP_ALL` once closed or stale."""
        if self.closed or attempt != self.attempt:
            return STOP_ALL
        queue = self.inbox[rank]
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if self.closed or attempt != self.attempt:
                    return STOP_ALL

    def reply(self, attempt: int, rank: int, payload: bytes) -> None:
        if attempt == self.attempt:
            self.replies.put_nowait((rank, payload))
            self.replied.set()
            self._notify()

    async def reply_and_recv(self, attempt: int, rank: int, payload: bytes | None) -> bytes:
        """:meth:`reply` (when ``payload`` is not None), then :meth:`recv`: one call per
        step for a worker."""
        if payload is not None:
            self.reply(attempt, rank, payload)
        return await self.recv(attempt, rank)

    # -- kernel -----------------------------------------------------------------------------
    def send(self, attempt: int, seq: int, ranks: list[int] | None, payload: bytes) -> bool:
        """Queue ``payload`` for ``ranks`` (None: all), in sequence order. False when the
        attempt is no longer current (the message is dropped)."""
        if attempt != self.attempt:
            return False
        self.early[seq] = (ranks, payload)
        while self.next_seq in self.early:
            targets, data = self.early.pop(self.next_seq)
            for r in range(self.world) if targets is None else targets:
                self.inbox[r].put_nowait(data)
            self.next_seq += 1
        return True

    def send_many(self, attempt: int, messages: list[tuple[int, list[int] | None, bytes]]) -> None:
        """:meth:`send` of each ``(seq, ranks, payload)``."""
        for seq, ranks, payload in messages:
            self.send(attempt, seq, ranks, payload)

    async def take(
        self,
        attempt: int,
        ranks: list[int],
        timeout: float,
        messages: list[tuple[int, list[int] | None, bytes]] | None = None,
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """:meth:`send_many` of ``messages`` first, then the replies of ``attempt``, once
        one has come from each of ``ranks`` or after ``timeout`` s (then those there are);
        with the current attempt number (a new one: the group was restarted). One call
        per step for the kernel: the step's command and its replies."""
        if messages:
            self.send_many(attempt, messages)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queue = self.replies
        got: list[tuple[int, bytes]] = []
        missing = set(ranks)
        while attempt == self.attempt:
            while not queue.empty():
                rank, data = queue.get_nowait()
                got.append((rank, data))
                missing.discard(rank)
            left = deadline - loop.time()
            if not missing or left <= 0:
                break
            self.replied.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.replied.wait(), timeout=left)
        if attempt != self.attempt:
            return self.attempt, []
        return self.attempt, got

    async def wait_joined(self, after: int, timeout: float) -> tuple[int, int, dict[int, Any]]:
        """Wait until every rank of an attempt newer than ``after`` has joined: returns
        (attempt, world size, info by rank), or the attempt so far on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.attempt > after and len(self.joined) == self.world):
            left = deadline - loop.time()
            if left <= 0:
                break
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(left, 1.0))
        return self.attempt, self.world, dict(self.joined)

    def close(self) -> None:
        """Every worker's next :meth:`recv` returns :data:`STOP_ALL`."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.replied.set()  # a new attempt or the close wakes a waiting take
