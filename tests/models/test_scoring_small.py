"""The small-size path of composite_score and kelly_fraction: the same bits as the NumPy path, the same errors.

Up to ``SMALL_SIZE`` values both functions work on Python floats (the API scores 1-9 candidates per call);
``_numpy_composite_score`` / ``_numpy_kelly_fraction`` are the vectorised reference (and the path of the
backtest's large arrays). Every comparison is of the float64 bits and of the return type (a float for
scalar inputs, an array as soon as one input is an array).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cryptoml.errors import DataValidationError
from cryptoml.models import scoring
from cryptoml.models.scoring import composite_score, kelly_fraction

# The extreme inputs overflow inside the NumPy reference path, which says so; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
SPECIAL = (0.0, -0.0, 1.0, 0.5, 1e-300, 5e-324, 1e300, np.nan, np.inf, -1.0)
GRID_HOURS = np.array([1.0, 4.0, 8.0, 12.0, 24.0, 48.0, 72.0, 120.0, 168.0])


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except DataValidationError as e:
        return f"error: {e}"


def assert_same(got: Any, want: Any) -> None:
    assert type(got) is type(want), (got, want)
    if isinstance(want, str):
        assert got == want
    elif isinstance(want, float):
        assert np.float64(got).view(np.int64) == np.float64(want).view(np.int64), (got, want)
    else:
        assert got.shape == want.shape and got.dtype == want.dtype == np.float64
        assert (got.view(np.int64) == want.view(np.int64)).all(), (got, want)


def _values(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "p":
        x = rng.uniform(0.0, 1.0, n)
    elif kind == "hold":
        x = rng.choice([*GRID_HOURS, 1.0 / 60.0, 1e-3, 0.5], n) * rng.choice([1.0, 1.0001], n)
    else:
        x = rng.normal(0.0, 2.0, n)
    hit = rng.uniform(size=n) < 0.1
    x[hit] = rng.choice(SPECIAL, int(hit.sum()))
    return x


def _form(rng: np.random.Generator, x: np.ndarray) -> Any:
    """A Python float, a float32 array, a length-1 array or the float64 array itself."""
    r = rng.uniform()
    if r < 0.15:
        return float(x[0])
    if r < 0.25:
        with np.errstate(over="ignore"):  # 1e300 -> inf in float32: an input error both paths must name
            return x.astype(np.float32)
    if r < 0.3:
        return x[:1]
    return x


@pytest.mark.parametrize("seed", range(3))
def test_composite_matches_the_numpy_path_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    small_used = 0
    for _ in range(2000):
        n = int(rng.integers(1, 12))
        args = (_form(rng, _values(rng, n, "x")), _form(rng, _values(rng, n, "p")), _form(rng, _values(rng, n, "hold")))
        profit_weight = float(rng.choice([1.0, 2.0, 0.5, -1.0, np.inf]))
        success_weight: float = float(rng.choice([1.0, 0.5, 2.0, 0.7, 0.0, 3.3, -1.0]))
        if success_weight in (1.0, 2.0) and rng.uniform() < 0.5:
            success_weight = int(success_weight)  # an int exponent takes NumPy's integer-power shortcuts
        got = _outcome(composite_score, *args, profit_weight, success_weight)
        assert_same(got, _outcome(scoring._numpy_composite_score, *args, profit_weight, success_weight))
        small_used += scoring._small_composite(*args, profit_weight, success_weight) is not None
    assert small_used > 400  # the comparison exercised the small path, not only its fallback


@pytest.mark.parametrize("seed", range(3))
def test_kelly_matches_the_numpy_path_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    small_used = 0
    for _ in range(2000):
        n = int(rng.integers(1, 12))
        magnitudes = [0.0, 1.2, 0.8, 1e-300, 5e-324, 1e300]
        p = _form(rng, _values(rng, n, "p"))
        win = _form(rng, np.abs(_values(rng, n, "x"))) if rng.uniform() < 0.5 else float(rng.choice(magnitudes))
        loss = _form(rng, np.abs(_values(rng, n, "x"))) if rng.uniform() < 0.5 else float(rng.choice(magnitudes))
        fraction, cap = float(rng.choice([0.25, 1.0, 0.5, 0.0, 1.5])), float(rng.choice([0.2, 1.0, 0.9, 0.0]))
        got = _outcome(kelly_fraction, p, win, loss, fraction, cap)
        assert_same(got, _outcome(scoring._numpy_kelly_fraction, p, win, loss, fraction, cap))
        small_used += scoring._small_kelly(p, win, loss, fraction, cap) is not None
    assert small_used > 400  # the comparison exercised the small path, not only its fallback


def test_the_api_call_shapes_take_the_small_path() -> None:
    rng = np.random.default_rng(7)
    profit, proba = rng.normal(0.2, 1.0, 9), rng.uniform(0.0, 1.0, 9).astype(np.float32)
    args = (profit, np.clip(proba, 0.0, 1.0), GRID_HOURS, 1.0, 1.0)
    assert scoring._small_composite(*args) is not None
    assert_same(composite_score(*args), scoring._numpy_composite_score(*args))
    p_best = np.asarray(proba[:1], dtype=np.float64)
    for win, loss in ((1.3, 0.9), (1.0, 1.0), (0.0, 0.7), (0.4, 0.0)):
        assert scoring._small_kelly(p_best, win, loss, 0.25, 0.2) is not None
        assert_same(
            kelly_fraction(p_best, win, loss, 0.25, 0.2), scoring._numpy_kelly_fraction(p_best, win, loss, 0.25, 0.2)
        )


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
def test_documented_kelly_edge_cases_on_the_small_path(p: float, win: float, loss: float, expected: float) -> None:
    small = scoring._small_kelly(p, win, loss, 0.5, 0.9)
    assert isinstance(small, float)
    assert small == pytest.approx(expected)
    assert_same(small, scoring._numpy_kelly_fraction(p, win, loss, 0.5, 0.9))
    arrays = scoring._small_kelly(np.array([p, p]), win, loss, 0.5, 0.9)
    assert_same(arrays, scoring._numpy_kelly_fraction(np.array([p, p]), win, loss, 0.5, 0.9))


def test_kelly_cap_on_the_small_path() -> None:
    assert scoring._small_kelly(1.0, 1.0, 1.0, 1.0, 0.2) == 0.2
    assert scoring._small_kelly(0.99, 2.0, 1.0, 1.0, 0.9) == 0.9


@pytest.mark.parametrize(
    ("p", "win", "loss"),
    [
        (-0.0, 1.0, 0.0),  # f* = p = -0.0: which zero np.clip returns is NumPy's business
        (0.5, 1e300, 5e-324),  # b overflows to inf: f* = inf / inf = NaN
    ],
)
def test_kelly_signed_zero_and_nan_go_to_the_numpy_path(p: float, win: float, loss: float) -> None:
    assert scoring._small_kelly(p, win, loss, 0.25, 0.2) is None
    assert_same(
        _outcome(kelly_fraction, p, win, loss, 0.25, 0.2), scoring._numpy_kelly_fraction(p, win, loss, 0.25, 0.2)
    )


def test_composite_documented_values_on_the_small_path() -> None:
    assert scoring._small_composite(0.8, 1.0, 24.0, 1.0, 1.0) == pytest.approx(0.8)
    assert scoring._small_composite(0.8, 0.5, 96.0, 1.0, 1.0) == pytest.approx(0.4 / 2.0)
    assert scoring._small_composite(-0.4, 0.25, 24.0, 1.0, 1.0) == pytest.approx(-0.4 * 1.75)
    assert scoring._small_composite(0.8, 0.5, 24.0, 1.0, 0.0) == pytest.approx(0.8)
    assert scoring._small_composite(0.8, 1.0, 0.001, 1.0, 1.0) == pytest.approx(0.8 / np.sqrt(1.0 / 60.0 / 24.0))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.5, 1.2, 24.0, 1.0, 1.0), "success_proba"),
        ((0.5, np.array([0.5, np.nan]), 24.0, 1.0, 1.0), "success_proba"),
        ((np.inf, 0.5, 24.0, 1.0, 1.0), "profit_pct"),
        ((0.5, 0.5, np.array([24.0, 0.0]), 1.0, 1.0), "hold_hours"),
        ((0.5, 0.5, -1.0, 1.0, 1.0), "hold_hours"),
        ((0.5, 0.5, 24.0, 1.0, -0.5), "success_weight"),
    ],
)
def test_composite_errors_are_the_numpy_paths(args: tuple[Any, ...], match: str) -> None:
    assert scoring._small_composite(*args) is None
    with pytest.raises(DataValidationError, match=match):
        composite_score(*args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.2, 1.0, 1.0, 0.25, 0.2), "p must"),
        ((np.array([0.5, np.nan]), 1.0, 1.0, 0.25, 0.2), "p must"),
        ((0.5, -1.0, 1.0, 0.25, 0.2), "win_pct"),
        ((0.5, 1.0, np.inf, 0.25, 0.2), "loss_pct"),
        ((0.5, 1.0, 1.0, 0.0, 0.2), "fraction"),
        ((0.5, 1.0, 1.0, 0.25, 1.5), "cap"),
    ],
)
def test_kelly_errors_are_the_numpy_paths(args: tuple[Any, ...], match: str) -> None:
    assert scoring._small_kelly(*args) is None
    with pytest.raises(DataValidationError, match=match):
        kelly_fraction(*args)


def test_inputs_the_small_path_leaves_to_numpy() -> None:
    nine, two = np.full(9, 0.5), np.full(2, 0.5)
    long = np.full(scoring.SMALL_SIZE + 1, 0.5)
    cases: list[tuple[Any, ...]] = [
        (nine, two, 24.0),  # lengths that do not broadcast: NumPy's error
        (nine, nine[:1], 24.0),  # a length-1 array broadcasts in NumPy
        (np.float64(0.5), 0.5, 24.0),  # NumPy scalars, 0-d and 2-d arrays, ints arrays, lists
        (np.array(0.5), 0.5, 24.0),
        (nine[:, None], 0.5, 24.0),
        (np.arange(3), 0.5, 24.0),
        ([0.5, 0.5], 0.5, 24.0),
        (long, long, long),  # beyond SMALL_SIZE
        (np.array([]), 0.5, 24.0),
    ]
    for args in cases:
        assert scoring._small_composite(*args, 1.0, 1.0) is None
        assert scoring._small_kelly(*args, 0.25, 0.2) is None
        for fn, numpy_fn, extra in (
            (composite_score, scoring._numpy_composite_score, (1.0, 1.0)),
            (kelly_fraction, scoring._numpy_kelly_fraction, (0.25, 0.2)),
        ):
            got, want = _any_outcome(fn, *args, *extra), _any_outcome(numpy_fn, *args, *extra)
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(got, want)
            else:  # a float, or the same error (NumPy's own for shapes it cannot broadcast)
                assert_same(got, want)


def _any_outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
