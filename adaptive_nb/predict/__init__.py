"""Online models of a run's demand: step time and memory per device, forecasts of
external load, prediction error."""

from __future__ import annotations

from .error import MapeTracker
from .forecast import Holt
from .memory import MemoryModel
from .rls import RegularizedRLS
from .step_time import StepTimeModel

__all__ = ["Holt", "MapeTracker", "MemoryModel", "RegularizedRLS", "StepTimeModel"]
