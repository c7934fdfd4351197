"""Loggers of a run to what people already use: ``log=`` of :func:`~adaptive_nb.train`
(``--log`` of ``%%adaptive_train``).

Specs: ``"tensorboard:DIR"``, ``"mlflow"`` or ``"mlflow:URI"``, ``"csv:PATH"``; a list of
them, or several in one string separated by commas. Everything is checked before the run
starts (a clear :class:`~adaptive_nb.errors.UsageError` for an unknown kind, a directory
that cannot be written, a package that is not installed); writers are created when the
run starts, so bad input creates nothing. A logger that fails while the run trains logs
the error once and stops; training goes on.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from ...errors import UsageError
from .base import MetricLogger, metric_name
from .csv_log import CsvLogger
from .mlflow_log import MlflowLogger
from .tensorboard_log import TensorBoardLogger

__all__ = [
    "CsvLogger",
    "MetricLogger",
    "MlflowLogger",
    "TensorBoardLogger",
    "build_loggers",
    "metric_name",
]

KINDS = ("tensorboard:DIR", "mlflow", "mlflow:URI", "csv:PATH")
_EXTRA = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def build_loggers(log: str | Sequence[str] | None, name: str = "log") -> list[MetricLogger]:
    """The loggers for ``log`` (None or empty: none), checked as described above."""
    if log is None:
        return []
    if isinstance(log, (str, os.PathLike)):
        items = [str(log)]
    elif isinstance(log, Sequence) and all(isinstance(s, str) for s in log):
        items = list(log)
    else:
        raise UsageError(
            f'{name}={log!r}: pass a spec string such as "tensorboard:runs/exp1" or a list '
            f"of them ({', '.join(KINDS)})."
        )
    specs = [s.strip() for item in items for s in item.split(",") if s.strip()]
    return [_build(spec, name) for spec in specs]


def _build(spec: str, name: str) -> MetricLogger:
    kind, _, target = spec.partition(":")
    kind = kind.strip().lower()
    target = target.strip()
    if kind == "tensorboard":
        _need_package("tensorboard", spec, name)
        if not target:
            raise UsageError(
                f"{name} {spec!r}: say where TensorBoard should write, e.g. "
                '"tensorboard:runs/exp1" (then `tensorboard --logdir runs`).'
            )
        path = Path(target).expanduser()
        _check_writable_dir(path, spec, name)
        return TensorBoardLogger(path)
    if kind == "mlflow":
        _need_package("mlflow", spec, name)
        uri = target or None
        if uri is not None and uri.startswith("file:"):
            _check_writable_dir(_file_uri_path(uri), spec, name)
            _check_file_store_allowed(spec, name)
        _check_database_driver(uri, spec, name)
        return MlflowLogger(uri)
    if kind == "csv":
        if not target:
            raise UsageError(f'{name} {spec!r}: name the file, e.g. "csv:runs/exp1.csv".')
        path = Path(target).expanduser()
        if path.is_dir():
            raise UsageError(
                f"{name} {spec!r}: {path} is a directory; name a file in it, e.g. "
                f'"csv:{path / "run.csv"}".'
            )
        _check_writable_dir(path.parent, spec, name)
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"{name} {spec!r}: {path} exists and cannot be written.")
        return CsvLogger(path)
    raise UsageError(
        f"{name} {spec!r}: unknown logger {kind!r}; use one of {', '.join(KINDS)} "
        "(several separated by commas)."
    )


def _need_package(module: str, spec: str, name: str) -> None:
    if importlib.util.find_spec(module) is None:
        extra = _EXTRA[module]
        raise UsageError(
            f"{name} {spec!r} needs the `{module}` package, which is not installed: "
            f'pip install "adaptive_nb[{extra}]"'
        )


def _check_file_store_allowed(spec: str, name: str) -> None:
    """MLflow 3 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set: say so now
    rather than have the logger fail when the run starts."""
    from mlflow import environment_variables

    allowed = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
    if allowed is not None and not allowed.get():
        raise UsageError(
            f"{name} {spec!r}: this MLflow refuses file stores unless the environment "
            "variable MLFLOW_ALLOW_FILE_STORE=true is set (os.environ[...] before the run), "
            "or log to a database or server URI instead (mlflow:sqlite:///mlflow.db, "
            "mlflow:http://host:5000)."
        )


_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


def _check_database_driver(uri: str | None, spec: str, name: str) -> None:
    """A database tracking store (MLflow 3's default is ``sqlite:///mlflow.db``) needs
    SQLAlchemy, which ``mlflow-skinny`` does not install."""
    if uri is None:
        import mlflow

        uri = str(mlflow.get_tracking_uri())
    scheme = uri.partition(":")[0].partition("+")[0].lower()
    if scheme in _DATABASES and importlib.util.find_spec("sqlalchemy") is None:
        raise UsageError(
            f"{name} {spec!r}: the MLflow tracking store {uri} is a database, which needs "
            "SQLAlchemy (pip install sqlalchemy, or the full `mlflow` package); or log to a "
            "server: mlflow:http://host:5000."
        )


def _file_uri_path(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path))


def _check_writable_dir(path: Path, spec: str, name: str) -> None:
    """``path`` is (or can be created as) a directory we may write in."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{name} {spec!r}: {probe} is a file, so {path} cannot be a directory.")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (where {path} would be created)"
        raise UsageError(
            f"{name} {spec!r}: directory {probe}{where} is not writable; choose a directory "
            "you can write to."
        )
