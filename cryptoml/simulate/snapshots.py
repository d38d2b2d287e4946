"""Market snapshots every few minutes per exchange and base, rebuilt from stored candles, funding and books.

A snapshot at ``ts_ms`` (a multiple of ``SnapshotParams.interval_minutes``) sees only data stamped at or
before ``ts_ms``: candles whose bar has **closed** by then (bar open time + bar length <= ts_ms), funding
settled at or before ts_ms, books taken at or before ts_ms. Prices are the close of the last closed bar.

Conventions (all UTC epoch ms; rates are fractions per funding interval; ``*_pct`` are percent):

- Funding times are rounded to the nearest minute: exchanges stamp a settlement a few ms after the hour
  (Binance 00:00:00.017) and the position simulator uses the same rounded times.
- ``funding_rate`` is the last settled rate (the best estimate of the current interval's rate from
  history); ``funding_avg_24h`` / ``funding_avg_3d`` average the rates settled in (ts - window, ts] (the
  last rate when none is). ``next_funding_ts_ms`` follows the schedule (last settlement + k x interval);
  the interval is the perp's median spacing of settlements, rounded to the hour (exchange metadata).
- ``funding_interval_hours`` is an extra column (not in the contract) so projections can be scaled to 8 h.
- Windows over bars, (ts - 24 h, ts] on bar close times, use whatever history exists (partial at the
  start). ``ret_vol_24h`` is the std of per-bar log returns scaled to one minute (/ sqrt(bar minutes)).
- Spread and depth come from the latest book at or before ts if it is at most ``book_max_age_minutes``
  old: spread = (best ask - best bid) / mid x 100, depth = price x size summed over the top
  ``BOOK_DEPTH_LEVELS`` levels of both sides. Otherwise a proxy: depth = proxy_depth_fraction x 24 h USD
  volume, spread = proxy_spread_bps / 100 + ``PROXY_SPREAD_VOL_MULT`` x ret_vol_24h x 100, and
  ``depth_is_proxy`` is set (for the perp or the spot leg of the row).
- A row needs a perp bar at most ``MAX_BAR_AGE_MINUTES`` old and a settled funding rate at most
  ``FUNDING_MAX_AGE_INTERVALS`` intervals old; otherwise it is left out. A stale or absent spot market
  leaves the spot columns NaN.
- Regime: ``btc_ret_trailing`` = BTC close at ts / the last close at or before ts - regime_lookback - 1
  (the first close when the history is shorter), > bull_threshold -> Bull, < bear_threshold -> Bear, else
  Ranging. The BTC series is the ``btc_base`` perp of the first exchange that has one, else its spot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cryptoml.config import SnapshotParams, timeframe_ms
from cryptoml.errors import DataValidationError
from cryptoml.market.store import DatasetKey, ParquetStore

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# Knobs not (yet) in SnapshotParams.
MAX_BAR_AGE_MINUTES = 15  # a price older than this is stale (data gap)
BOOK_DEPTH_LEVELS = 10  # top-N levels per side summed into orderbook_depth_usd
PROXY_SPREAD_VOL_MULT = 0.5  # proxy spread widening per unit of 1m return volatility
FUNDING_MAX_AGE_INTERVALS = 2  # a settled rate older than this many intervals is unknown
DEFAULT_FUNDING_INTERVAL_HOURS = 8  # when a perp has a single settlement

SeriesKey = tuple[str, str]  # (exchange, unified symbol)

SNAPSHOT_COLUMNS = [
    "ts_ms", "exchange", "base", "spot_symbol", "perp_symbol", "spot_price", "perp_price",
    "funding_rate", "next_funding_ts_ms", "funding_avg_24h", "funding_avg_3d", "funding_interval_hours",
    "volume_24h_usd", "spot_volume_24h_usd", "bid_ask_spread_pct", "spot_bid_ask_spread_pct",
    "orderbook_depth_usd", "spot_orderbook_depth_usd", "depth_is_proxy", "ret_vol_24h",
    "btc_price", "btc_volume_24h_usd", "btc_ret_trailing", "regime",
]  # fmt: skip


@dataclass(frozen=True)
class MarketFrames:
    """Raw frames per (exchange, unified symbol) in the store's schemas; candles are ``bar_ms`` long."""

    ohlcv: Mapping[SeriesKey, pd.DataFrame]
    funding: Mapping[SeriesKey, pd.DataFrame] = field(default_factory=dict)
    books: Mapping[SeriesKey, pd.DataFrame] = field(default_factory=dict)
    bar_ms: int = MINUTE_MS


def spot_symbol(base: str, quote: str) -> str:
    return f"{base}/{quote}"


def perp_symbol(base: str, quote: str) -> str:
    return f"{base}/{quote}:{quote}"


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataValidationError(f"{what}: missing columns {missing}; has {list(df.columns)}")
    if df.empty:
        raise DataValidationError(f"{what}: the frame is empty")


def ohlcv_arrays(df: pd.DataFrame, bar_ms: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bar close times ms, close, volume), sorted and de-duplicated; close time = open time + bar_ms."""
    _require(df, ["ts_ms", "close", "volume"], what)
    d = df[["ts_ms", "close", "volume"]].drop_duplicates("ts_ms", keep="last").sort_values("ts_ms")
    d = d[np.isfinite(d["close"].to_numpy(np.float64)) & (d["close"].to_numpy(np.float64) > 0)]
    if d.empty:
        raise DataValidationError(f"{what}: no finite positive close price")
    close_ts = d["ts_ms"].to_numpy(np.int64) + int(bar_ms)
    volume = np.nan_to_num(d["volume"].to_numpy(np.float64), nan=0.0)
    return close_ts, d["close"].to_numpy(np.float64), volume


def funding_arrays(df: pd.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(settlement times rounded to the minute, rate per interval, mark price or NaN), sorted."""
    _require(df, ["ts_ms", "funding_rate"], what)
    d = df.copy()
    d["ts_ms"] = (d["ts_ms"].to_numpy(np.int64) + MINUTE_MS // 2) // MINUTE_MS * MINUTE_MS
    if "mark_price" not in d.columns:
        d["mark_price"] = np.nan
    d = d.drop_duplicates("ts_ms", keep="last").sort_values("ts_ms")
    d = d[np.isfinite(d["funding_rate"].to_numpy(np.float64))]
    if d.empty:
        raise DataValidationError(f"{what}: no finite funding rate")
    return d["ts_ms"].to_numpy(np.int64), d["funding_rate"].to_numpy(np.float64), d["mark_price"].to_numpy(np.float64)


def funding_interval_ms(settle_ts_ms: np.ndarray) -> int:
    """Median spacing of settlements rounded to the hour (``DEFAULT_FUNDING_INTERVAL_HOURS`` if < 2)."""
    if len(settle_ts_ms) < 2:
        return DEFAULT_FUNDING_INTERVAL_HOURS * HOUR_MS
    hours = max(1, round(float(np.median(np.diff(settle_ts_ms))) / HOUR_MS))
    return int(hours) * HOUR_MS


def _last_at_or_before(times: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the last ``times`` <= each ts (clipped to 0) and whether one exists."""
    idx = np.searchsorted(times, ts, side="right") - 1
    return np.maximum(idx, 0), idx >= 0


def _bar_stats(df: pd.DataFrame, bar_ms: int, ts: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """Price, staleness and 24 h windows of one candle series at each snapshot time."""
    close_ts, close, volume = ohlcv_arrays(df, bar_ms, what)
    j, has = _last_at_or_before(close_ts, ts)
    price = np.where(has, close[j], np.nan)
    fresh = has & (ts - close_ts[j] <= MAX_BAR_AGE_MINUTES * MINUTE_MS)
    # Bars closing in (ts - 24h, ts]: prefix sums between two searchsorted bounds.
    hi = np.where(has, j + 1, 0)
    lo = np.searchsorted(close_ts, ts - DAY_MS, side="right")
    lo = np.minimum(lo, hi)
    usd = np.concatenate([[0.0], np.cumsum(close * volume)])
    logret = np.concatenate([[0.0], np.diff(np.log(close))])  # return of bar i is attributed to bar i
    valid = np.concatenate([[0.0], np.ones(len(close) - 1)])
    s1 = np.concatenate([[0.0], np.cumsum(logret)])
    s2 = np.concatenate([[0.0], np.cumsum(logret * logret)])
    cnt = np.concatenate([[0.0], np.cumsum(valid)])
    n = cnt[hi] - cnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (s2[hi] - s2[lo] - (s1[hi] - s1[lo]) ** 2 / n) / (n - 1)
    ret_vol = np.where(n >= 2, np.sqrt(np.maximum(var, 0.0)), np.nan) / math.sqrt(bar_ms / MINUTE_MS)
    return {"price": price, "fresh": fresh, "volume_24h_usd": usd[hi] - usd[lo], "ret_vol_24h": ret_vol}


def _book_stats(df: pd.DataFrame | None, ts: np.ndarray, max_age_ms: int, what: str) -> dict[str, np.ndarray]:
    """Spread (percent) and top-N depth (USD) of the latest usable book; ``ok`` False -> use the proxy."""
    nan = np.full(len(ts), np.nan)
    if df is None or df.empty:
        return {"ok": np.zeros(len(ts), dtype=bool), "spread_pct": nan, "depth_usd": nan}
    _require(df, ["ts_ms", "side", "level", "price", "size"], what)
    top = df[df["level"] < BOOK_DEPTH_LEVELS]
    best = top[top["level"] == 0].pivot_table(index="ts_ms", columns="side", values="price", aggfunc="last")
    depth = (top["price"] * top["size"]).groupby(top["ts_ms"]).sum()
    book = pd.DataFrame({"bid": best.get("bid"), "ask": best.get("ask")}).join(depth.rename("depth"))
    book = book[(book["bid"] > 0) & (book["ask"] >= book["bid"])].sort_index()
    if book.empty:
        return {"ok": np.zeros(len(ts), dtype=bool), "spread_pct": nan, "depth_usd": nan}
    book_ts = book.index.to_numpy(np.int64)
    bid, ask = book["bid"].to_numpy(np.float64), book["ask"].to_numpy(np.float64)
    j, has = _last_at_or_before(book_ts, ts)
    ok = has & (ts - book_ts[j] <= max_age_ms)
    spread = (ask - bid) / ((ask + bid) / 2.0) * 100.0
    return {"ok": ok, "spread_pct": spread[j], "depth_usd": book["depth"].to_numpy(np.float64)[j]}


def _liquidity(
    bars: dict[str, np.ndarray], book: dict[str, np.ndarray], p: SnapshotParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spread_pct, depth_usd, is_proxy): the book where usable, else the volume/volatility proxy."""
    proxy_spread = p.proxy_spread_bps / 100.0 + PROXY_SPREAD_VOL_MULT * np.nan_to_num(bars["ret_vol_24h"]) * 100
    proxy_depth = p.proxy_depth_fraction * bars["volume_24h_usd"]
    ok = book["ok"]
    return np.where(ok, book["spread_pct"], proxy_spread), np.where(ok, book["depth_usd"], proxy_depth), ~ok


def _funding_stats(df: pd.DataFrame, ts: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """Last settled rate, window means, next settlement and whether a recent-enough rate is known."""
    f_ts, rate, _ = funding_arrays(df, what)
    interval = funding_interval_ms(f_ts)
    k, has = _last_at_or_before(f_ts, ts)
    known = has & (ts - f_ts[k] <= FUNDING_MAX_AGE_INTERVALS * interval)
    cs = np.concatenate([[0.0], np.cumsum(rate)])
    out = {"known": known, "funding_rate": rate[k]}
    for name, window in (("funding_avg_24h", DAY_MS), ("funding_avg_3d", 3 * DAY_MS)):
        lo = np.searchsorted(f_ts, ts - window, side="right")
        n = k + 1 - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(n > 0, (cs[k + 1] - cs[np.minimum(lo, k + 1)]) / n, rate[k])
    out["next_funding_ts_ms"] = f_ts[k] + ((ts - f_ts[k]) // interval + 1) * interval
    out["funding_interval_hours"] = np.full(len(ts), interval / HOUR_MS)
    return out


def _btc_stats(
    frames: MarketFrames, exchanges: Sequence[str], quote: str, ts: np.ndarray, p: SnapshotParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BTC price, 24 h USD volume, trailing return and regime at each snapshot time."""
    for symbol in (perp_symbol(p.btc_base, quote), spot_symbol(p.btc_base, quote)):
        for ex in exchanges:
            if (ex, symbol) in frames.ohlcv:
                what = f"{ex} {symbol} candles"
                bars = _bar_stats(frames.ohlcv[(ex, symbol)], frames.bar_ms, ts, what)
                close_ts, close, _ = ohlcv_arrays(frames.ohlcv[(ex, symbol)], frames.bar_ms, what)
                j0, has0 = _last_at_or_before(close_ts, ts - p.regime_lookback_hours * HOUR_MS)
                past = np.where(has0, close[j0], close[0])
                ret = bars["price"] / past - 1.0
                regime = np.where(ret > p.bull_threshold, "Bull", np.where(ret < p.bear_threshold, "Bear", "Ranging"))
                return bars["price"], bars["volume_24h_usd"], ret, regime
    raise DataValidationError(
        f"no {p.btc_base} candles for the market regime on {list(exchanges)} (snapshots.btc_base="
        f"{p.btc_base!r}): store {p.btc_base}/{quote} data or set snapshots.btc_base to a stored base"
    )


def _grid(
    frames: MarketFrames, perps: list[SeriesKey], step: int, start_ms: int | None, end_ms: int | None
) -> np.ndarray:
    """Snapshot times: multiples of step from the first perp bar close (or start_ms) to the last (or end_ms)."""
    first = min(int(frames.ohlcv[k]["ts_ms"].min()) for k in perps) + frames.bar_ms
    last = max(int(frames.ohlcv[k]["ts_ms"].max()) for k in perps) + frames.bar_ms
    lo = max(first, start_ms) if start_ms is not None else first
    hi = min(last, end_ms) if end_ms is not None else last
    lo = -(-lo // step) * step  # ceil to the grid
    if hi < lo:
        raise DataValidationError(f"no snapshot time in [{start_ms}, {end_ms}]: the candles cover [{first}, {last}]")
    return np.arange(lo, hi + 1, step, dtype=np.int64)


def snapshots_from_frames(
    frames: MarketFrames,
    exchanges: Sequence[str],
    bases: Sequence[str],
    quote: str,
    params: SnapshotParams,
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> pd.DataFrame:
    """Snapshots (see the module docstring and the contract) for every exchange x base with a perp.

    ``start_ms`` / ``end_ms`` bound the snapshot times (inclusive); data before start_ms is used for windows.
    Raises DataValidationError on empty input, a perp without funding, or no row at all.
    """
    perps = [
        (ex, perp_symbol(b, quote)) for ex in exchanges for b in bases if (ex, perp_symbol(b, quote)) in frames.ohlcv
    ]
    if not perps:
        raise DataValidationError(
            f"no perpetual candles for bases {list(bases)} on {list(exchanges)} (quote {quote}): nothing to snapshot"
        )
    for key in perps:
        if frames.ohlcv[key].empty:
            raise DataValidationError(f"{key[0]} {key[1]} candles: the frame is empty")
        if key not in frames.funding or frames.funding[key].empty:
            raise DataValidationError(
                f"{key[0]} {key[1]} has candles but no funding data: a perp needs its funding history"
            )
    ts = _grid(frames, perps, params.interval_minutes * MINUTE_MS, start_ms, end_ms)
    btc_price, btc_vol, btc_ret, regime = _btc_stats(frames, exchanges, quote, ts, params)
    max_book_age = params.book_max_age_minutes * MINUTE_MS
    blocks = []
    for ex, perp in perps:
        base = perp.split("/")[0]
        spot = spot_symbol(base, quote)
        bars = _bar_stats(frames.ohlcv[(ex, perp)], frames.bar_ms, ts, f"{ex} {perp} candles")
        fund = _funding_stats(frames.funding[(ex, perp)], ts, f"{ex} {perp} funding")
        book = _book_stats(frames.books.get((ex, perp)), ts, max_book_age, f"{ex} {perp} book")
        spread, depth, proxy = _liquidity(bars, book, params)
        block = {
            "ts_ms": ts, "exchange": ex, "base": base, "spot_symbol": None, "perp_symbol": perp,
            "spot_price": np.nan, "perp_price": bars["price"],
            **{k: fund[k] for k in ("funding_rate", "next_funding_ts_ms", "funding_avg_24h", "funding_avg_3d")},
            "funding_interval_hours": fund["funding_interval_hours"],
            "volume_24h_usd": bars["volume_24h_usd"], "spot_volume_24h_usd": np.nan,
            "bid_ask_spread_pct": spread, "spot_bid_ask_spread_pct": np.nan,
            "orderbook_depth_usd": depth, "spot_orderbook_depth_usd": np.nan, "depth_is_proxy": proxy,
            "ret_vol_24h": bars["ret_vol_24h"], "btc_price": btc_price, "btc_volume_24h_usd": btc_vol,
            "btc_ret_trailing": btc_ret, "regime": regime,
        }  # fmt: skip
        if (ex, spot) in frames.ohlcv:
            sbars = _bar_stats(frames.ohlcv[(ex, spot)], frames.bar_ms, ts, f"{ex} {spot} candles")
            sbook = _book_stats(frames.books.get((ex, spot)), ts, max_book_age, f"{ex} {spot} book")
            sspread, sdepth, sproxy = _liquidity(sbars, sbook, params)
            fresh = sbars["fresh"]
            block["spot_symbol"] = spot
            block["spot_price"] = np.where(fresh, sbars["price"], np.nan)
            block["spot_volume_24h_usd"] = np.where(fresh, sbars["volume_24h_usd"], np.nan)
            block["spot_bid_ask_spread_pct"] = np.where(fresh, sspread, np.nan)
            block["spot_orderbook_depth_usd"] = np.where(fresh, sdepth, np.nan)
            block["depth_is_proxy"] = proxy | (fresh & sproxy)
        keep = bars["fresh"] & fund["known"]
        blocks.append(pd.DataFrame(block, columns=SNAPSHOT_COLUMNS)[keep])
    out = pd.concat(blocks, ignore_index=True)
    if out.empty:
        raise DataValidationError(
            f"no snapshot rows between {int(ts[0])} and {int(ts[-1])} ms: the perps have no fresh candles "
            "with a known funding rate there"
        )
    out = out.sort_values(["ts_ms", "exchange", "base"], kind="stable").reset_index(drop=True)
    out["next_funding_ts_ms"] = out["next_funding_ts_ms"].astype(np.int64)
    out["depth_is_proxy"] = out["depth_is_proxy"].astype(bool)
    return out


def load_market_frames(
    store: ParquetStore,
    exchanges: Sequence[str],
    bases: Sequence[str],
    quote: str,
    timeframe: str = "1m",
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> MarketFrames:
    """Read every stored spot/perp candle, funding and book series of these exchanges x bases.

    Missing datasets are skipped (an exchange may list only perps); ``[start_ms, end_ms)`` bounds the rows.
    """
    ohlcv: dict[SeriesKey, pd.DataFrame] = {}
    funding: dict[SeriesKey, pd.DataFrame] = {}
    books: dict[SeriesKey, pd.DataFrame] = {}
    for ex in exchanges:
        for base in dict.fromkeys(bases):
            for symbol in (spot_symbol(base, quote), perp_symbol(base, quote)):
                for kind, target in (("ohlcv", ohlcv), ("funding", funding), ("book", books)):
                    if kind == "funding" and ":" not in symbol:
                        continue
                    key = DatasetKey(ex, symbol, kind, timeframe if kind == "ohlcv" else "")  # type: ignore[arg-type]
                    if store.exists(key):
                        target[(ex, symbol)] = store.read(key, start_ms, end_ms)
    return MarketFrames(ohlcv=ohlcv, funding=funding, books=books, bar_ms=timeframe_ms(timeframe))


def build_snapshots(
    store: ParquetStore,
    exchanges: Sequence[str],
    bases: Sequence[str],
    quote: str,
    params: SnapshotParams,
    start_ms: int | None = None,
    end_ms: int | None = None,
    timeframe: str = "1m",
) -> pd.DataFrame:
    """Snapshots from the store: loads the series (plus the warm-up the windows need) and builds them."""
    warmup = max(3 * DAY_MS, params.regime_lookback_hours * HOUR_MS) + DAY_MS
    read_start = None if start_ms is None else start_ms - warmup
    read_end = None if end_ms is None else end_ms + MINUTE_MS  # funding stamped a few ms after the hour
    all_bases = [*bases, params.btc_base]
    frames = load_market_frames(store, exchanges, all_bases, quote, timeframe, read_start, read_end)
    if not frames.ohlcv:
        raise DataValidationError(f"the store at {store.root} has no candles for {list(exchanges)} x {list(bases)}")
    return snapshots_from_frames(frames, exchanges, bases, quote, params, start_ms, end_ms)
