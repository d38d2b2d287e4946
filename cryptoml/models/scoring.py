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
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cryptoml.errors import DataValidationError

ArrayLike = npt.ArrayLike
MIN_HOLD_HOURS = 1.0 / 60.0  # floor of the hold in the score's denominator: one minute


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
