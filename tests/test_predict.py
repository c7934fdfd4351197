"""Online models: RLS step time (tracking, identification), memory, Holt, MAPE."""

from __future__ import annotations

import random

import pytest

from adaptive_nb.predict import Holt, MapeTracker, MemoryModel, RegularizedRLS, StepTimeModel


def true_time(b: float, slow: float = 1.0) -> float:
    return (0.008 + b / 513.0) * slow


def test_rls_tracks_a_step_change_within_a_few_observations() -> None:
    rng = random.Random(0)
    m = StepTimeModel()
    for _ in range(30):
        m.update(128, true_time(128) * (1 + 0.03 * rng.gauss(0, 1)))
    assert m.predict(128) == pytest.approx(true_time(128), rel=0.03)
    errors = []
    for _ in range(6):  # another job takes 60 % of the device
        m.update(128, true_time(128, 2.5) * (1 + 0.03 * rng.gauss(0, 1)))
        errors.append(abs(m.predict(128) / true_time(128, 2.5) - 1))
    assert errors[0] > 0.2  # one observation is not yet believed ...
    assert max(errors[2:]) < 0.05  # ... but after three it is tracked
    assert m.changes >= 1


def test_rls_does_not_chase_noise() -> None:
    rng = random.Random(1)
    m = StepTimeModel()
    preds = []
    for i in range(200):
        m.update(128, true_time(128) * (1 + 0.05 * rng.gauss(0, 1)))
        if i > 20:
            preds.append(m.predict(128) / true_time(128))
    assert max(abs(p - 1) for p in preds) < 0.06
    assert m.changes <= 3


def test_rls_identifies_intercept_and_slope_when_batches_vary() -> None:
    rng = random.Random(2)
    m = StepTimeModel()
    for _ in range(80):
        b = rng.choice([64, 96, 128, 160])
        m.update(b, 0.02 + 0.003 * b)
    assert m.alpha == pytest.approx(0.02, rel=0.1)
    assert m.beta == pytest.approx(0.003, rel=0.03)


def test_rls_prior_keeps_unexcited_direction() -> None:
    # Only one batch size seen, then the device slows: the slope carries the change.
    m = StepTimeModel()
    for _ in range(20):
        m.update(100, 0.2)
    for _ in range(6):
        m.update(100, 0.5)
    assert m.predict(50) == pytest.approx(0.25, rel=0.15)


def test_regularized_rls_stays_finite_without_excitation() -> None:
    r = RegularizedRLS([0.0, 0.0], [1e-3, 1e-3], forgetting=0.5)
    for _ in range(10_000):
        r.update([1.0, 1.0], 2.0)
    assert r.predict([1.0, 1.0]) == pytest.approx(2.0)
    assert all(abs(v) < 1e6 for row in r.info for v in row)


def test_memory_model_fit_and_capacity() -> None:
    mem = MemoryModel()
    for b in (100, 120, 140, 100, 130):
        mem.update(b, 2048 + 92 * b, primary=False)
        mem.update(b, 3072 + 92 * b, primary=True)
    for _ in range(30):
        for b in (90, 150):
            mem.update(b, 2048 + 92 * b, primary=False)
            mem.update(b, 3072 + 92 * b, primary=True)
    assert mem.predict(200, primary=False) == pytest.approx(2048 + 92 * 200, rel=0.02)
    assert mem.predict(200, primary=True) == pytest.approx(3072 + 92 * 200, rel=0.02)
    assert mem.max_samples(12288, primary=False) == pytest.approx((12288 - 2048) / 92, abs=3)
    assert mem.max_samples(1000, primary=False) == 0


def test_memory_model_prior_is_safe_for_growth() -> None:
    mem = MemoryModel()
    mem.update(100, 11000, primary=False)
    mem.update(100, 11000, primary=False)
    assert mem.predict(200, primary=False) >= 2048 + 90 * 200  # never under-predicts growth here


def test_holt_follows_a_trend_and_clamps() -> None:
    h = Holt(0.5, 0.3, lo=0.0, hi=1.0)
    for t in range(20):
        h.update(float(t), 0.02 * t)
    assert h.forecast(5.0) == pytest.approx(0.02 * 24, abs=0.02)
    assert h.forecast(1000.0) == 1.0


def test_holt_re_levels_on_a_jump() -> None:
    h = Holt(0.5, 0.3, jump=1024.0)
    for t in range(5):
        h.update(float(t), 0.0)
    h.update(5.0, 8192.0)
    assert h.forecast(0.0) == 8192.0
    assert Holt().forecast(1.0) is None


def test_mape() -> None:
    m = MapeTracker()
    assert m.value_pct() is None
    m.add(1.1, 1.0)
    m.add(0.9, 1.0)
    assert m.value_pct() == pytest.approx(10.0)


def test_rls_closed_form_solve_agrees_with_elimination() -> None:
    from adaptive_nb.predict.rls import _solve, _solve_small

    rng = random.Random(3)
    for n in (1, 2, 3):
        for _ in range(500):
            m = [[rng.gauss(0, 1) for _ in range(n)] for _ in range(n)]
            a2 = [
                [
                    sum(m[k][i] * m[k][j] for k in range(n)) + (1e-3 if i == j else 0.0)
                    for j in range(n)
                ]
                for i in range(n)
            ]
            b = [rng.gauss(0, 1) for _ in range(n)]
            x1, x2 = _solve(a2, list(b)), _solve_small(a2, b)
            scale = max(1.0, *(abs(v) for v in x1))
            assert max(abs(p - q) for p, q in zip(x1, x2, strict=True)) < 1e-8 * scale
    singular = [[1.0, 2.0], [2.0, 4.0]]
    assert _solve_small(singular, [1.0, 2.0]) == _solve(singular, [1.0, 2.0])
