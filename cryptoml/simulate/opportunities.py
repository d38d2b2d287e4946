"""Funding-arbitrage opportunities from snapshots: spot-perp cash-and-carry and cross-exchange perp-perp.

Candidates at each snapshot time:

- ``spot_perp`` (per exchange and base, when both markets have a fresh price): long spot / short perp
  when the funding rate is >= 0; long perp / short spot when it is < 0 and ``allow_short_spot``.
- ``cross_exchange`` (per base and pair of exchanges with perps): long the perp with the lower funding
  rate, short the higher (on a tie the exchange whose name sorts first is the long leg).

Rates in this table are per 8 h (a venue's rate x 8 / its funding interval hours, so venues with other
intervals compare fairly); a spot leg's rate is 0. ``funding_spread`` = short rate - long rate (fraction of
one leg's notional per 8 h); ``fund_profit_8h`` = funding_spread x 100 (percent), ``fund_profit_24h_proj`` =
x 3, ``fund_profit_3d_proj`` = x 9, ``fund_apr`` = x 3 x 365. ``break_even_hours`` = round-trip costs (4
taker fees + 4 slippages at the entry spread/depth) / hourly funding income, ``BREAK_EVEN_CAP_HOURS`` when
the spread is <= 0 or the ratio is larger. ``spread_volatility_cv`` = population std / |mean| of the pair's
funding spread over the snapshots in (ts - 3 d, ts] (sign-free, so it is shared by both directions); 0 when
the spread did not vary, ``CV_CAP`` when it varied around a zero mean. Leg aggregates: volume_24h and
orderbook_depth_usd are minima, bid_ask_spread_pct a sum, ret_vol_24h a max (perp legs only: snapshots carry
no spot volatility), depth_is_proxy an OR of the snapshot rows involved. Rows failing any threshold of
:class:`OpportunityParams` are dropped; the rest are sorted by ts_ms then opportunity_id.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cryptoml.config import OpportunityParams, SimulateParams
from cryptoml.errors import DataValidationError
from cryptoml.simulate.entry import BREAK_EVEN_CAP_HOURS as BREAK_EVEN_CAP_HOURS  # re-exported
from cryptoml.simulate.entry import (
    CV_CAP,
    CV_EPS,
    CV_WINDOW_MS,
    REFERENCE_INTERVAL_HOURS,
    break_even_hours,
    funding_yields,
    leg_round_trip_cost,
)

OPPORTUNITY_COLUMNS = [
    "ts_ms", "opportunity_id", "strategy", "base", "long_exchange", "long_market", "long_symbol",
    "short_exchange", "short_market", "short_symbol", "long_price", "short_price", "funding_rate_long",
    "funding_rate_short", "funding_spread", "fund_profit_8h", "fund_apr", "fund_profit_24h_proj",
    "fund_profit_3d_proj", "break_even_hours", "spread_volatility_cv", "funding_spread_avg_24h",
    "funding_spread_avg_3d", "volume_24h", "bid_ask_spread_pct", "orderbook_depth_usd", "depth_is_proxy",
    "liquidity_status", "ret_vol_24h", "next_funding_ts_ms", "btc_price", "btc_volume_24h_usd",
    "btc_ret_trailing", "regime",
]  # fmt: skip
SNAPSHOT_INPUT = [
    "ts_ms", "exchange", "base", "spot_symbol", "perp_symbol", "spot_price", "perp_price", "funding_rate",
    "funding_avg_24h", "funding_avg_3d", "next_funding_ts_ms", "volume_24h_usd", "spot_volume_24h_usd",
    "bid_ask_spread_pct", "spot_bid_ask_spread_pct", "orderbook_depth_usd", "spot_orderbook_depth_usd",
    "depth_is_proxy", "ret_vol_24h", "btc_price", "btc_volume_24h_usd", "btc_ret_trailing", "regime",
]  # fmt: skip
LEG_COLUMNS = ["exchange", "market", "symbol", "price", "rate", "avg24", "avg3d", "spread", "depth", "volume"]
SHARED = ["ts_ms", "base", "next_funding_ts_ms", "ret_vol_24h", "depth_is_proxy", "btc_price",
          "btc_volume_24h_usd", "btc_ret_trailing", "regime"]  # fmt: skip


def _legs(snaps: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Perp and spot leg tables aligned with the snapshot rows (rates scaled to 8 h)."""
    hours = snaps.get("funding_interval_hours", REFERENCE_INTERVAL_HOURS)
    scale = REFERENCE_INTERVAL_HOURS / hours
    shared = snaps[SHARED]
    perp = shared.assign(
        exchange=snaps["exchange"], market="swap", symbol=snaps["perp_symbol"], price=snaps["perp_price"],
        rate=snaps["funding_rate"] * scale, avg24=snaps["funding_avg_24h"] * scale,
        avg3d=snaps["funding_avg_3d"] * scale, spread=snaps["bid_ask_spread_pct"],
        depth=snaps["orderbook_depth_usd"], volume=snaps["volume_24h_usd"],
    )  # fmt: skip
    spot = shared.assign(
        exchange=snaps["exchange"], market="spot", symbol=snaps["spot_symbol"], price=snaps["spot_price"],
        rate=0.0, avg24=0.0, avg3d=0.0, spread=snaps["spot_bid_ask_spread_pct"],
        depth=snaps["spot_orderbook_depth_usd"], volume=snaps["spot_volume_24h_usd"],
    )  # fmt: skip
    return perp, spot


def rolling_cv(
    pair_key: np.ndarray, ts_ms: np.ndarray, values: np.ndarray, window_ms: int = CV_WINDOW_MS
) -> np.ndarray:
    """Population std / |mean| of ``values`` per pair over (ts - window, ts], in the input row order."""
    codes = pd.factorize(pd.Series(pair_key))[0].astype(np.int64)
    order = np.lexsort((ts_ms, codes))
    c, t, v = codes[order], ts_ms[order].astype(np.int64), values[order].astype(np.float64)
    # Subtracting each pair's first value keeps the prefix sums small (a constant spread gives var 0).
    first = v[np.searchsorted(c, c, side="left")]
    d = v - first
    comb = (c << 43) | t  # sorted key: pair code then time (epoch ms < 2^43 until the year 2248)
    lo = np.searchsorted(comb, comb - window_ms, side="right")
    hi = np.arange(1, len(v) + 1)
    s1 = np.concatenate([[0.0], np.cumsum(d)])
    s2 = np.concatenate([[0.0], np.cumsum(d * d)])
    n = hi - lo
    mean_d = (s1[hi] - s1[lo]) / n
    std = np.sqrt(np.maximum((s2[hi] - s2[lo]) / n - mean_d**2, 0.0))
    mean = np.abs(mean_d + first)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(std < CV_EPS, 0.0, np.where(mean < CV_EPS, CV_CAP, np.minimum(std / mean, CV_CAP)))
    out = np.empty_like(cv)
    out[order] = cv
    return out


def _break_even_hours(long: pd.DataFrame, short: pd.DataFrame, spread: np.ndarray, sim: SimulateParams) -> np.ndarray:
    """Hours of funding at the current spread needed to pay 4 fees and 4 slippages (entry estimates)."""
    cost = sum(
        leg_round_trip_cost(leg["exchange"].to_numpy(), leg["spread"], leg["depth"], sim) for leg in (long, short)
    )
    return break_even_hours(cost, spread)


def _assemble(
    strategy: str, long: pd.DataFrame, short: pd.DataFrame, shared: pd.DataFrame, cv: np.ndarray, sim: SimulateParams
) -> pd.DataFrame:
    """Contract columns of oriented pairs (rows of ``long``, ``short``, ``shared`` aligned)."""
    spread = short["rate"].to_numpy() - long["rate"].to_numpy()
    out = pd.DataFrame(
        {"ts_ms": shared["ts_ms"].to_numpy(np.int64), "strategy": strategy, "base": shared["base"].to_numpy()}
    )
    for side, leg in (("long", long), ("short", short)):
        for col in ("exchange", "market", "symbol", "price"):
            out[f"{side}_{col}"] = leg[col].to_numpy()
    out["opportunity_id"] = (
        strategy + ":" + out["base"] + ":" + out["long_exchange"] + "-" + out["long_market"] + ":"
        + out["short_exchange"] + "-" + out["short_market"]
    )  # fmt: skip
    out["funding_rate_long"] = long["rate"].to_numpy()
    out["funding_rate_short"] = short["rate"].to_numpy()
    out["funding_spread"] = spread
    for key, value in funding_yields(spread).items():
        out[key] = value
    out["break_even_hours"] = _break_even_hours(long, short, spread, sim)
    out["spread_volatility_cv"] = cv
    out["funding_spread_avg_24h"] = short["avg24"].to_numpy() - long["avg24"].to_numpy()
    out["funding_spread_avg_3d"] = short["avg3d"].to_numpy() - long["avg3d"].to_numpy()
    out["volume_24h"] = np.minimum(long["volume"].to_numpy(), short["volume"].to_numpy())
    out["bid_ask_spread_pct"] = long["spread"].to_numpy() + short["spread"].to_numpy()
    out["orderbook_depth_usd"] = np.minimum(long["depth"].to_numpy(), short["depth"].to_numpy())
    for col in ("depth_is_proxy", "ret_vol_24h", "next_funding_ts_ms", "btc_price", "btc_volume_24h_usd",
                "btc_ret_trailing", "regime"):  # fmt: skip
        out[col] = shared[col].to_numpy()
    return out


def _choose(mask: np.ndarray, a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Leg columns taken row-wise from ``a`` where mask, else from ``b`` (rows aligned)."""
    return pd.DataFrame({c: np.where(mask, a[c].to_numpy(), b[c].to_numpy()) for c in LEG_COLUMNS})


def _spot_perp(perp: pd.DataFrame, spot: pd.DataFrame, allow_short_spot: bool, sim: SimulateParams) -> pd.DataFrame:
    ok = (perp["price"].notna() & spot["price"].notna() & perp["rate"].notna()).to_numpy()
    perp, spot = perp[ok].reset_index(drop=True), spot[ok].reset_index(drop=True)
    key = ("spot_perp:" + perp["base"] + ":" + perp["exchange"]).to_numpy()
    cv = rolling_cv(key, perp["ts_ms"].to_numpy(np.int64), perp["rate"].to_numpy(np.float64))
    short_perp = (perp["rate"] >= 0).to_numpy()
    keep = short_perp | allow_short_spot
    long, short = _choose(short_perp, spot, perp), _choose(short_perp, perp, spot)
    return _assemble("spot_perp", long[keep], short[keep], perp[keep], cv[keep], sim)


def _cross(perp: pd.DataFrame, sim: SimulateParams) -> pd.DataFrame:
    p = perp[perp["price"].notna() & perp["rate"].notna()]
    pairs = p.merge(p, on=["ts_ms", "base"], suffixes=("_a", "_b"))
    pairs = pairs[pairs["exchange_a"] < pairs["exchange_b"]].reset_index(drop=True)
    a = pairs[[f"{c}_a" for c in LEG_COLUMNS]].set_axis(LEG_COLUMNS, axis=1)
    b = pairs[[f"{c}_b" for c in LEG_COLUMNS]].set_axis(LEG_COLUMNS, axis=1)
    key = ("cross:" + pairs["base"] + ":" + a["exchange"] + ":" + b["exchange"]).to_numpy()
    cv = rolling_cv(key, pairs["ts_ms"].to_numpy(np.int64), (b["rate"] - a["rate"]).to_numpy(np.float64))
    long_a = (a["rate"] <= b["rate"]).to_numpy()
    shared = pairs[["ts_ms", "base"]].copy()
    shared["depth_is_proxy"] = pairs["depth_is_proxy_a"] | pairs["depth_is_proxy_b"]
    shared["ret_vol_24h"] = np.fmax(pairs["ret_vol_24h_a"], pairs["ret_vol_24h_b"])
    shared["next_funding_ts_ms"] = np.minimum(pairs["next_funding_ts_ms_a"], pairs["next_funding_ts_ms_b"])
    for col in ("btc_price", "btc_volume_24h_usd", "btc_ret_trailing", "regime"):
        shared[col] = pairs[f"{col}_a"]
    return _assemble("cross_exchange", _choose(long_a, a, b), _choose(long_a, b, a), shared, cv, sim)


def detect_opportunities(snapshots: pd.DataFrame, params: OpportunityParams, sim: SimulateParams) -> pd.DataFrame:
    """Opportunities (``OPPORTUNITY_COLUMNS``) passing the thresholds of ``params`` at every snapshot time."""
    missing = [c for c in SNAPSHOT_INPUT if c not in snapshots.columns]
    if missing:
        raise DataValidationError(f"snapshots: missing columns {missing}")
    if snapshots.empty:
        raise DataValidationError("snapshots: the frame is empty; no opportunity can be detected")
    perp, spot = _legs(snapshots.reset_index(drop=True))
    frames = []
    if "spot_perp" in params.strategies:
        frames.append(_spot_perp(perp, spot, params.allow_short_spot, sim))
    if "cross_exchange" in params.strategies:
        frames.append(_cross(perp, sim))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=OPPORTUNITY_COLUMNS)
    opps = pd.concat(frames, ignore_index=True)
    opps = opps[
        (opps["fund_apr"] >= params.min_fund_apr_pct)
        & (opps["volume_24h"] >= params.min_volume_24h_usd)
        & (opps["bid_ask_spread_pct"] <= params.max_bid_ask_spread_pct)
        & (opps["orderbook_depth_usd"] >= params.min_depth_usd)
    ].reset_index(drop=True)
    depth = opps["orderbook_depth_usd"].to_numpy(np.float64)
    opps["liquidity_status"] = np.where(
        depth >= params.high_liquidity_depth_usd,
        "high",
        np.where(depth >= params.medium_liquidity_depth_usd, "medium", "low"),
    )
    opps = opps.sort_values(["ts_ms", "opportunity_id"], kind="stable").reset_index(drop=True)
    return opps[OPPORTUNITY_COLUMNS]
