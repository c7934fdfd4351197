"""Errors adaptive_nb raises for the user's mistakes.

Core code raises :class:`UsageError` before anything runs; the Jupyter front-end shows it
as a short message without a traceback.
"""

from __future__ import annotations

__all__ = ["LossError", "UsageError"]


class UsageError(ValueError):
    """The user asked for something adaptive_nb cannot do; nothing was changed."""


class LossError(UsageError):
    """The step body produced no usable loss; the step was not applied."""
