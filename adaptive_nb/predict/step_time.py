"""Per-device step-time model ``t(b) = α + β·b``, fitted online."""

from __future__ import annotations

from .rls import RegularizedRLS

__all__ = ["StepTimeModel"]


class StepTimeModel:
    """Compute time of one device for a chunk of ``b`` samples.

    Fitted by :class:`RegularizedRLS` in units of the first observation (so the prior
    means the same thing for any model and GPU). The prior says most of the time is
    per-sample (``α`` ≈ 5 % of the first step) until different batch sizes tell otherwise.
    A run of large same-sign residuals (the device got busier or freer) resets the
    confidence, so a step change is tracked within a few observations.
    """

    def __init__(
        self,
        forgetting: float = 0.9,
        change_threshold: float = 0.2,
        change_run: int = 2,
        noise: float = 0.05,
        alpha_prior_std: float = 0.3,
    ) -> None:
        self.forgetting = forgetting
        self.change_threshold = change_threshold
        self.change_run = change_run
        self._prior = [noise**2 / alpha_prior_std**2, noise**2]
        self._rls: RegularizedRLS | None = None
        self._t_ref = 1.0
        self._b_ref = 1.0
        self._run = 0
        self._run_sign = 0
        self.changes = 0  # step changes detected

    @property
    def ready(self) -> bool:
        return self._rls is not None

    @property
    def observations(self) -> int:
        return 0 if self._rls is None else self._rls.updates + 1

    def update(self, b: float, t: float) -> None:
        """One measurement: ``t`` seconds for ``b`` samples (b > 0, t > 0)."""
        if b <= 0 or t <= 0:
            return
        if self._rls is None:
            self._t_ref, self._b_ref = t, b
            self._rls = RegularizedRLS([0.05, 0.95], self._prior, self.forgetting)
            return
        pred = self.predict(b)
        rel = (t - pred) / max(pred, 1e-12)
        sign = 1 if rel > 0 else -1
        if abs(rel) > self.change_threshold:
            self._run = self._run + 1 if sign == self._run_sign else 1
            self._run_sign = sign
            if self._run >= self.change_run:  # a new regime: restart from the prior shape
                y, x = t / self._t_ref, b / self._b_ref
                self._rls.theta = [0.05 * y, 0.95 * y / x]
                self._rls.reset_info()
                self.changes += 1
                self._run = 0
                return
        else:
            self._run = 0
        self._rls.update([1.0, b / self._b_ref], t / self._t_ref)
        self._project(b / self._b_ref)

    def _project(self, x: float) -> None:
        """Keep α ≥ 0 and β ≥ a floor, preserving the prediction at the latest batch."""
        assert self._rls is not None
        a, b = self._rls.theta
        y = a + b * x
        b_min = 0.02
        if y <= 0:
            return
        if b < b_min:
            b = b_min
            a = y - b * x
        if a < 0:
            a, b = 0.0, y / x
        self._rls.theta = [a, b]

    @property
    def alpha(self) -> float:
        """Fixed seconds per step (≥ 0)."""
        if self._rls is None:
            return 0.0
        return max(0.0, self._rls.theta[0] * self._t_ref)

    @property
    def beta(self) -> float:
        """Seconds per sample (> 0)."""
        if self._rls is None:
            return 0.0
        return max(self._rls.theta[1], 1e-6) * self._t_ref / self._b_ref

    def predict(self, b: float) -> float:
        if self._rls is None:
            return 0.0
        return self.alpha + self.beta * b
