"""Simulated-fleet benchmark: the adaptive controller against the static equal split and
an oracle, in virtual time. Run ``python -m adaptive_nb.bench SCENARIO.json --json``."""

from __future__ import annotations

from .oracle import OraclePlan, oracle_plan
from .runner import PolicyResult, compare, run_oracle, run_policy

__all__ = ["OraclePlan", "PolicyResult", "compare", "oracle_plan", "run_oracle", "run_policy"]
