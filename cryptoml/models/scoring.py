"""Composite opportunity score and fractional-Kelly sizing, NumPy only (the edge runner imports this).

Composite score (units: percent per sqrt(day)) of a candidate position with predicted profit
``profit_pct`` (percent of one leg's notional over the whole hold), success probability ``p`` and hold
``hold_hours``::

    adjusted = profit_pct * p**w_s            if profit_pct >= 0
             = profit_pct * (2 - p**w_s)      if profit_pct <  0
    score    = w_p * adjusted / sqrt(max(hold_hours, 1/60) / 24)

Why this shape: the adjustment is increasing in both the predicted profit and the success probability
for either sign of the profit (a confident loser ranks below an unsure one), is continuous at 0 and
reduces to the predicted profit when ``p = 1`` or ``w_s = 0``. Dividing by the square root of the hold
in days sits between ranking by total profit (which always prefers the longest hold and ties capital up)
and profit per day (which favours very short holds whose per-day figure is mostly fee noise).

Kelly: ``f* = (p * b - (1 - p)) / b`` with ``b = win_pct / loss_pct`` (the payoff ratio of a winning to a
losing position, both given as positive magnitudes in percent); the size is
``clip(fraction * f*, 0, cap)`` as a fraction of capital. Edge cases (all explicit, see
:func:`kelly_fraction`): ``loss_pct == 0`` -> ``b = inf`` and ``f* = p`` (the limit of the formula);
``win_pct == 0`` -> 0 (no upside, no bet); ``p == 0`` -> 0; ``p == 1`` -> ``min(fraction, cap)``.

Both functions take a pure-Python path for up to :data:`SMALL_SIZE` values (the API scores 1-9 candidates
per call, where NumPy's per-call overhead is most of the time): the same IEEE operations in the same order
on Python floats, so the same bits as the NumPy path (``p ** w`` with ``w != 1`` is still NumPy's, as its
SIMD ``pow`` may differ from libm's in the last bit); any error, and a Kelly size that NumPy's ``clip``
would have to order against a signed zero or NaN, is handed to the NumPy path.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from cryptoml.errors import DataValidationError

ArrayLike = npt.ArrayLike
MIN_HOLD_HOURS = 1.0 / 60.0  # floor of the hold in the score's denominator: one minute
SMALL_SIZE = 48  # values up to which both functions work on Python floats (NumPy's call overhead dominates)
_FLOAT_ARRAYS = (np.dtype(np.float64), np.dtype(np.float32))  # exactly widened by tolist()


def _out(x: np.ndarray) -> float | np.ndarray:
    return float(x) if x.ndim == 0 else x


def composite_score(
    profit_pct: ArrayLike,
    success_proba: ArrayLike,
    hold_hours: ArrayLike,
    profit_weight: float = 1.0,
    success_weight: float = 1.0,
) -> float | np.ndarray:
    """Composite score (percent per sqrt(day)), broadcast over the three inputs; see the module doc.

    Raises :class:`DataValidationError` for a probability outside [0, 1], a hold <= 0, a negative
    ``success_weight`` or any non-finite input.
    """
    small = _small_composite(profit_pct, success_proba, hold_hours, profit_weight, success_weight)
    if small is not None:
        return small
    return _numpy_composite_score(profit_pct, success_proba, hold_hours, profit_weight, success_weight)


def _numpy_composite_score(
    profit_pct: ArrayLike,
    success_proba: ArrayLike,
    hold_hours: ArrayLike,
    profit_weight: float,
    success_weight: float,
) -> float | np.ndarray:
    """:func:`composite_score` vectorised with NumPy: the reference arithmetic, and the path of large inputs."""
    profit = np.asarray(profit_pct, dtype=np.float64)
    p = np.asarray(success_proba, dtype=np.float64)
    hold = np.asarray(hold_hours, dtype=np.float64)
    for name, arr in (("profit_pct", profit), ("success_proba", p), ("hold_hours", hold)):
        if not np.isfinite(arr).all():
            raise DataValidationError(f"composite_score: {name} has non-finite values")
    if ((p < 0) | (p > 1)).any():
        raise DataValidationError("composite_score: success_proba must be in [0, 1]")
    if (hold <= 0).any():
        raise DataValidationError("composite_score: hold_hours must be > 0")
    if success_weight < 0:
        raise DataValidationError(f"composite_score: success_weight must be >= 0, got {success_weight}")
    conf = p**success_weight
    adjusted = np.where(profit >= 0, profit * conf, profit * (2.0 - conf))
    days = np.maximum(hold, MIN_HOLD_HOURS) / 24.0
    return _out(profit_weight * adjusted / np.sqrt(days))


def kelly_fraction(
    p: ArrayLike,
    win_pct: ArrayLike,
    loss_pct: ArrayLike,
    fraction: float = 0.25,
    cap: float = 0.2,
) -> float | np.ndarray:
    """Fractional Kelly size as a fraction of capital in ``[0, cap]``, broadcast over the inputs.

    ``p``: probability of a profitable position; ``win_pct`` / ``loss_pct``: mean profit of a winner and
    mean loss of a loser, both >= 0 and in the same unit (percent of the position). Edge cases:

    - ``loss_pct == 0`` and ``win_pct > 0``: ``b = inf``, ``f* = p`` (limit of the formula);
    - ``win_pct == 0``: ``b = 0``, size 0 (nothing to win);
    - ``p == 0``: ``f* = -1/b`` -> clipped to 0; ``p == 1``: ``f* = 1`` -> ``min(fraction, cap)``.

    Raises :class:`DataValidationError` for ``p`` outside [0, 1], negative or non-finite win/loss,
    ``fraction`` or ``cap`` outside (0, 1].
    """
    small = _small_kelly(p, win_pct, loss_pct, fraction, cap)
    if small is not None:
        return small
    return _numpy_kelly_fraction(p, win_pct, loss_pct, fraction, cap)


def _numpy_kelly_fraction(
    p: ArrayLike, win_pct: ArrayLike, loss_pct: ArrayLike, fraction: float, cap: float
) -> float | np.ndarray:
    """:func:`kelly_fraction` vectorised with NumPy: the reference arithmetic, and the path of large inputs."""
    pa = np.asarray(p, dtype=np.float64)
    win = np.asarray(win_pct, dtype=np.float64)
    loss = np.asarray(loss_pct, dtype=np.float64)
    if not np.isfinite(pa).all() or ((pa < 0) | (pa > 1)).any():
        raise DataValidationError("kelly_fraction: p must be finite and in [0, 1]")
    for name, arr in (("win_pct", win), ("loss_pct", loss)):
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise DataValidationError(f"kelly_fraction: {name} must be finite and >= 0 (a magnitude)")
    if not (0 < fraction <= 1 and 0 < cap <= 1):
        raise DataValidationError(f"kelly_fraction: fraction and cap must be in (0, 1], got {fraction}, {cap}")
    pa, win, loss = np.broadcast_arrays(pa, win, loss)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = win / loss
        full = np.where(loss > 0, (pa * b - (1.0 - pa)) / np.where(b > 0, b, 1.0), pa)
    full = np.where(win > 0, full, 0.0)
    return _out(np.clip(fraction * full, 0.0, cap))


# --- small-size path ---------------------------------------------------------------------------------


def _small_lists(*values: Any) -> tuple[list[list[float]], bool] | None:
    """Each input as a list of Python floats of one common length n <= SMALL_SIZE (a Python number is
    repeated n times) and whether any was an array; None when an input is anything else (a NumPy path
    case: other dtypes or shapes, broadcasting between lengths, no value)."""
    lists: list[list[float] | float] = []
    n = 0
    for v in values:
        if type(v) is float or type(v) is int:
            lists.append(float(v))  # what np.asarray(v, dtype=np.float64) holds (a huge int: OverflowError)
        elif type(v) is np.ndarray and v.dtype in _FLOAT_ARRAYS and v.ndim == 1 and 0 < v.size <= SMALL_SIZE:
            if n not in (0, v.size):
                return None
            n = v.size
            lists.append(v.tolist())
        else:
            return None
    out = [x if isinstance(x, list) else [x] * (n or 1) for x in lists]
    return out, n > 0


def _result(values: list[float], is_array: bool) -> float | np.ndarray:
    return np.array(values, dtype=np.float64) if is_array else values[0]


def _small_composite(
    profit_pct: Any, success_proba: Any, hold_hours: Any, profit_weight: Any, success_weight: Any
) -> float | np.ndarray | None:
    """:func:`composite_score` on Python floats, or None to defer to its NumPy path."""
    if not (type(profit_weight) in (float, int) and type(success_weight) in (float, int) and success_weight >= 0):
        return None
    try:
        inputs = _small_lists(profit_pct, success_proba, hold_hours)
        weight = float(profit_weight)
    except OverflowError:
        return None
    if inputs is None:
        return None
    (profits, probas, holds), is_array = inputs
    if success_weight == 1:
        confs = probas  # p ** 1 is p exactly
    elif all(0.0 <= p <= 1.0 for p in probas):  # checked first: NumPy would warn on a bad one
        confs = (np.array(probas) ** success_weight).tolist()  # NumPy's power, exactly as its path does it
    else:
        return None
    inf = math.inf
    scores = []
    for profit, p, conf, hold in zip(profits, probas, confs, holds, strict=True):
        if not (-inf < profit < inf and 0.0 <= p <= 1.0 and 0.0 < hold < inf):
            return None
        adjusted = profit * conf if profit >= 0 else profit * (2.0 - conf)
        days = (hold if hold > MIN_HOLD_HOURS else MIN_HOLD_HOURS) / 24.0
        scores.append(weight * adjusted / math.sqrt(days))  # sqrt is correctly rounded in libm and NumPy
    return _result(scores, is_array)


def _small_kelly(p: Any, win_pct: Any, loss_pct: Any, fraction: Any, cap: Any) -> float | np.ndarray | None:
    """:func:`kelly_fraction` on Python floats, or None to defer to its NumPy path."""
    if not (type(fraction) in (float, int) and type(cap) in (float, int) and 0 < fraction <= 1 and 0 < cap <= 1):
        return None
    try:
        inputs = _small_lists(p, win_pct, loss_pct)
    except OverflowError:
        return None
    if inputs is None:
        return None
    (probas, wins, losses), is_array = inputs
    inf = math.inf
    frac, top = float(fraction), float(cap)
    sizes = []
    for pa, win, loss in zip(probas, wins, losses, strict=True):
        if not (0.0 <= pa <= 1.0 and 0.0 <= win < inf and 0.0 <= loss < inf):
            return None
        if not win > 0:
            full = 0.0
        elif loss > 0:
            b = win / loss
            full = (pa * b - (1.0 - pa)) / (b if b > 0 else 1.0)
        else:
            full = pa
        size = frac * full
        if size != size or (size == 0.0 and math.copysign(1.0, size) < 0):
            return None  # NaN or -0.0: what np.clip returns for them is NumPy's choice
        sizes.append(0.0 if size < 0.0 else (top if size > top else size))
    return _result(sizes, is_array)
