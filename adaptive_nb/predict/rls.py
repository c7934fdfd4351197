"""Recursive least squares with forgetting, kept stable when the data do not excite
every direction (stabilised forgetting: the prior's information is never forgotten)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["RegularizedRLS"]


class RegularizedRLS:
    """Online linear regression ``y ≈ θ·x`` that weights recent data more.

    Information form: ``A ← λA + xxᵀ + (1−λ)A₀``, ``θ ← θ + A⁻¹x(y − θ·x)``. Directions the
    data never vary (a device always given the same batch) keep the prior's shape, so a
    change in ``y`` is attributed the way the prior says, and ``A`` never degenerates.
    ``prior_info`` is the diagonal of ``A₀`` (inverse prior variance in units of the noise).
    """

    def __init__(
        self, theta: Sequence[float], prior_info: Sequence[float], forgetting: float = 0.9
    ) -> None:
        if len(theta) != len(prior_info):
            raise ValueError("theta and prior_info must have the same length")
        if not 0.0 < forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        self.n = len(theta)
        self.theta = [float(v) for v in theta]
        self.prior_info = [float(v) for v in prior_info]
        self.forgetting = float(forgetting)
        self.info = _diag(self.prior_info)
        self.updates = 0

    def predict(self, x: Sequence[float]) -> float:
        return sum(t * v for t, v in zip(self.theta, x, strict=True))

    def reset_info(self) -> None:
        """Forget how sure we are (keep θ): the next observations move θ a lot."""
        self.info = _diag(self.prior_info)

    def update(self, x: Sequence[float], y: float) -> float:
        """Fold in one observation; returns the residual before the update."""
        lam = self.forgetting
        n = self.n
        a = self.info
        for i in range(n):
            row = a[i]
            for j in range(n):
                row[j] = lam * row[j] + x[i] * x[j]
            row[i] += (1.0 - lam) * self.prior_info[i]
        err = y - self.predict(x)
        gain = _solve(a, list(x))
        for i in range(n):
            self.theta[i] += gain[i] * err
        self.updates += 1
        return err


def _diag(values: Sequence[float]) -> list[list[float]]:
    return [
        [float(values[i]) if i == j else 0.0 for j in range(len(values))]
        for i in range(len(values))
    ]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve ``a·x = b`` for a small symmetric positive definite ``a`` (Gauss, pivoting)."""
    n = len(b)
    m = [[*row[:], b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            return [0.0] * n
        m[c], m[p] = m[p], m[c]
        piv = m[c][c]
        for r in range(c + 1, n):
            f = m[r][c] / piv
            if f:
                for k in range(c, n + 1):
                    m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        s = m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))
        x[r] = s / m[r][r]
    return x
