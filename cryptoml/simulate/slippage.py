"""Slippage and fee model of one taker fill: half the bid-ask spread times a size/depth tier multiplier.

A fill of ``position_usd`` on a leg whose bid-ask spread is ``spread_pct`` percent and whose top-of-book
depth (both sides, USD) is ``depth_usd`` costs ``slippage_frac`` of its notional::

    slippage_frac = spread_pct / 100 / 2 * multiplier(position_usd / depth_usd)

The multiplier comes from ``SimulateParams.slippage_tiers`` / ``slippage_multipliers``: a ratio below
``tiers[0]`` gets ``multipliers[0]``, a ratio at or above ``tiers[i - 1]`` and below ``tiers[i]`` gets
``multipliers[i]``, at or above ``tiers[-1]`` gets ``multipliers[-1]`` (a boundary belongs to the upper
tier). Unknown depth (NaN) or no depth (<= 0) counts as an infinite ratio: the worst tier.
Fees are taker fees in bps of the fill's notional, per exchange (``SimulateParams.fee_bps``).
"""

from __future__ import annotations

import math

import numpy as np

from cryptoml.config import SimulateParams


def depth_ratio(position_usd: float, depth_usd: np.ndarray) -> np.ndarray:
    """``position_usd / depth_usd`` with NaN or non-positive depth mapped to +inf."""
    depth = np.asarray(depth_usd, dtype=np.float64)
    ok = np.isfinite(depth) & (depth > 0)
    safe = np.where(ok, depth, 1.0)
    return np.where(ok, position_usd / safe, np.inf)


def slippage_multiplier(position_usd: float, depth_usd: np.ndarray, params: SimulateParams) -> np.ndarray:
    """Tier multiplier per fill (vectorised; see the module docstring for the tier boundaries)."""
    tiers = np.asarray(params.slippage_tiers, dtype=np.float64)
    mults = np.asarray(params.slippage_multipliers, dtype=np.float64)
    # side="right": a ratio equal to tiers[i] lands above it, i.e. in the upper tier.
    return mults[np.searchsorted(tiers, depth_ratio(position_usd, depth_usd), side="right")]


def slippage_frac(
    spread_pct: np.ndarray, depth_usd: np.ndarray, position_usd: float, params: SimulateParams
) -> np.ndarray:
    """Slippage of each fill as a fraction of its notional (vectorised)."""
    half_spread = np.asarray(spread_pct, dtype=np.float64) / 100.0 / 2.0
    return half_spread * slippage_multiplier(position_usd, depth_usd, params)


def slippage_frac_one(spread_pct: float, depth_usd: float, position_usd: float, params: SimulateParams) -> float:
    """The same model for one fill, written as a plain loop over the tiers (the readable specification)."""
    ratio = math.inf if math.isnan(depth_usd) or depth_usd <= 0 else position_usd / depth_usd
    multiplier = params.slippage_multipliers[0]
    for tier, tier_multiplier in zip(params.slippage_tiers, params.slippage_multipliers[1:], strict=True):
        if ratio >= tier:
            multiplier = tier_multiplier
    return spread_pct / 100.0 / 2.0 * multiplier


def fee_frac(exchange: str, params: SimulateParams) -> float:
    """Taker fee of one fill on ``exchange`` as a fraction of the fill's notional."""
    return params.fee_bps(exchange) / 10_000.0
