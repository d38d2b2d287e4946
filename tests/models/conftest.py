"""A small simulated-positions table (data-contract columns) with a planted, learnable edge.

Opportunities appear on a 5-minute snapshot grid over ``days`` days. The realised funding rate of an
entry decays from the current spread ``s`` towards a long-run level ``L = avg_3d * (1.3 - 0.7 * min(cv,
1.5))`` with an 8 h time constant, so a spike (``s`` far above its 3-day mean) mostly reverts and a noisy
spread (high cv) earns less than its average promises. Costs are 4 taker fees plus slippage that grows
when the book is thin. The rule scorer (rank by fund_apr) sees only ``s``; a model that sees the
3-day mean, cv, depth and the hold can do better. ``shuffle_labels=True`` permutes the outcome columns
across rows (jointly), which destroys the edge.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

MS_PER_HOUR = 3_600_000
START_MS = 1_704_067_200_000  # 2024-01-01T00:00Z
TEST_HOLDS = (1.0, 8.0, 24.0, 48.0)
OUTCOME_COLUMNS = (
    "actual_hold_hours",
    "actual_profit_pct",
    "actual_profit_usd",
    "was_profitable",
    "peak_profit_pct",
    "max_drawdown_pct",
    "funding_payments_count",
    "total_funding_usd",
    "slippage_pct",
    "fees_usd",
)
_PAIRS = (  # strategy, base, long (exchange, market), short (exchange, market)
    ("spot_perp", "BTC", ("binance", "spot"), ("binance", "swap")),
    ("spot_perp", "ETH", ("bybit", "spot"), ("bybit", "swap")),
    ("spot_perp", "SOL", ("binance", "spot"), ("binance", "swap")),
    ("cross_exchange", "BTC", ("binance", "swap"), ("bybit", "swap")),
    ("cross_exchange", "ETH", ("bybit", "swap"), ("binance", "swap")),
    ("cross_exchange", "SOL", ("bybit", "swap"), ("binance", "swap")),
)


def make_positions(
    days: float = 20.0,
    seed: int = 0,
    holds: tuple[float, ...] = TEST_HOLDS,
    presence: float = 0.12,
    shuffle_labels: bool = False,
    position_usd: float = 10_000.0,
) -> pd.DataFrame:
    """Positions table: one row per (snapshot, opportunity, hold), holds ending after the data dropped."""
    rng = np.random.default_rng(seed)
    step_ms = 5 * 60_000
    end_ms = START_MS + int(days * 24 * MS_PER_HOUR)
    grid = np.arange(START_MS, end_ms, step_ms, dtype=np.int64)
    ts = np.repeat(grid, len(_PAIRS))
    pair = np.tile(np.arange(len(_PAIRS)), grid.size)
    keep = rng.random(ts.size) < presence
    ts, pair = ts[keep], pair[keep]
    n = ts.size

    avg3d = np.exp(rng.normal(np.log(5e-4), 0.5, n))  # fraction per 8 h
    spread = avg3d * np.exp(rng.normal(0.0, 0.6, n))
    avg24 = avg3d + (spread - avg3d) * rng.uniform(0.3, 0.8, n)
    cv = rng.uniform(0.05, 2.0, n)
    depth = np.exp(rng.normal(np.log(1.5e5), 1.0, n))
    ba_pct = rng.uniform(0.01, 0.08, n)
    ret_vol = np.exp(rng.normal(np.log(8e-4), 0.3, n))
    volume = np.exp(rng.normal(np.log(5e7), 1.0, n))
    regime = rng.choice(np.array(["Bull", "Bear", "Ranging"]), n)
    fee_pct = 4 * 4.0 / 100.0  # four 4-bps taker fills
    be_hours = np.where(spread > 0, (fee_pct + ba_pct) / (spread * 100 / 8.0), 1e6)

    info = [_PAIRS[i] for i in pair]
    entry = pd.DataFrame(
        {
            "ts_ms": ts,
            "opportunity_id": [f"{s}:{b}:{lo[0]}-{lo[1]}:{sh[0]}-{sh[1]}" for s, b, lo, sh in info],
            "strategy": [p[0] for p in info],
            "base": [p[1] for p in info],
            "long_exchange": [p[2][0] for p in info],
            "long_market": [p[2][1] for p in info],
            "long_symbol": [f"{p[1]}/USDT" if p[2][1] == "spot" else f"{p[1]}/USDT:USDT" for p in info],
            "short_exchange": [p[3][0] for p in info],
            "short_market": [p[3][1] for p in info],
            "short_symbol": [f"{p[1]}/USDT:USDT" for p in info],
            "long_price": 100.0,
            "short_price": 100.05,
            "funding_rate_long": 0.0,
            "funding_rate_short": spread,
            "funding_spread": spread,
            "fund_profit_8h": spread * 100,
            "fund_apr": spread * 100 * 3 * 365,
            "fund_profit_24h_proj": spread * 100 * 3,
            "fund_profit_3d_proj": spread * 100 * 9,
            "break_even_hours": be_hours,
            "spread_volatility_cv": cv,
            "funding_spread_avg_24h": avg24,
            "funding_spread_avg_3d": avg3d,
            "volume_24h": volume,
            "bid_ask_spread_pct": ba_pct,
            "orderbook_depth_usd": depth,
            "depth_is_proxy": rng.random(n) < 0.2,
            "liquidity_status": np.where(depth >= 2.5e5, "high", np.where(depth >= 5e4, "medium", "low")),
            "ret_vol_24h": ret_vol,
            "next_funding_ts_ms": (ts // (8 * MS_PER_HOUR) + 1) * 8 * MS_PER_HOUR,
            "btc_price": 42_000.0,
            "btc_volume_24h_usd": 2e10,
            "btc_ret_trailing": np.where(regime == "Bull", 0.05, np.where(regime == "Bear", -0.05, 0.0)),
            "regime": regime,
        }
    )
    rows = entry.loc[np.repeat(np.arange(n), len(holds))].reset_index(drop=True)
    hold = np.tile(np.asarray(holds, dtype=np.float64), n)
    rows["hold_hours"] = hold
    k = np.repeat(np.arange(n), len(holds))

    level = avg3d[k] * (1.3 - 0.7 * np.minimum(cv[k], 1.5))
    tau = 8.0
    income_pct = 100 * (level * hold / 8.0 + (spread[k] - level) * (tau / 8.0) * (1 - np.exp(-hold / tau)))
    mult = np.where(depth[k] >= 2.5e5, 1.0, np.where(depth[k] >= 5e4, 2.5, 5.0))
    slip_pct = ba_pct[k] * mult
    noise = rng.normal(0.0, 0.06 * np.sqrt(hold / 8.0 + 0.5), hold.size)
    profit_pct = income_pct - fee_pct - slip_pct + noise
    rows["actual_hold_hours"] = hold
    rows["actual_profit_pct"] = profit_pct
    rows["actual_profit_usd"] = profit_pct / 100 * position_usd
    rows["was_profitable"] = rows["actual_profit_usd"] > 0
    rows["peak_profit_pct"] = np.maximum(profit_pct, 0) + np.abs(noise)
    rows["max_drawdown_pct"] = np.abs(noise) + slip_pct
    rows["funding_payments_count"] = (hold // 8).astype(np.int64)
    rows["total_funding_usd"] = income_pct / 100 * position_usd
    rows["slippage_pct"] = slip_pct
    rows["fees_usd"] = fee_pct / 100 * position_usd
    rows = rows.loc[rows["ts_ms"] + hold * MS_PER_HOUR <= end_ms].reset_index(drop=True)
    if shuffle_labels:
        perm = np.random.default_rng(seed + 1).permutation(len(rows))
        for col in OUTCOME_COLUMNS:
            if col != "actual_hold_hours":
                rows[col] = rows[col].to_numpy()[perm]
    return rows


@pytest.fixture(scope="session")
def planted_positions() -> pd.DataFrame:
    return make_positions()


@pytest.fixture(scope="session")
def shuffled_positions() -> pd.DataFrame:
    return make_positions(shuffle_labels=True)
