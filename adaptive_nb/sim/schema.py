"""The scenario file's JSON Schema, and the checks a schema cannot express.

Why a schema library (``jsonschema``) rather than the hand-written walker it replaces: the
shape of a scenario (types, ranges, required and unknown fields) is declared once, as data
that grows by one line per field, and every violation comes with the path of the value
and the value itself, which is all a good message needs. What a schema cannot say
clearly (a curve's order, a device index in range, ``until_s`` after ``at_s``, ``curve``
versus ``samples_per_s``) is checked in :func:`check_semantics`, in plain code, with the
same message format: ``scenario FILE: `devices[2].curve[1]` ..., got VALUE.``
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jsonschema

from ..errors import UsageError

__all__ = ["SCHEMA", "check_semantics", "check_shape", "field_path"]

_NUM = {"type": "number"}
_NONNEG = {"type": "number", "minimum": 0}
_POS = {"type": "number", "exclusiveMinimum": 0}

_CURVE_POINT = {
    "type": "array",
    "minItems": 2,
    "maxItems": 2,
    "prefixItems": [
        {"type": "number", "minimum": 1},  # per-device batch b
        {"type": "number", "exclusiveMinimum": 0},  # idle compute ms (forward + backward)
    ],
}

_DEVICE = {
    "type": "object",
    "required": ["name", "memory_gb"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "pattern": r"\S"},
        "memory_gb": _POS,
        "samples_per_s": _POS,
        "alpha_ms": _NONNEG,
        "curve": {"type": "array", "minItems": 2, "items": _CURVE_POINT},
        "forward_fraction": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    },
}

_EVENT = {
    "type": "object",
    "required": ["at_s", "device"],
    "additionalProperties": False,
    "properties": {
        "at_s": _NONNEG,
        "until_s": {"type": ["number", "null"], "minimum": 0},
        "device": {"type": "integer", "minimum": 0},
        "external_util": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "external_mem_gb": _NONNEG,
        "slowdown": {"type": "number", "minimum": 1},
        "fail": {"type": "boolean"},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["name", "global_batch", "steps", "devices", "job"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "pattern": r"\S"},
        "description": {"type": "string"},
        "global_batch": {"type": "integer", "minimum": 1},
        "steps": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer", "minimum": 0},
        "noise": {"type": "number", "minimum": 0, "maximum": 0.5},
        "monitor_lag_s": _NONNEG,
        "devices": {"type": "array", "minItems": 1, "items": _DEVICE},
        "job": {
            "type": "object",
            "required": ["mem_base_gb", "mem_per_sample_gb"],
            "additionalProperties": False,
            "properties": {"mem_base_gb": _NONNEG, "mem_per_sample_gb": _NONNEG},
        },
        "comm": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"alpha_ms": _NONNEG, "per_device_ms": _NONNEG},
        },
        "primary_extra_ms": _NONNEG,
        "primary_extra_gb": _NONNEG,
        "events": {"type": "array", "items": _EVENT},
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

_TYPE_WORDS = {
    "number": "a number",
    "integer": "a whole number",
    "string": "a string",
    "array": "a list",
    "object": "an object",
    "boolean": "true or false",
}


def field_path(parts: Iterable[Any]) -> str:
    """``["devices", 2, "curve", 1]`` → ``devices[2].curve[1]`` (``scenario`` for the root)."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "scenario"


def _fail(where: str, field: str, what: str, got: Any) -> UsageError:
    return UsageError(f"scenario {where}: `{field}` {what}, got {got!r}.")


def _message(err: Any, where: str) -> UsageError:
    """A :class:`UsageError` in the project's words for one schema violation."""
    path = list(err.absolute_path)
    field = field_path(path)
    kind, arg, got = err.validator, err.validator_value, err.instance
    if kind == "additionalProperties":
        known = sorted(err.schema.get("properties", {}))
        extra = sorted(set(got) - set(known))[0]
        return UsageError(
            f"scenario {where}: unknown field `{field}.{extra}` (known: {', '.join(known)})."
        )
    if kind == "required":
        missing = next(k for k in arg if k not in got)
        name = missing if not path else f"{field}.{missing}"
        return UsageError(f"scenario {where}: missing `{name}`.")
    if kind == "type":
        types = [arg] if isinstance(arg, str) else list(arg)
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in types if t != "null")
        return _fail(where, field, f"must be {words}", got)
    bounds = {
        "minimum": ">=",
        "exclusiveMinimum": ">",
        "maximum": "<=",
        "exclusiveMaximum": "<",
    }
    if kind in bounds:
        return _fail(where, field, f"must be {bounds[kind]} {arg}", got)
    if kind in ("minLength", "pattern"):
        return _fail(where, field, "must be a non-empty string", got)
    if kind == "minItems":
        what = "a non-empty list" if arg == 1 else f"a list of at least {arg} entries"
        if path and path[-1] == "curve":
            what = f"a list of at least {arg} [batch, ms] points"
        return _fail(where, field, f"must be {what}", got)
    if kind in ("maxItems", "prefixItems"):
        return _fail(where, field, "must be a [batch, ms] pair", got)
    return _fail(where, field, err.message, got)  # pragma: no cover - every keyword above


def _non_finite(data: Any, path: list[Any]) -> list[Any] | None:
    if isinstance(data, float) and not math.isfinite(data):
        return path
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    for key, value in items:
        found = _non_finite(value, [*path, key])
        if found is not None:
            return found
    return None


def check_shape(data: Any, where: str) -> None:
    """Types, ranges, required and unknown fields (the first violation, in file order)."""
    bad = _non_finite(data, [])
    if bad is not None:  # Python's JSON reader accepts NaN and Infinity; a scenario may not
        value = data
        for key in bad:
            value = value[key]
        raise _fail(where, field_path(bad), "must be a finite number", value)
    errors = list(_VALIDATOR.iter_errors(data))
    if errors:
        first = min(errors, key=lambda e: (_order(data, list(e.absolute_path)), e.validator))
        raise _message(first, where)


def _order(data: Any, path: list[Any]) -> tuple[int, ...]:
    """Position of a path in file order (dict keys by insertion, lists by index)."""
    out: list[int] = []
    node = data
    for key in path:
        if isinstance(node, dict):
            out.append(list(node).index(key) if key in node else 0)
        else:
            out.append(int(key))
        node = node[key] if isinstance(node, (dict, list)) else None
    return tuple(out)


def check_semantics(data: dict[str, Any], where: str) -> None:
    """What the schema cannot say: curve order, ``curve`` xor ``samples_per_s``, device
    indices, ``until_s`` after ``at_s``, failure events without load fields, events that
    change nothing."""
    devices = data["devices"]
    for i, d in enumerate(devices):
        field = f"devices[{i}]"
        if "curve" in d:
            for key in ("samples_per_s", "alpha_ms"):
                if key in d:
                    raise _fail(
                        where,
                        f"{field}.{key}",
                        "cannot be given with `curve` (give either a curve or "
                        "samples_per_s/alpha_ms)",
                        d[key],
                    )
            pts = d["curve"]
            for j in range(1, len(pts)):
                (b0, ms0), (b1, ms1) = pts[j - 1], pts[j]
                if b1 <= b0:
                    raise _fail(
                        where, f"{field}.curve[{j}]", f"batch must be > the previous ({b0})", pts[j]
                    )
                if ms1 < ms0:
                    raise _fail(
                        where,
                        f"{field}.curve[{j}]",
                        f"ms must be >= the previous ({ms0}): bigger batches cannot be faster",
                        pts[j],
                    )
        elif "samples_per_s" not in d:
            raise UsageError(
                f"scenario {where}: missing `{field}.samples_per_s` (or give `{field}.curve`)."
            )
    for i, e in enumerate(data.get("events", [])):
        field = f"events[{i}]"
        if e["device"] >= len(devices):
            raise _fail(
                where,
                f"{field}.device",
                f"must name one of the {len(devices)} devices",
                e["device"],
            )
        if e.get("fail", False):
            extra = sorted(set(e) - {"at_s", "device", "fail"})
            if extra:
                raise _fail(
                    where, f"{field}.{extra[0]}", "does not apply to a failure event", e[extra[0]]
                )
            continue
        until = e.get("until_s")
        if until is not None and until <= e["at_s"]:
            raise _fail(where, f"{field}.until_s", f"must be after at_s ({e['at_s']})", until)
        if (
            e.get("external_util", 0) == 0
            and e.get("external_mem_gb", 0) == 0
            and e.get("slowdown", 1) == 1
        ):
            raise UsageError(
                f"scenario {where}: `{field}` changes nothing: give external_util, "
                "external_mem_gb, slowdown or fail: true."
            )
