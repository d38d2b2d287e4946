"""Entry-time arithmetic of a funding-arbitrage opportunity, shared by the batch detector and the live one.

NumPy and the project's config only (the edge imports it). Units: ``spread`` is the funding-rate spread per
``REFERENCE_INTERVAL_HOURS`` (8 h) as a fraction; yields come out in percent; costs are fractions of notional.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryptoml.config import SimulateParams
from cryptoml.simulate.slippage import fee_frac, slippage_frac

BREAK_EVEN_CAP_HOURS = 1e6
CV_CAP = 1e6
CV_EPS = 1e-12  # |mean| or std below this counts as zero
CV_WINDOW_MS = 3 * 86_400_000
REFERENCE_INTERVAL_HOURS = 8.0


def funding_yields(spread: Any) -> dict[str, Any]:
    """``fund_profit_8h`` (% per 8 h), ``fund_apr`` (% per year) and the 24 h / 3 d projections (%)."""
    pct = np.asarray(spread, dtype=np.float64) * 100.0 if np.ndim(spread) else float(spread) * 100.0
    return {
        "fund_profit_8h": pct,
        "fund_apr": pct * 3 * 365,
        "fund_profit_24h_proj": pct * 3,
        "fund_profit_3d_proj": pct * 9,
    }


def leg_round_trip_cost(exchanges: Any, spread_pct: Any, depth_usd: Any, sim: SimulateParams) -> np.ndarray:
    """2 taker fees + 2 slippages of one leg (entry and exit at the entry estimates), fraction of notional."""
    fee = np.array([fee_frac(e, sim) for e in np.atleast_1d(exchanges)], dtype=np.float64)
    slip = slippage_frac(
        np.atleast_1d(np.asarray(spread_pct, dtype=np.float64)),
        np.atleast_1d(np.asarray(depth_usd, dtype=np.float64)),
        sim.position_usd,
        sim,
    )
    return 2 * fee + 2 * slip


def break_even_hours(cost_frac: Any, spread: Any) -> np.ndarray:
    """Hours of funding at ``spread`` that pay ``cost_frac``; the cap when the spread earns nothing."""
    hourly = np.atleast_1d(np.asarray(spread, dtype=np.float64)) / REFERENCE_INTERVAL_HOURS
    with np.errstate(divide="ignore", invalid="ignore"):
        hours = np.where(hourly > 0, np.asarray(cost_frac, dtype=np.float64) / hourly, BREAK_EVEN_CAP_HOURS)
    return np.minimum(np.nan_to_num(hours, nan=BREAK_EVEN_CAP_HOURS), BREAK_EVEN_CAP_HOURS)
