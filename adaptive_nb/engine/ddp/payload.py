"""The job shipped to every rank, serialised with ``cloudpickle`` (functions and classes
defined in a notebook travel by value), and the search that names what cannot be
shipped when serialisation fails (an open file, a lock, a socket...), with a fix.

Tensors on a GPU (a notebook model already moved to ``cuda:0``, its optimizer state) are
written as CPU tensors: unpickled as they are, every rank would create a CUDA context on
the kernel's GPU and put a copy of the model there before moving it to its own device.
Identity is kept (the optimizer still refers to the model's parameters)."""

from __future__ import annotations

import io
import pickle
import threading
import types
from collections.abc import Iterator
from typing import Any

import cloudpickle
import torch

from ...errors import UsageError

__all__ = ["dumps_host", "dumps_job", "find_unpicklable"]

_HINTS: dict[str, str] = {
    "TextIOWrapper": "open the file inside the step (or pass its path) instead of an open file",
    "BufferedWriter": "open the file inside the step (or pass its path) instead of an open file",
    "BufferedReader": "open the file inside the step (or pass its path) instead of an open file",
    "lock": "a lock cannot cross processes: create it inside the step, or drop it",
    "RLock": "a lock cannot cross processes: create it inside the step, or drop it",
    "socket": "open the connection inside the step instead",
    "generator": "pass a list (or a DataLoader) instead of a generator",
}


def _picklable(obj: Any) -> bool:
    try:
        cloudpickle.dumps(obj)
    except Exception:
        return False
    return True


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    """Named parts of ``obj`` that pickling it would also pickle (a best-effort walk)."""
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        for name, cell in zip(code.co_freevars, obj.__closure__ or (), strict=False):
            try:
                yield f"captured variable `{name}`", cell.cell_contents
            except ValueError:
                continue
        for name in code.co_names:
            if name in obj.__globals__:
                yield f"global `{name}`", obj.__globals__[name]
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"[{k!r}]", v
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield f"[{i}]", v
        return
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        for k, v in state.items():
            if isinstance(v, dict) and k in {"_modules", "_parameters", "_buffers"}:
                for sub, value in v.items():
                    yield f".{sub}", value
            else:
                yield f".{k}", v


def find_unpicklable(obj: Any, name: str, depth: int = 6) -> str | None:
    """A path to the innermost part of ``obj`` that cannot be pickled, e.g.
    ``"step → global `log` (an open file: TextIOWrapper)"``; None if all of it pickles."""
    if _picklable(obj):
        return None
    path = [name]
    seen: set[int] = set()
    current = obj
    for _ in range(depth):
        seen.add(id(current))
        for label, child in _children(current):
            if id(child) in seen or _picklable(child):
                continue
            path.append(label)
            current = child
            break
        else:
            break
    return f"{' → '.join(path)} ({_describe(current)})"


def _describe(obj: Any) -> str:
    kind = type(obj).__name__
    if isinstance(obj, io.IOBase):
        return f"an open file: {kind}"
    if isinstance(obj, type(threading.Lock())):
        return f"a lock: {kind}"
    return f"a {kind}"


def _hint(description: str) -> str:
    for key, hint in _HINTS.items():
        if key in description:
            return hint
    return "create that object inside the step, or leave it out of what the step uses"


class _HostPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, writing every tensor that lives on an accelerator as a CPU tensor."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type not in ("cpu", "meta"):
            if isinstance(obj, torch.nn.Parameter):
                rebuild, args = obj.__reduce_ex__(self.proto)[:2]  # type: ignore[no-untyped-call]
                return (rebuild, (args[0].detach().to("cpu"), *args[1:]))
            host = obj.detach().to("cpu").requires_grad_(obj.requires_grad)
            return host.__reduce_ex__(self.proto)  # type: ignore[no-untyped-call]
        return super().reducer_override(obj)


def dumps_host(obj: Any) -> bytes:
    """``obj`` cloudpickled, accelerator tensors written as CPU tensors."""
    with io.BytesIO() as buffer:
        _HostPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return buffer.getvalue()


def dumps_job(job: dict[str, Any]) -> bytes:
    """The job as bytes for the ranks, or a :class:`UsageError` naming what cannot be
    shipped (``job``'s keys are the user's names: ``step``, ``model``, ``optimizer``...)."""
    try:
        return dumps_host(job)
    except Exception as exc:
        for key, value in job.items():
            where = find_unpicklable(value, f"`{key}`")
            if where is not None:
                raise UsageError(
                    f"cannot send {where} to the DDP worker processes: it cannot be pickled "
                    f"({type(exc).__name__}: {exc}). Fix: {_hint(where)}."
                ) from None
        raise UsageError(
            f"cannot send the job to the DDP worker processes: {type(exc).__name__}: {exc}"
        ) from None
