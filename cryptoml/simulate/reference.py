"""Reference simulation of ONE position as a plain loop: the readable specification of ``positions``.

It applies the rules documented in :mod:`cryptoml.simulate.positions` directly to the raw series (bar
closes, snapshot liquidity, funding settlements) without any precomputed grid, so that the vectorised
simulator can be checked against it (tests require agreement to 1e-9 on every output). Slow by design.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptoml.config import SimulateParams
from cryptoml.market.store import market_of
from cryptoml.simulate.positions import MTM_STEP_MINUTES, FundingEvents, FundingSeries, PricePaths, PriceSeries
from cryptoml.simulate.slippage import fee_frac, slippage_frac_one
from cryptoml.simulate.snapshots import HOUR_MS, MAX_BAR_AGE_MINUTES, MINUTE_MS


@dataclass(frozen=True)
class _Leg:
    """One leg at entry: side +1 long / -1 short, closes p0/p1 and slippage fractions s0/s1 at entry/exit."""

    side: int
    series: PriceSeries
    funding: FundingSeries | None
    fee: float
    p0: float
    p1: float
    s0: float
    s1: float
    qty: float


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
    legs: list[tuple[int, str, str]] = [
        (+1, opportunity_row["long_exchange"], opportunity_row["long_symbol"]),
        (-1, opportunity_row["short_exchange"], opportunity_row["short_symbol"]),
    ]
    for _, exchange, symbol in legs:
        if exit_ > prices.get(exchange, symbol).close_ts_ms[-1]:
            return {"status": "dropped_past_data"}
        if market_of(symbol) == "swap":
            settlements = funding.get(exchange, symbol)
            if exit_ > settlements.ts_ms[-1] + settlements.interval_ms:
                return {"status": "dropped_past_data"}
    state: list[_Leg] = []
    for side, exchange, symbol in legs:
        series = prices.get(exchange, symbol)
        at_entry, at_exit = _close_at(series, entry), _close_at(series, exit_)
        if at_entry is None or at_exit is None or entry - at_entry[1] > max_age or exit_ - at_exit[1] > max_age:
            return {"status": "dropped_gap"}
        s0, s1 = _slippage_at(series, entry, pos, params), _slippage_at(series, exit_, pos, params)
        if math.isnan(s0) or math.isnan(s1):
            return {"status": "dropped_gap"}  # no liquidity snapshot to price a fill
        state.append(
            _Leg(
                side=side,
                series=series,
                funding=funding.get(exchange, symbol) if market_of(symbol) == "swap" else None,
                fee=fee_frac(exchange, params),
                p0=at_entry[0],
                p1=at_exit[0],
                s0=s0,
                s1=s1,
                qty=pos / at_entry[0],
            )
        )

    fees = slippage = price_pnl = entry_costs = 0.0
    for leg in state:
        fill0 = leg.p0 * (1 + leg.side * leg.s0)  # a buy pays above the close, a sell gets below it
        fill1 = leg.p1 * (1 - leg.side * leg.s1)
        price_pnl += leg.side * leg.qty * (fill1 - fill0)
        fees += leg.fee * leg.qty * (fill0 + fill1)
        slippage += leg.qty * (leg.p0 * leg.s0 + leg.p1 * leg.s1)
        entry_costs += leg.fee * leg.qty * fill0 + leg.qty * leg.p0 * leg.s0

    total_funding = 0.0
    count = 0
    for leg in state:
        if leg.funding is None:
            continue
        leg_count = 0
        for t, rate, mark in zip(leg.funding.ts_ms, leg.funding.rate, leg.funding.mark_price, strict=True):
            if entry < t <= exit_:  # at entry: not received; at exit: received
                total_funding += -leg.side * rate * leg.qty * mark  # the short side receives rate x notional
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
            f = leg.funding
            while f is not None and next_event[i] < len(f.ts_ms) and f.ts_ms[next_event[i]] <= t:
                j = next_event[i]
                if f.ts_ms[j] > entry:
                    received[i] += -leg.side * f.rate[j] * leg.qty * f.mark_price[j]
                next_event[i] += 1
            close = _close_at(leg.series, t)
            assert close is not None  # a bar exists at entry, hence at every later time
            value += leg.side * leg.qty * (close[0] - leg.p0) + received[i]
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
