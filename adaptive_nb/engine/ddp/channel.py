"""The messages between the kernel and the ranks (tuples over a
``multiprocessing.connection`` on loopback, authenticated with a per-group secret).

Kernel → rank, in order on every rank (so a plan, a pause or a stop takes effect at the
same step boundary everywhere): ``JOB`` (cloudpickled job), ``PLAN`` (from-step, shares,
micro-batches, caps), ``STEP`` (a :class:`~.data.BatchToken`; optionally the previous
step's update and the :data:`IF_OK` flag), ``APPLY`` (optimizer step, no
reply), ``DISCARD``, ``STATE``, ``LOG``, ``GRADS`` (the step's gradients), ``END`` (drop
the job), ``STOP`` (exit).
Rank → kernel: ``HELLO``, ``OK``, ``DONE`` (step measurements), ``OOM``, ``LOST`` (cannot
continue in step), ``SKIPPED`` (an ``IF_OK`` step not run), ``FAILED`` (an error: type
name, message, traceback text, the pickled exception when it pickles), ``STATE``, ``LOG``.

A step sent ahead (``STEP, token, update, IF_OK``) is the pipeline of the run-ahead engine:
with each step's gradients the ranks all-reduce whether every one of them completed it
(an out-of-memory rank did not; see :mod:`.rank`); an ``IF_OK`` step applies the update
and runs only if they all did, else every rank answers ``SKIPPED`` and keeps its gradients
for the kernel's ``DISCARD``. So the ranks never apply a step that one of them could not
compute.
"""

from __future__ import annotations

import pickle
import socket
from typing import Any

__all__ = ["encode", "get", "no_delay", "put", "try_pickle"]

HELLO = "hello"
OK = "ok"
JOB = "job"
PLAN = "plan"
STEP = "step"
APPLY = "apply"
DISCARD = "discard"
STATE = "state"
LOG = "log"
GRADS = "grads"
END = "end"
STOP = "stop"
DONE = "done"
OOM = "oom"
LOST = "lost"
SKIPPED = "skipped"
FAILED = "failed"

IF_OK = 2  # STEP flag: apply the update and run only if the previous step completed everywhere

REPLIED = frozenset({JOB, STEP, DISCARD, STATE, LOG, GRADS, END})
"""Commands the rank answers (an error from an unanswered command is told with the next)."""


def try_pickle(obj: Any) -> bytes | None:
    """``obj`` pickled, or None when it does not pickle (or would not unpickle)."""
    try:
        data = pickle.dumps(obj)
        pickle.loads(data)
    except Exception:
        return None
    return data


def encode(message: tuple[Any, ...]) -> bytes:
    """A message as sent (the standard pickler: ``Connection.send`` would use torch's
    shared-memory reductions for tensors, which do not cross between unrelated processes)."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def put(conn: Any, message: tuple[Any, ...]) -> None:
    """Send one message (see :func:`encode`)."""
    conn.send_bytes(encode(message))


def get(conn: Any) -> tuple[Any, ...]:
    """Receive one message sent with :func:`put`."""
    message: tuple[Any, ...] = pickle.loads(conn.recv_bytes())
    return message


def no_delay(conn: Any) -> None:
    """Switch Nagle's algorithm off on a connection's socket: an unanswered command (an
    optimizer step) followed by the next step's command would otherwise wait for the
    peer's delayed acknowledgement (40 ms on Linux) on every step."""
    with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
