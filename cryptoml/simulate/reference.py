"""Reference simulation of ONE position as a plain loop: the readable specification of ``positions``.

It applies the rules documented in :mod:`cryptoml.simulate.positions` directly to the raw series (bar
closes, snapshot liquidity, funding settlements) without any precomputed grid, so that the vectorised
simulator can be checked against it (tests require agreement to 1e-9 on every output). Slow by design.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from typing import Any

from cryptoml.config import SimulateParams
from cryptoml.market.store import market_of
from cryptoml.simulate.positions import MTM_STEP_MINUTES, FundingEvents, PricePaths, PriceSeries
from cryptoml.simulate.slippage import fee_frac, slippage_frac_one
from cryptoml.simulate.snapshots import HOUR_MS, MAX_BAR_AGE_MINUTES, MINUTE_MS


def _close_at(series: PriceSeries, t: int) -> tuple[float, int] | None:
    """(close, close time) of the last bar closed at or before t, or None."""
    i = bisect_right(series.close_ts_ms, t) - 1
    return None if i < 0 else (float(series.close[i]), int(series.close_ts_ms[i]))


def _slippage_at(series: PriceSeries, t: int, position_usd: float, params: SimulateParams) -> float:
    """Slippage fraction from the latest snapshot liquidity at or before t (NaN when none)."""
    i = bisect_right(series.liq_ts_ms, t) - 1
    if i < 0:
        return math.nan
    return slippage_frac_one(float(series.spread_pct[i]), float(series.depth_usd[i]), position_usd, params)


def simulate_one(
    opportunity_row: Mapping[str, Any],
    hold_hours: int,
    prices: PricePaths,
    funding: FundingEvents,
    params: SimulateParams,
    *,
    mtm_step_minutes: int = MTM_STEP_MINUTES,
) -> dict[str, Any]:
    """Simulate one position; returns ``{"status": "ok" | "dropped_past_data" | "dropped_gap", ...outputs}``."""
    pos = params.position_usd
    entry = int(opportunity_row["ts_ms"])
    exit_ = entry + int(hold_hours) * HOUR_MS
    max_age = MAX_BAR_AGE_MINUTES * MINUTE_MS
    # side +1 = long, -1 = short
    legs = [
        (+1, opportunity_row["long_exchange"], opportunity_row["long_symbol"]),
        (-1, opportunity_row["short_exchange"], opportunity_row["short_symbol"]),
    ]
    for _, exchange, symbol in legs:
        if exit_ > prices.get(exchange, symbol).close_ts_ms[-1]:
            return {"status": "dropped_past_data"}
        if market_of(symbol) == "swap":
            f = funding.get(exchange, symbol)
            if exit_ > f.ts_ms[-1] + f.interval_ms:
                return {"status": "dropped_past_data"}
    state = []
    for side, exchange, symbol in legs:
        series = prices.get(exchange, symbol)
        at_entry, at_exit = _close_at(series, entry), _close_at(series, exit_)
        if at_entry is None or at_exit is None or entry - at_entry[1] > max_age or exit_ - at_exit[1] > max_age:
            return {"status": "dropped_gap"}
        state.append(
            {
                "side": side,
                "series": series,
                "funding": funding.get(exchange, symbol) if market_of(symbol) == "swap" else None,
                "fee": fee_frac(exchange, params),
                "p0": at_entry[0],
                "p1": at_exit[0],
                "s0": _slippage_at(series, entry, pos, params),
                "s1": _slippage_at(series, exit_, pos, params),
                "qty": pos / at_entry[0],
            }
        )

    fees = slippage = price_pnl = 0.0
    entry_costs = 0.0
    for leg in state:
        side, qty = leg["side"], leg["qty"]
        fill0 = leg["p0"] * (1 + side * leg["s0"])  # a buy pays above the close, a sell gets below it
        fill1 = leg["p1"] * (1 - side * leg["s1"])
        price_pnl += side * qty * (fill1 - fill0)
        fees += leg["fee"] * qty * (fill0 + fill1)
        slippage += qty * (leg["p0"] * leg["s0"] + leg["p1"] * leg["s1"])
        entry_costs += leg["fee"] * qty * fill0 + qty * leg["p0"] * leg["s0"]

    total_funding = 0.0
    count = 0
    for leg in state:
        if leg["funding"] is None:
            continue
        f, leg_count = leg["funding"], 0
        for t, rate, mark in zip(f.ts_ms, f.rate, f.mark_price, strict=True):
            if entry < t <= exit_:  # at entry: not received; at exit: received
                total_funding += -leg["side"] * rate * leg["qty"] * mark  # the short side receives rate x notional
                leg_count += 1
        count = max(count, leg_count)

    # Mark-to-market every step: closes + funding received so far - entry costs.
    step = mtm_step_minutes * MINUTE_MS
    peak, drawdown = -math.inf, 0.0
    received = [0.0 for _ in state]
    next_event = [0 for _ in state]
    for k in range(int(hold_hours) * HOUR_MS // step + 1):
        t = entry + k * step
        value = -entry_costs
        for i, leg in enumerate(state):
            f = leg["funding"]
            while f is not None and next_event[i] < len(f.ts_ms) and f.ts_ms[next_event[i]] <= t:
                j = next_event[i]
                if f.ts_ms[j] > entry:
                    received[i] += -leg["side"] * f.rate[j] * leg["qty"] * f.mark_price[j]
                next_event[i] += 1
            close = _close_at(leg["series"], t)
            assert close is not None  # a bar exists at entry, hence at every later time
            value += leg["side"] * leg["qty"] * (close[0] - leg["p0"]) + received[i]
        peak = max(peak, value)
        drawdown = max(drawdown, peak - value)

    profit = price_pnl - fees + total_funding
    return {
        "status": "ok",
        "hold_hours": int(hold_hours),
        "actual_hold_hours": float(hold_hours),
        "actual_profit_pct": profit / pos * 100.0,
        "actual_profit_usd": profit,
        "was_profitable": profit > 0,
        "peak_profit_pct": peak / pos * 100.0,
        "max_drawdown_pct": drawdown / pos * 100.0,
        "funding_payments_count": count,
        "total_funding_usd": total_funding,
        "slippage_pct": slippage / pos * 100.0,
        "fees_usd": fees,
    }
