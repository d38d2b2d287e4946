"""Vectorised simulation of every opportunity held for every ``SimulateParams.hold_hours`` duration.

Each position buys ``position_usd`` of the long leg and sells ``position_usd`` of the short leg at the
opportunity's ``ts_ms`` and unwinds both ``hold_hours`` later. Rules (``reference.simulate_one`` is the
same model written as a plain loop; the tests hold both to 1e-9):

- Prices: a leg's price at time t is the close of its last bar closed at or before t (bar close time =
  open time + bar length), so a data gap inside the hold carries the last close forward. Quantities are
  fixed at entry: qty = position_usd / entry close.
- Fills: the long leg buys at close x (1 + s) and sells at close x (1 - s), the short leg the reverse, with
  s = ``slippage.slippage_frac`` of the leg's latest snapshot spread/depth at or before the fill time.
  Each of the 4 fills pays the taker fee of its exchange on the fill's notional (qty x fill price).
- Funding: every settlement of a perp leg with time in (entry, exit] — one exactly at entry is NOT
  received, one exactly at exit IS — pays rate x qty x mark price at that settlement to the short side
  (the long side pays it; a negative rate reverses both). Spot legs get nothing. The mark is the stored
  ``mark_price``, else the perp's close at or before the settlement. Settlement times are rounded to the
  minute (as in the snapshots). ``funding_payments_count`` is the number of settlements in the window
  (the max over the perp legs, so a 24 h hold on 8 h venues counts 3).
- Mark-to-market path: sampled on the grid entry + k x ``mtm_step_minutes`` (5 min, the snapshot grid),
  k = 0..hold; value = price PnL at closes + funding received so far - entry fees - entry slippage (exit
  costs excluded). peak_profit_pct = its max; max_drawdown_pct = the largest fall from a running peak.
- Dropped, never truncated: exit after a leg's last bar close, or after a perp leg's last settlement +
  one funding interval -> ``dropped_past_data``; no bar at most ``MAX_BAR_AGE_MINUTES`` old at entry or
  at exit (a data gap), or no snapshot liquidity at or before a fill -> ``dropped_gap``.
  ``actual_hold_hours`` therefore always equals hold_hours.

Speed: every series is resampled once onto a common grid (step ``mtm_step_minutes``) holding the close,
bar age, cumulative funding and latest liquidity; a position then reads O(1) cells per output. The path
of an opportunity is one row of a sliding-window view over that grid, shared by all of its holds; its
running peak and drawdown come from a blocked scan over one-hour blocks (``_path_extremes``), run on
cache-sized blocks of opportunities. Python loops run per chunk, per hold and per step of an hour only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryptoml.config import SimulateParams
from cryptoml.errors import DataValidationError
from cryptoml.market.store import market_of
from cryptoml.simulate.slippage import fee_frac, slippage_frac
from cryptoml.simulate.snapshots import (
    HOUR_MS,
    MAX_BAR_AGE_MINUTES,
    MINUTE_MS,
    MarketFrames,
    SeriesKey,
    funding_arrays,
    funding_interval_ms,
    ohlcv_arrays,
)

MTM_STEP_MINUTES = 5  # mark-to-market grid (not yet a SimulateParams knob)
MAX_PATH_CELLS = 65_536  # cells of one (opportunities x path) float64 block: 512 KB, fits in L2
OUTPUT_COLUMNS = [
    "hold_hours", "actual_hold_hours", "actual_profit_pct", "actual_profit_usd", "was_profitable",
    "peak_profit_pct", "max_drawdown_pct", "funding_payments_count", "total_funding_usd", "slippage_pct",
    "fees_usd",
]  # fmt: skip
REQUIRED_COLUMNS = ["ts_ms", "long_exchange", "long_symbol", "short_exchange", "short_symbol"]


@dataclass(frozen=True)
class PriceSeries:
    """One market: bar close times (ms, sorted) and closes; snapshot times with spread (%) and depth (USD)."""

    close_ts_ms: np.ndarray
    close: np.ndarray
    liq_ts_ms: np.ndarray
    spread_pct: np.ndarray
    depth_usd: np.ndarray


@dataclass(frozen=True)
class FundingSeries:
    """One perp's settlements: times (ms, rounded to the minute), rate per interval, mark price (filled)."""

    ts_ms: np.ndarray
    rate: np.ndarray
    mark_price: np.ndarray
    interval_ms: int


@dataclass(frozen=True)
class PricePaths:
    series: Mapping[SeriesKey, PriceSeries]

    def get(self, exchange: str, symbol: str) -> PriceSeries:
        if (exchange, symbol) not in self.series:
            raise DataValidationError(f"no price path for {exchange} {symbol}: its candles were not loaded")
        return self.series[(exchange, symbol)]


@dataclass(frozen=True)
class FundingEvents:
    series: Mapping[SeriesKey, FundingSeries]

    def get(self, exchange: str, symbol: str) -> FundingSeries:
        if (exchange, symbol) not in self.series:
            raise DataValidationError(f"no funding events for {exchange} {symbol}: a perp leg needs them")
        return self.series[(exchange, symbol)]


@dataclass(frozen=True)
class SimulationResult:
    """Simulated positions (contract columns) and how many were dropped instead of being truncated."""

    positions: pd.DataFrame
    dropped_past_data: int
    dropped_gap: int


def build_price_paths(frames: MarketFrames, snapshots: pd.DataFrame) -> PricePaths:
    """Close paths of every candle series, with the spread/depth each snapshot row recorded for it."""
    perp = snapshots[["ts_ms", "exchange", "perp_symbol", "bid_ask_spread_pct", "orderbook_depth_usd"]]
    spot = snapshots[["ts_ms", "exchange", "spot_symbol", "spot_bid_ask_spread_pct", "spot_orderbook_depth_usd"]]
    liq = pd.concat(
        [
            perp.set_axis(["ts_ms", "exchange", "symbol", "spread", "depth"], axis=1),
            spot.set_axis(["ts_ms", "exchange", "symbol", "spread", "depth"], axis=1),
        ]
    )
    liq = liq[liq["spread"].notna()].sort_values("ts_ms", kind="stable")
    by_key = {k: g for k, g in liq.groupby(["exchange", "symbol"], sort=False)}
    out = {}
    for key, df in frames.ohlcv.items():
        close_ts, close, _ = ohlcv_arrays(df, frames.bar_ms, f"{key[0]} {key[1]} candles")
        g = by_key.get(key)
        empty = np.empty(0)
        out[key] = PriceSeries(
            close_ts_ms=close_ts,
            close=close,
            liq_ts_ms=g["ts_ms"].to_numpy(np.int64) if g is not None else np.empty(0, np.int64),
            spread_pct=g["spread"].to_numpy(np.float64) if g is not None else empty,
            depth_usd=g["depth"].to_numpy(np.float64) if g is not None else empty,
        )
    return PricePaths(out)


def build_funding_events(frames: MarketFrames, prices: PricePaths) -> FundingEvents:
    """Settlements of every perp; a missing mark price is the perp's close at or before the settlement."""
    out = {}
    for key, df in frames.funding.items():
        ts, rate, mark = funding_arrays(df, f"{key[0]} {key[1]} funding")
        if key in prices.series and np.isnan(mark).any():
            p = prices.series[key]
            j = np.searchsorted(p.close_ts_ms, ts, side="right") - 1
            # Before the first bar no position can be open; the first close keeps the sums finite.
            mark = np.where(np.isnan(mark), p.close[np.maximum(j, 0)], mark)
        out[key] = FundingSeries(ts, rate, mark, funding_interval_ms(ts))
    return FundingEvents(out)


@dataclass(frozen=True)
class _Grid:
    """Every used series resampled at origin + i x step, concatenated (each block padded with NaN)."""

    origin: int
    n: int  # grid points per series
    offsets: np.ndarray  # start of each series' block in the flat arrays
    value: np.ndarray  # close - cumulative funding (rate x mark): the per-unit MTM of a long
    close: np.ndarray
    age_ms: np.ndarray  # time since the close's bar closed (inf: no bar yet)
    fcum: np.ndarray  # cumulative rate x mark of settlements <= t (0 for spot)
    fcnt: np.ndarray  # number of settlements <= t
    spread_pct: np.ndarray
    depth_usd: np.ndarray
    end_ms: np.ndarray  # per series: a position must exit at or before this time


def _resample(keys: list[SeriesKey], prices: PricePaths, funding: FundingEvents, step: int, pad: int) -> _Grid:
    series = [prices.get(*k) for k in keys]
    origin = min(int(s.close_ts_ms[0]) for s in series) // step * step
    last = max(int(s.close_ts_ms[-1]) for s in series)
    n = (last - origin) // step + 1
    grid = origin + step * np.arange(n, dtype=np.int64)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("value", "close", "age", "fcum", "fcnt", "spread", "depth")}
    fill = {
        "value": np.nan,
        "close": np.nan,
        "age": np.inf,
        "fcum": np.nan,
        "fcnt": 0.0,
        "spread": np.nan,
        "depth": np.nan,
    }
    end_ms = []
    for key, s in zip(keys, series, strict=True):
        j = np.searchsorted(s.close_ts_ms, grid, side="right") - 1
        has = j >= 0
        close = np.where(has, s.close[np.maximum(j, 0)], np.nan)
        age = np.where(has, (grid - s.close_ts_ms[np.maximum(j, 0)]).astype(np.float64), np.inf)
        fcum, fcnt, end = np.zeros(n), np.zeros(n), int(s.close_ts_ms[-1])
        if market_of(key[1]) == "swap":
            f = funding.get(*key)
            k = np.searchsorted(f.ts_ms, grid, side="right")
            fcum = np.concatenate([[0.0], np.cumsum(f.rate * f.mark_price)])[k]
            fcnt = k.astype(np.float64)
            end = min(end, int(f.ts_ms[-1]) + f.interval_ms)
        li = np.searchsorted(s.liq_ts_ms, grid, side="right") - 1
        lhas = li >= 0
        for name, arr in (
            ("value", close - fcum), ("close", close), ("age", age), ("fcum", fcum), ("fcnt", fcnt),
            ("spread", np.where(lhas, s.spread_pct[np.maximum(li, 0)] if len(s.liq_ts_ms) else np.nan, np.nan)),
            ("depth", np.where(lhas, s.depth_usd[np.maximum(li, 0)] if len(s.liq_ts_ms) else np.nan, np.nan)),
        ):  # fmt: skip
            cols[name] += [arr, np.full(pad, fill[name])]
        end_ms.append(end)
    flat = {k: np.concatenate(v) for k, v in cols.items()}
    return _Grid(
        origin=origin, n=n, offsets=np.arange(len(keys), dtype=np.int64) * (n + pad),
        value=flat["value"], close=flat["close"], age_ms=flat["age"], fcum=flat["fcum"], fcnt=flat["fcnt"],
        spread_pct=flat["spread"], depth_usd=flat["depth"], end_ms=np.asarray(end_ms, dtype=np.int64),
    )  # fmt: skip


def _empty_result(opportunities: pd.DataFrame, dropped_past: int = 0, dropped_gap: int = 0) -> SimulationResult:
    cols = [*opportunities.columns, *(c for c in OUTPUT_COLUMNS if c not in opportunities.columns)]
    return SimulationResult(pd.DataFrame(columns=cols), dropped_past, dropped_gap)


def _series_codes(opps: pd.DataFrame) -> tuple[list[SeriesKey], np.ndarray, np.ndarray]:
    """Distinct (exchange, symbol) legs and each opportunity's long / short leg code."""
    n = len(opps)
    exchange = pd.concat([opps["long_exchange"], opps["short_exchange"]], ignore_index=True).astype(str)
    symbol = pd.concat([opps["long_symbol"], opps["short_symbol"]], ignore_index=True).astype(str)
    codes, uniques = pd.factorize(exchange + "\x00" + symbol)
    keys = [(str(u).split("\x00")[0], str(u).split("\x00")[1]) for u in uniques]
    return keys, codes[:n].astype(np.int64), codes[n:].astype(np.int64)


def _fees(exchanges: pd.Series, params: SimulateParams) -> np.ndarray:
    codes, uniques = pd.factorize(exchanges.astype(str))
    return np.array([fee_frac(str(e), params) for e in uniques], dtype=np.float64)[codes]


def _path_extremes(
    windows: np.ndarray, il: np.ndarray, ish: np.ndarray, ratio: np.ndarray, hold_hours: np.ndarray, per_hour: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running peak and max drawdown of u(k) = V_long(k) - ratio x V_short(k), read at each hold's exit.

    ``windows`` rows are the grid paths starting at entry (k = 0 .. max hold). Blocked scan: the path after
    k = 0 is cut into one-hour blocks of ``per_hour`` steps (every exit ends a block); block maxima give the
    peak before each block, then one pass per in-block step tracks the running peak and the deepest fall
    below it. Returns two (n, len(hold_hours)) arrays in u units (drawdown >= 0).
    """
    m, n_blocks = len(il), int(hold_hours.max())
    u = windows[il]
    short = windows[ish]
    short *= ratio[:, None]
    u -= short
    blocks = u[:, 1:].reshape(m, n_blocks, per_hour)
    peak = np.empty((m, n_blocks + 1))  # peak[:, b] = max of u over k <= b hours
    peak[:, 0] = u[:, 0]
    block_max = peak[:, 1:]
    block_max[...] = blocks[:, :, 0]
    for j in range(1, per_hour):  # a strided pass per step beats a reduction over a short axis
        np.maximum(block_max, blocks[:, :, j], out=block_max)
    np.maximum.accumulate(peak, axis=1, out=peak)
    running = peak[:, :-1].copy()  # the peak before each block, then within it
    drawdown = np.zeros((m, n_blocks))
    fall = np.empty((m, n_blocks))
    for j in range(per_hour):
        step = blocks[:, :, j]
        np.maximum(running, step, out=running)
        np.subtract(running, step, out=fall)
        np.maximum(drawdown, fall, out=drawdown)
    np.maximum.accumulate(drawdown, axis=1, out=drawdown)
    return peak[:, hold_hours], drawdown[:, hold_hours - 1]


def simulate_positions(
    opportunities: pd.DataFrame,
    prices: PricePaths,
    funding: FundingEvents,
    params: SimulateParams,
    *,
    mtm_step_minutes: int = MTM_STEP_MINUTES,
) -> SimulationResult:
    """One row per opportunity x hold (opportunity columns + ``OUTPUT_COLUMNS``), in opportunity order.

    Opportunity times must lie on the ``mtm_step_minutes`` grid (snapshot times do). No Python loop runs
    per position: only per chunk of opportunities, per hold duration and per step of an hour.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in opportunities.columns]
    if missing:
        raise DataValidationError(f"opportunities: missing columns {missing}")
    if mtm_step_minutes <= 0 or 60 % mtm_step_minutes:
        raise DataValidationError(f"mtm_step_minutes={mtm_step_minutes} must be > 0 and divide 60")
    step = mtm_step_minutes * MINUTE_MS
    if opportunities.empty:
        return _empty_result(opportunities)
    ts = opportunities["ts_ms"].to_numpy(np.int64)
    if (ts % step).any():
        bad = int(ts[(ts % step) != 0][0])
        raise DataValidationError(f"opportunity ts_ms {bad} is not on the {mtm_step_minutes}-minute grid")
    holds = np.asarray(params.hold_hours, dtype=np.int64)
    per_hour = HOUR_MS // step
    n_path = int(holds.max()) * per_hour + 1
    keys, code_l, code_s = _series_codes(opportunities)
    fee_l, fee_s = _fees(opportunities["long_exchange"], params), _fees(opportunities["short_exchange"], params)
    grid = _resample(keys, prices, funding, step, pad=n_path)
    windows = np.lib.stride_tricks.sliding_window_view(grid.value, n_path)
    max_age = MAX_BAR_AGE_MINUTES * MINUTE_MS

    n_opp, n_hold = len(ts), len(holds)
    res = {c: np.full((n_opp, n_hold), np.nan) for c in OUTPUT_COLUMNS if c not in ("hold_hours", "was_profitable")}
    status = np.zeros((n_opp, n_hold), dtype=np.int8)  # 0 kept, 1 past the data, 2 gap
    per_chunk = max(1, params.chunk_positions // n_hold)
    per_path_block = max(1, MAX_PATH_CELLS // n_path)  # small blocks stay in cache
    pos = params.position_usd
    for lo in range(0, n_opp, per_chunk):
        sl = slice(lo, min(lo + per_chunk, n_opp))
        g0 = (ts[sl] - grid.origin) // step
        inside = (g0 >= 0) & (g0 < grid.n)
        g0 = np.clip(g0, 0, grid.n - 1)
        il, ish = grid.offsets[code_l[sl]] + g0, grid.offsets[code_s[sl]] + g0
        fl, fs = fee_l[sl], fee_s[sl]
        pl0, ps0 = grid.close[il], grid.close[ish]
        sl0 = slippage_frac(grid.spread_pct[il], grid.depth_usd[il], pos, params)
        ss0 = slippage_frac(grid.spread_pct[ish], grid.depth_usd[ish], pos, params)
        qty_l, qty_s = pos / pl0, pos / ps0
        entry_ok = inside & (grid.age_ms[il] <= max_age) & (grid.age_ms[ish] <= max_age)
        entry_ok &= ~(np.isnan(sl0) | np.isnan(ss0))
        entry_slip = qty_l * pl0 * sl0 + qty_s * ps0 * ss0
        entry_fees = fl * qty_l * pl0 * (1 + sl0) + fs * qty_s * ps0 * (1 - ss0)

        # MTM(k) = qty_l x (u(k) - u(0)) - entry costs, u = V_long - (qty_s / qty_l) x V_short.
        ratio = qty_s / qty_l
        peak_u, drawdown_u = np.empty((len(il), n_hold)), np.empty((len(il), n_hold))
        for b in range(0, len(il), per_path_block):
            bs = slice(b, b + per_path_block)
            peak_u[bs], drawdown_u[bs] = _path_extremes(windows, il[bs], ish[bs], ratio[bs], holds, per_hour)
        u0 = grid.value[il] - ratio * grid.value[ish]
        peak_usd = qty_l[:, None] * (peak_u - u0[:, None]) - (entry_slip + entry_fees)[:, None]
        drawdown_usd = qty_l[:, None] * drawdown_u

        for h, hold in enumerate(holds):
            exit_ts = ts[sl] + int(hold) * HOUR_MS
            jl, js = il + int(hold) * per_hour, ish + int(hold) * per_hour
            past = (exit_ts > grid.end_ms[code_l[sl]]) | (exit_ts > grid.end_ms[code_s[sl]])
            exit_ok = (grid.age_ms[jl] <= max_age) & (grid.age_ms[js] <= max_age)
            pl1, ps1 = grid.close[jl], grid.close[js]
            sl1 = slippage_frac(grid.spread_pct[jl], grid.depth_usd[jl], pos, params)
            ss1 = slippage_frac(grid.spread_pct[js], grid.depth_usd[js], pos, params)
            exit_ok &= ~(np.isnan(sl1) | np.isnan(ss1))
            status[sl, h] = np.where(past, 1, np.where(entry_ok & exit_ok, 0, 2))
            price_pnl = qty_l * (pl1 * (1 - sl1) - pl0 * (1 + sl0)) + qty_s * (ps0 * (1 - ss0) - ps1 * (1 + ss1))
            funding_usd = qty_s * (grid.fcum[js] - grid.fcum[ish]) - qty_l * (grid.fcum[jl] - grid.fcum[il])
            fees = entry_fees + fl * qty_l * pl1 * (1 - sl1) + fs * qty_s * ps1 * (1 + ss1)
            slip = entry_slip + qty_l * pl1 * sl1 + qty_s * ps1 * ss1
            profit = price_pnl - fees + funding_usd
            count = np.maximum(grid.fcnt[jl] - grid.fcnt[il], grid.fcnt[js] - grid.fcnt[ish])
            res["actual_hold_hours"][sl, h] = float(hold)
            res["actual_profit_usd"][sl, h] = profit
            res["actual_profit_pct"][sl, h] = profit / pos * 100.0
            res["peak_profit_pct"][sl, h] = peak_usd[:, h] / pos * 100.0
            res["max_drawdown_pct"][sl, h] = drawdown_usd[:, h] / pos * 100.0
            res["funding_payments_count"][sl, h] = count
            res["total_funding_usd"][sl, h] = funding_usd
            res["slippage_pct"][sl, h] = slip / pos * 100.0
            res["fees_usd"][sl, h] = fees

    flat_status = status.ravel()
    kept = np.flatnonzero(flat_status == 0)
    dropped_past, dropped_gap = int((flat_status == 1).sum()), int((flat_status == 2).sum())
    if not len(kept):
        return _empty_result(opportunities, dropped_past, dropped_gap)
    out = opportunities.iloc[kept // n_hold].reset_index(drop=True)
    out["hold_hours"] = holds[kept % n_hold]
    for c in OUTPUT_COLUMNS:
        if c in res:
            out[c] = res[c].ravel()[kept]
    out["funding_payments_count"] = out["funding_payments_count"].astype(np.int64)
    out["was_profitable"] = out["actual_profit_usd"].to_numpy() > 0
    return SimulationResult(out[[*opportunities.columns, *OUTPUT_COLUMNS]], dropped_past, dropped_gap)
