"""Composite score and fractional Kelly: values, edge cases, and the NumPy-only import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cryptoml.errors import DataValidationError
from cryptoml.models.scoring import composite_score, kelly_fraction


def test_kelly_textbook_value() -> None:
    # p = 0.6, even odds: f* = 0.6 - 0.4 = 0.2; a quarter Kelly is 0.05.
    assert kelly_fraction(0.6, 1.0, 1.0, fraction=0.25, cap=1.0) == pytest.approx(0.05)
    # b = 2: f* = (0.5 * 2 - 0.5) / 2 = 0.25
    assert kelly_fraction(0.5, 0.4, 0.2, fraction=1.0, cap=1.0) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("p", "win", "loss", "expected"),
    [
        (0.0, 1.0, 1.0, 0.0),  # p = 0: f* = -1/b, clipped to 0
        (1.0, 1.0, 1.0, 0.5),  # p = 1: f* = 1 -> fraction (below the cap)
        (0.3, 1.0, 1.0, 0.0),  # negative edge -> no bet
        (0.5, 1.0, 0.0, 0.25),  # no loss: b = inf, f* = p
        (0.0, 1.0, 0.0, 0.0),  # no loss but never wins
        (0.9, 0.0, 1.0, 0.0),  # nothing to win
        (0.9, 0.0, 0.0, 0.0),  # nothing to win or lose
    ],
)
def test_kelly_edge_cases(p: float, win: float, loss: float, expected: float) -> None:
    assert kelly_fraction(p, win, loss, fraction=0.5, cap=0.9) == pytest.approx(expected)


def test_kelly_cap_and_broadcasting() -> None:
    assert kelly_fraction(1.0, 1.0, 1.0, fraction=1.0, cap=0.2) == pytest.approx(0.2)
    sizes = kelly_fraction(np.array([0.0, 0.6, 0.99]), 1.0, 1.0, fraction=0.25, cap=0.2)
    assert isinstance(sizes, np.ndarray)
    np.testing.assert_allclose(sizes, [0.0, 0.05, 0.2])
    assert isinstance(kelly_fraction(0.6, 1.0, 1.0), float)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1.2, 1.0, 1.0), {}, "p must"),
        ((np.nan, 1.0, 1.0), {}, "p must"),
        ((0.5, -1.0, 1.0), {}, "win_pct"),
        ((0.5, 1.0, np.inf), {}, "loss_pct"),
        ((0.5, 1.0, 1.0), {"fraction": 0.0}, "fraction"),
        ((0.5, 1.0, 1.0), {"cap": 1.5}, "cap"),
    ],
)
def test_kelly_rejects_bad_inputs(args: tuple[float, ...], kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(DataValidationError, match=match):
        kelly_fraction(*args, **kwargs)


def test_composite_reduces_to_profit_for_a_sure_one_day_hold() -> None:
    assert composite_score(0.8, 1.0, 24.0) == pytest.approx(0.8)
    assert composite_score(0.8, 0.5, 96.0) == pytest.approx(0.8 * 0.5 / 2.0)  # sqrt(4 days) = 2
    assert composite_score(0.8, 0.5, 24.0, success_weight=0.0) == pytest.approx(0.8)
    assert composite_score(-0.4, 0.25, 24.0) == pytest.approx(-0.4 * 1.75)
    assert composite_score(0.8, 1.0, 24.0, profit_weight=2.0) == pytest.approx(1.6)


def test_composite_is_monotone_in_profit_and_probability() -> None:
    profit = np.linspace(-2, 2, 41)
    p = np.linspace(0, 1, 21)
    grid = np.asarray(composite_score(profit[:, None], p[None, :], 24.0))
    assert grid.shape == (41, 21)
    assert (np.diff(grid, axis=0) >= 0).all()  # never decreasing in profit...
    assert (np.diff(grid[:, 1:], axis=0) > 0).all()  # ...and strictly increasing once p > 0
    assert (np.diff(grid, axis=1) >= 0).all()  # never decreasing in the success probability
    assert (grid[profit < 0][:, -1] > grid[profit < 0][:, 0]).all()  # a confident loser ranks lowest


def test_composite_floors_the_hold_and_rejects_bad_inputs() -> None:
    assert np.isfinite(composite_score(1.0, 1.0, 1e-9))
    with pytest.raises(DataValidationError, match="hold_hours"):
        composite_score(1.0, 0.5, 0.0)
    with pytest.raises(DataValidationError, match="success_proba"):
        composite_score(1.0, 1.5, 24.0)
    with pytest.raises(DataValidationError, match="profit_pct"):
        composite_score(np.nan, 0.5, 24.0)
    with pytest.raises(DataValidationError, match="success_weight"):
        composite_score(1.0, 0.5, 24.0, success_weight=-1.0)


def test_scoring_imports_numpy_only() -> None:
    code = (
        "import sys; import cryptoml.models.scoring; "
        "bad = [m for m in ('pandas', 'xgboost', 'sklearn', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
