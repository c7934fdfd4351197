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
        prior = self.prior_info
        for i in range(n):
            row = a[i]
            xi = x[i]
            for j in range(n):
                row[j] = lam * row[j] + xi * x[j]
            row[i] += (1.0 - lam) * prior[i]
        theta = self.theta
        err = y - sum(t * v for t, v in zip(theta, x, strict=True))
        gain = _solve_small(a, x) if n <= 3 else _solve(a, list(x))
        for i in range(n):
            theta[i] += gain[i] * err
        self.updates += 1
        return err


def _diag(values: Sequence[float]) -> list[list[float]]:
    return [
        [float(values[i]) if i == j else 0.0 for j in range(len(values))]
        for i in range(len(values))
    ]


def _solve_small(a: list[list[float]], b: Sequence[float]) -> list[float]:
    """``a·x = b`` by Cramer's rule for n ≤ 3 (the step-time and memory models run this
    every step; a general elimination costs several times more in Python). Falls back to
    :func:`_solve` when ``a`` is (nearly) singular."""
    n = len(b)
    if n == 1:
        d = a[0][0]
        return [b[0] / d] if abs(d) > 1e-300 else [0.0]
    if n == 2:
        (p, q), (r, t) = a
        det = p * t - q * r
        if abs(det) <= 1e-12 * (abs(p * t) + abs(q * r)):
            return _solve(a, list(b))
        return [(b[0] * t - q * b[1]) / det, (p * b[1] - r * b[0]) / det]
    (a00, a01, a02), (a10, a11, a12), (a20, a21, a22) = a
    c00 = a11 * a22 - a12 * a21
    c01 = a12 * a20 - a10 * a22
    c02 = a10 * a21 - a11 * a20
    det = a00 * c00 + a01 * c01 + a02 * c02
    scale = abs(a00 * c00) + abs(a01 * c01) + abs(a02 * c02)
    if abs(det) <= 1e-12 * scale or scale == 0.0:
        return _solve(a, list(b))
    b0, b1, b2 = b
    return [
        (b0 * c00 + b1 * (a02 * a21 - a01 * a22) + b2 * (a01 * a12 - a02 * a11)) / det,
        (b0 * c01 + b1 * (a00 * a22 - a02 * a20) + b2 * (a02 * a10 - a00 * a12)) / det,
        (b0 * c02 + b1 * (a01 * a20 - a00 * a21) + b2 * (a00 * a11 - a01 * a10)) / det,
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
