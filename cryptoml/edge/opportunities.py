"""Live funding-arbitrage opportunities for the edge runner: rolling market state, detection and the rule scorer.

The training side builds opportunities in batch (:mod:`cryptoml.simulate.snapshots` ->
:mod:`cryptoml.simulate.opportunities`, pandas). This module computes the very same rows at one instant
``now_ms`` from live data, with numpy and the standard library only (ccxt is imported by
:func:`fetch_into` alone), so :meth:`cryptoml.edge.models.ModelSet.score_opportunities` sees the inputs the
models were trained on. The formulas are the batch ones, re-implemented per row (the batch helpers are
pandas-bound); a test checks both give the same fields to 1e-9 on the same data. Summary (see the two
batch modules for the full definitions):

- **Known at now_ms:** bars whose close (open + ``bar_ms``) is <= now, funding settlements (rounded to
  the nearest minute, as the batch does) at or before now, the latest valid book stamped at or before
  now. Anything newer held by :class:`LiveMarket` is ignored, so the answer never looks ahead.
- **Snapshot row** per exchange x base with a perp (:func:`live_snapshots`): prices = last closed
  close; a row needs a perp bar at most ``MAX_BAR_AGE_MINUTES`` old and a settlement at most
  ``FUNDING_MAX_AGE_INTERVALS`` intervals old; 24 h USD volume = sum of close x volume over bars closing
  in (now - 24 h, now]; ``ret_vol_24h`` = sample std of per-bar log returns over those bars, scaled to
  one minute; spread (%) and depth (USD, top ``BOOK_DEPTH_LEVELS`` levels of both sides) from a book at
  most ``book_max_age_minutes`` old, else the volume / volatility proxy and ``depth_is_proxy``; funding =
  last settled rate, 24 h / 3 d means of the settlements in the window, the next settlement on the
  schedule; regime from the BTC trailing return over ``regime_lookback_hours``.
- **Opportunities** (:func:`detect_live`): spot-perp per exchange x base and cross-exchange perp-perp per
  base and exchange pair, rates scaled to 8 h, fund_* projections, break-even hours (4 taker fees + 4
  slippages, each leg at its own venue's fee), leg aggregates, :class:`OpportunityParams` thresholds and
  liquidity status, exactly as the batch. A derivatives-only venue's spot legs can live on another venue
  (``spot_exchanges``: Binance spot beside Binance USDⓈ-M); the batch store keeps both under one name.
  ``spread_volatility_cv`` is the population std / |mean| of the pair's funding spread over the
  snapshot grid times (multiples of ``interval_minutes``) in (now - 3 d, now] where the pair had a row,
  plus now itself when now is off the grid: the batch row at a grid time is the same number.

Differences from the batch, all outside steady state: the funding interval is the median spacing of the
settlements held (the batch uses the whole stored history: equal for a regular schedule); the regime's
"first close when the history is shorter" is the first close held; a series counts as present when it has
data at or before now (the batch: when a file exists).

Buffers are bounded by retention windows measured back from the newest item held: bars
``DEFAULT_BAR_RETENTION_MS`` (74 h: the 72 h regime lookback and 3 d CV window plus 2 h for bar freshness
and data newer than now), funding ``DEFAULT_FUNDING_RETENTION_MS`` (4 d: the 3 d averages and CV window
plus two 8 h intervals), books ``DEFAULT_BOOK_RETENTION_MS`` (3 h). Results at ``now_ms`` are exact while
the newest item held is at most about 1 h past now.

:func:`rule_score` is the rule scorer of the training comparison (rank by ``fund_apr``, then lower
``break_even_hours``) turned into a decision; :func:`fetch_into` fills a :class:`LiveMarket` with ccxt.
:func:`open_paper_position` / :func:`advance_paper_position` follow a pick on paper with the simulator's
cost model (:mod:`cryptoml.simulate.reference`), so the runner can record what each scorer's picks earned.
"""

from __future__ import annotations

import bisect
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cryptoml.config import OpportunityParams, SimulateParams, SnapshotParams, timeframe_ms
from cryptoml.errors import ConfigError, DataValidationError, SourceError
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
from cryptoml.simulate.slippage import fee_frac, slippage_frac_one

if TYPE_CHECKING:
    import ccxt

__all__ = [
    "LIVE_OPPORTUNITY_KEYS",
    "LiveMarket",
    "advance_paper_position",
    "detect_live",
    "fetch_into",
    "live_snapshots",
    "open_paper_position",
    "rule_rank",
    "rule_score",
]

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# Mirrors of the batch constants (cryptoml.simulate.snapshots / .opportunities import pandas, so they are
# repeated here; a test checks they are equal).
MAX_BAR_AGE_MINUTES = 15
BOOK_DEPTH_LEVELS = 10
PROXY_SPREAD_VOL_MULT = 0.5
FUNDING_MAX_AGE_INTERVALS = 2
DEFAULT_FUNDING_INTERVAL_HOURS = 8

DEFAULT_BAR_RETENTION_MS = 74 * HOUR_MS
DEFAULT_FUNDING_RETENTION_MS = 4 * DAY_MS
DEFAULT_BOOK_RETENTION_MS = 3 * HOUR_MS
PRUNE_SLACK = 64  # bars dropped in chunks: a list head delete per bar would copy the buffer every minute
BOOK_FETCH_LEVELS = 20  # levels asked per side (a Binance depth limit, >= BOOK_DEPTH_LEVELS)
OHLCV_PAGE_LIMIT = 1000  # candles per request (Binance spot and Bybit maxima; USDⓈ-M allows 1500)
FUNDING_PAGE_LIMIT = 200  # settlements per request (Bybit's maximum)
MAX_PAGES = 20  # per series and call: bounds a misbehaving exchange that never stops paging

# The keys of every detect_live row: the batch OPPORTUNITY_COLUMNS plus ``direction``.
LIVE_OPPORTUNITY_KEYS: tuple[str, ...] = (
    "ts_ms", "opportunity_id", "strategy", "direction", "base", "long_exchange", "long_market", "long_symbol",
    "short_exchange", "short_market", "short_symbol", "long_price", "short_price", "funding_rate_long",
    "funding_rate_short", "funding_spread", "fund_profit_8h", "fund_apr", "fund_profit_24h_proj",
    "fund_profit_3d_proj", "break_even_hours", "spread_volatility_cv", "funding_spread_avg_24h",
    "funding_spread_avg_3d", "volume_24h", "bid_ask_spread_pct", "orderbook_depth_usd", "depth_is_proxy",
    "liquidity_status", "ret_vol_24h", "next_funding_ts_ms", "btc_price", "btc_volume_24h_usd",
    "btc_ret_trailing", "regime",
)  # fmt: skip

SeriesKey = tuple[str, str]  # (exchange, unified symbol)


def spot_symbol(base: str, quote: str) -> str:
    return f"{base}/{quote}"


def perp_symbol(base: str, quote: str) -> str:
    return f"{base}/{quote}:{quote}"


def _int_ms(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(float(value))
        raise DataValidationError(f"{what}: expected an integer epoch ms, got {value!r}")
    return int(value)


def _float(value: Any, what: str) -> float:
    """A float from a number or numeric string; None counts as NaN (a field the exchange left empty)."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise DataValidationError(f"{what}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"{what}: expected a number, got {value!r}") from e


# --- buffers -------------------------------------------------------------------------------------------


class _Bars:
    """Candles of one series by bar open time (one per time, the last added wins), oldest first.

    The numpy view of the closes is kept in step incrementally: a bar appended at the end (the live case)
    converts only the new tail, not the 74 h of Python lists again.
    """

    def __init__(self) -> None:
        self.ts: list[int] = []
        self.cols: tuple[list[float], ...] = ([], [], [], [], [])  # open, high, low, close, volume
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # open ts, close, volume
        self._valid = 0  # leading rows of _arrays that still equal the lists

    def add(self, ts: int, values: tuple[float, float, float, float, float], retention_ms: int) -> None:
        if not self.ts or ts > self.ts[-1]:
            self.ts.append(ts)
            for col, v in zip(self.cols, values, strict=True):
                col.append(v)
        else:
            i = bisect.bisect_left(self.ts, ts)
            if self.ts[i] == ts:
                for col, v in zip(self.cols, values, strict=True):
                    col[i] = v
            else:
                self.ts.insert(i, ts)
                for col, v in zip(self.cols, values, strict=True):
                    col.insert(i, v)
            self._valid = min(self._valid, i)
        cut = bisect.bisect_left(self.ts, self.ts[-1] - retention_ms)
        if cut >= PRUNE_SLACK:
            del self.ts[:cut]
            for col in self.cols:
                del col[:cut]
            if self._arrays is not None:
                self._arrays = tuple(a[cut:] for a in self._arrays)  # type: ignore[assignment]
            self._valid = max(self._valid - cut, 0)

    def view(self, now_ms: int, bar_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(close times, close, volume) of the bars closed by now_ms with a finite positive close."""
        n, k = len(self.ts), self._valid
        if self._arrays is None or k < n:
            tail = (
                np.asarray(self.ts[k:], dtype=np.int64),
                np.asarray(self.cols[3][k:], dtype=np.float64),
                np.nan_to_num(np.asarray(self.cols[4][k:], dtype=np.float64), nan=0.0),
            )
            head = self._arrays if self._arrays is not None else tuple(a[:0] for a in tail)
            self._arrays = tuple(np.concatenate([h[:k], t]) for h, t in zip(head, tail, strict=True))  # type: ignore[assignment]
            self._valid = n
        open_ts, close, volume = self._arrays  # type: ignore[misc]
        close_ts = open_ts + bar_ms
        hi = int(np.searchsorted(close_ts, now_ms, side="right"))
        ok = np.isfinite(close[:hi]) & (close[:hi] > 0)
        return close_ts[:hi][ok], close[:hi][ok], volume[:hi][ok]


class _Funding:
    """Settlements of one perp by time rounded to the minute (the last added wins), oldest first."""

    def __init__(self) -> None:
        self.ts: list[int] = []
        self.rate: list[float] = []

    def add(self, ts: int, rate: float, retention_ms: int) -> None:
        i = bisect.bisect_left(self.ts, ts)
        if i < len(self.ts) and self.ts[i] == ts:
            self.rate[i] = rate
        else:
            self.ts.insert(i, ts)
            self.rate.insert(i, rate)
        cut = bisect.bisect_left(self.ts, self.ts[-1] - retention_ms)
        del self.ts[:cut], self.rate[:cut]

    def view(self, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        hi = bisect.bisect_right(self.ts, now_ms)
        ts = np.asarray(self.ts[:hi], dtype=np.int64)
        rate = np.asarray(self.rate[:hi], dtype=np.float64)
        ok = np.isfinite(rate)
        return ts[ok], rate[ok]


class _Books:
    """Valid book summaries (best bid, best ask, top-N depth in USD) by book time, oldest first."""

    def __init__(self) -> None:
        self.ts: list[int] = []
        self.rows: list[tuple[float, float, float]] = []

    def add(self, ts: int, row: tuple[float, float, float], retention_ms: int) -> None:
        i = bisect.bisect_left(self.ts, ts)
        if i < len(self.ts) and self.ts[i] == ts:
            self.rows[i] = row
        else:
            self.ts.insert(i, ts)
            self.rows.insert(i, row)
        cut = min(bisect.bisect_left(self.ts, self.ts[-1] - retention_ms), len(self.ts) - 1)
        del self.ts[:cut], self.rows[:cut]

    def latest(self, now_ms: int) -> tuple[int, float, float, float] | None:
        i = bisect.bisect_right(self.ts, now_ms) - 1
        return None if i < 0 else (self.ts[i], *self.rows[i])


def _book_levels(entries: Any, what: str) -> list[tuple[float, float]]:
    out = []
    for level, entry in enumerate(list(entries or [])[:BOOK_DEPTH_LEVELS]):
        try:
            price, size = entry[0], entry[1]
        except (TypeError, IndexError, KeyError) as e:
            raise DataValidationError(f"{what}: level {level} is not a [price, size] pair: {entry!r}") from e
        out.append((_float(price, f"{what} level {level} price"), _float(size, f"{what} level {level} size")))
    return out


class LiveMarket:
    """Rolling live market state, fed by the runner: 1-minute bars, funding settlements and L2 books.

    Keys are (exchange, unified symbol): ``'BTC/USDT'`` is a spot market, ``'BTC/USDT:USDT'`` its perp.
    ``exchange`` is the default exchange label of the ``add_*`` / ``set_book`` calls (pass ``exchange=``
    to feed several). Items may arrive in any order; re-sent items replace the earlier ones (same bar open
    time, same settlement minute, same book time). Buffers are bounded by the retention windows (ms,
    measured back from the newest item of each series; see the module docstring).
    """

    def __init__(
        self,
        exchange: str | None = None,
        *,
        bar_ms: int = MINUTE_MS,
        bar_retention_ms: int = DEFAULT_BAR_RETENTION_MS,
        funding_retention_ms: int = DEFAULT_FUNDING_RETENTION_MS,
        book_retention_ms: int = DEFAULT_BOOK_RETENTION_MS,
    ) -> None:
        for name, value in (
            ("bar_ms", bar_ms),
            ("bar_retention_ms", bar_retention_ms),
            ("funding_retention_ms", funding_retention_ms),
            ("book_retention_ms", book_retention_ms),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LiveMarket: {name} must be a positive integer, got {value!r}")
        if exchange is not None and (not isinstance(exchange, str) or not exchange):
            raise ConfigError(f"LiveMarket: exchange must be a non-empty string, got {exchange!r}")
        self.exchange = exchange
        self.bar_ms = bar_ms
        self.bar_retention_ms = bar_retention_ms
        self.funding_retention_ms = funding_retention_ms
        self.book_retention_ms = book_retention_ms
        self._bars: dict[SeriesKey, _Bars] = {}
        self._funding: dict[SeriesKey, _Funding] = {}
        self._books: dict[SeriesKey, _Books] = {}

    def _key(self, symbol: Any, exchange: str | None) -> SeriesKey:
        ex = exchange if exchange is not None else self.exchange
        if ex is None:
            raise ConfigError("LiveMarket has no default exchange: pass exchange= or build LiveMarket(exchange)")
        if not isinstance(symbol, str) or "/" not in symbol:
            raise DataValidationError(f"LiveMarket: symbol must be a unified symbol like 'BTC/USDT', got {symbol!r}")
        return (ex, symbol)

    def add_bar(
        self,
        symbol: str,
        ts_ms: int,
        open: float,
        high: float,
        low: float,
        close: float,
        volume: float,
        *,
        exchange: str | None = None,
    ) -> None:
        """One candle of ``bar_ms``; ``ts_ms`` is the bar **open** time (UTC ms), volume in base currency.

        An unclosed bar may be added; it is ignored until its close and replaced when re-sent.
        """
        key = self._key(symbol, exchange)
        what = f"{key[0]} {symbol} bar"
        ts = _int_ms(ts_ms, f"{what} ts_ms")
        values = (
            _float(open, f"{what} open"),
            _float(high, f"{what} high"),
            _float(low, f"{what} low"),
            _float(close, f"{what} close"),
            _float(volume, f"{what} volume"),
        )
        self._bars.setdefault(key, _Bars()).add(ts, values, self.bar_retention_ms)

    def add_bars(self, symbol: str, rows: Iterable[Sequence[Any]], *, exchange: str | None = None) -> int:
        """Candles as ccxt OHLCV rows ``[open ts_ms, open, high, low, close, volume]``; returns how many."""
        n = 0
        for row in rows:
            if len(row) < 6:
                raise DataValidationError(f"{symbol} OHLCV row needs 6 fields [ts, o, h, l, c, v], got {row!r}")
            self.add_bar(symbol, row[0], row[1], row[2], row[3], row[4], row[5], exchange=exchange)
            n += 1
        return n

    def add_funding(self, symbol: str, ts_ms: int, rate: float, *, exchange: str | None = None) -> None:
        """One settled funding rate (fraction per interval) stamped ``ts_ms``, rounded to the nearest minute."""
        key = self._key(symbol, exchange)
        ts = _int_ms(ts_ms, f"{key[0]} {symbol} funding ts_ms")
        rounded = (ts + MINUTE_MS // 2) // MINUTE_MS * MINUTE_MS  # as the batch: exchanges stamp a few ms late
        value = _float(rate, f"{key[0]} {symbol} funding rate")
        self._funding.setdefault(key, _Funding()).add(rounded, value, self.funding_retention_ms)

    def set_book(
        self, symbol: str, ts_ms: int, bids: Sequence[Any], asks: Sequence[Any], *, exchange: str | None = None
    ) -> bool:
        """An L2 snapshot taken at ``ts_ms``: ``bids`` / ``asks`` are [price, size] levels, best first.

        Only the best prices and the top ``BOOK_DEPTH_LEVELS`` levels are kept. A book with an empty side,
        a non-positive best bid or a crossed top (ask < bid) is not usable (the batch skips such books too):
        it is dropped and False returned.
        """
        key = self._key(symbol, exchange)
        what = f"{key[0]} {symbol} book"
        ts = _int_ms(ts_ms, f"{what} ts_ms")
        bid_levels, ask_levels = _book_levels(bids, f"{what} bids"), _book_levels(asks, f"{what} asks")
        if not bid_levels or not ask_levels:
            return False
        bid, ask = bid_levels[0][0], ask_levels[0][0]
        if not (bid > 0 and ask >= bid):
            return False
        levels = np.asarray(ask_levels + bid_levels, dtype=np.float64)
        depth = float(np.nansum(levels[:, 0] * levels[:, 1]))
        self._books.setdefault(key, _Books()).add(ts, (bid, ask, depth), self.book_retention_ms)
        return True

    def last_bar_ts_ms(self, symbol: str, *, exchange: str | None = None) -> int | None:
        """Open time of the newest bar held for the series (closed or not), None when none is."""
        bars = self._bars.get(self._key(symbol, exchange))
        return bars.ts[-1] if bars is not None and bars.ts else None

    def last_funding_ts_ms(self, symbol: str, *, exchange: str | None = None) -> int | None:
        """Time (rounded to the minute) of the newest settlement held, None when none is."""
        funding = self._funding.get(self._key(symbol, exchange))
        return funding.ts[-1] if funding is not None and funding.ts else None

    def sizes(self) -> dict[str, dict[str, int]]:
        """Items held per ``'exchange symbol'``: bars, funding settlements and books (for monitoring)."""
        keys = sorted(set(self._bars) | set(self._funding) | set(self._books))
        return {
            f"{ex} {sym}": {
                "bars": len(self._bars[(ex, sym)].ts) if (ex, sym) in self._bars else 0,
                "funding": len(self._funding[(ex, sym)].ts) if (ex, sym) in self._funding else 0,
                "books": len(self._books[(ex, sym)].ts) if (ex, sym) in self._books else 0,
            }
            for ex, sym in keys
        }

    def _bar_view(self, key: SeriesKey, now_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Closed valid bars of a series at now_ms, None when it has none (the series is absent then)."""
        bars = self._bars.get(key)
        if bars is None:
            return None
        view = bars.view(now_ms, self.bar_ms)
        return view if len(view[0]) else None


def _settlement_pending(market: LiveMarket, key: SeriesKey, now_ms: int) -> bool:
    """True when the series' next settlement (newest held + its interval) is still after ``now_ms``: there
    is nothing new to ask the exchange for. Needs two settlements held to know the interval."""
    funding = market._funding.get(key)
    if funding is None or len(funding.ts) < 2:
        return False
    interval = _funding_interval_ms(np.asarray(funding.ts, dtype=np.int64))
    return now_ms < funding.ts[-1] + interval


# --- per-series statistics at now (the batch formulas for one snapshot time) ---------------------------


@dataclass(frozen=True)
class _BarStats:
    price: float
    fresh: bool
    volume_24h_usd: float
    ret_vol_24h: float


def _bar_stats(view: tuple[np.ndarray, np.ndarray, np.ndarray], now_ms: int, bar_ms: int) -> _BarStats:
    close_ts, close, volume = view
    last = len(close) - 1
    lo = int(np.searchsorted(close_ts, now_ms - DAY_MS, side="right"))
    usd = float(np.sum(close[lo:] * volume[lo:]))
    # The return of bar i (log close_i - log close_(i-1)) belongs to bar i; the first bar held has none.
    logret = np.diff(np.log(close))[max(lo, 1) - 1 : last]
    ret_vol = float(np.std(logret, ddof=1)) / math.sqrt(bar_ms / MINUTE_MS) if len(logret) >= 2 else math.nan
    fresh = now_ms - int(close_ts[last]) <= MAX_BAR_AGE_MINUTES * MINUTE_MS
    return _BarStats(float(close[last]), fresh, usd, ret_vol)


def _fresh_at(close_ts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Whether a bar closed at most MAX_BAR_AGE_MINUTES before each time (vectorised over times)."""
    j = np.searchsorted(close_ts, times, side="right") - 1
    return (j >= 0) & (times - close_ts[np.maximum(j, 0)] <= MAX_BAR_AGE_MINUTES * MINUTE_MS)


def _funding_interval_ms(settle_ts_ms: np.ndarray) -> int:
    if len(settle_ts_ms) < 2:
        return DEFAULT_FUNDING_INTERVAL_HOURS * HOUR_MS
    hours = max(1, round(float(np.median(np.diff(settle_ts_ms))) / HOUR_MS))
    return int(hours) * HOUR_MS


@dataclass(frozen=True)
class _FundingStats:
    known: bool
    rate: float
    avg_24h: float
    avg_3d: float
    next_ts_ms: int
    interval_ms: int


def _funding_stats(f_ts: np.ndarray, rate: np.ndarray, now_ms: int) -> _FundingStats:
    interval = _funding_interval_ms(f_ts)
    k = len(f_ts) - 1
    known = now_ms - int(f_ts[k]) <= FUNDING_MAX_AGE_INTERVALS * interval
    avgs = []
    for window in (DAY_MS, 3 * DAY_MS):
        lo = int(np.searchsorted(f_ts, now_ms - window, side="right"))
        avgs.append(float(np.mean(rate[lo:])) if lo <= k else float(rate[k]))
    next_ts = int(f_ts[k]) + ((now_ms - int(f_ts[k])) // interval + 1) * interval
    return _FundingStats(known, float(rate[k]), avgs[0], avgs[1], next_ts, interval)


def _liquidity(
    market: LiveMarket, key: SeriesKey, bars: _BarStats, now_ms: int, p: SnapshotParams
) -> tuple[float, float, bool]:
    """(spread %, depth USD, is_proxy): the latest book if fresh enough, else the volume/volatility proxy."""
    books = market._books.get(key)
    book = books.latest(now_ms) if books is not None else None
    if book is not None and now_ms - book[0] <= p.book_max_age_minutes * MINUTE_MS:
        _, bid, ask, depth = book
        return (ask - bid) / ((ask + bid) / 2.0) * 100.0, depth, False
    vol = 0.0 if math.isnan(bars.ret_vol_24h) else bars.ret_vol_24h
    return (
        p.proxy_spread_bps / 100.0 + PROXY_SPREAD_VOL_MULT * vol * 100,
        p.proxy_depth_fraction * bars.volume_24h_usd,
        True,
    )


def _btc_stats(
    market: LiveMarket,
    exchanges: Sequence[str],
    quote: str,
    now_ms: int,
    p: SnapshotParams,
    spot_venues: Mapping[str, str],
) -> tuple[float, float, float, str]:
    """BTC price, 24 h USD volume, trailing return and regime: the btc_base perp of the first exchange
    holding one, else its spot (on the exchange's spot venue; the batch rule)."""
    for symbol, venues in (
        (perp_symbol(p.btc_base, quote), list(exchanges)),
        (spot_symbol(p.btc_base, quote), [spot_venues[ex] for ex in exchanges]),
    ):
        for ex in venues:
            view = market._bar_view((ex, symbol), now_ms)
            if view is None:
                continue
            stats = _bar_stats(view, now_ms, market.bar_ms)
            close_ts, close, _ = view
            j0 = int(np.searchsorted(close_ts, now_ms - p.regime_lookback_hours * HOUR_MS, side="right")) - 1
            past = float(close[j0]) if j0 >= 0 else float(close[0])
            ret = stats.price / past - 1.0
            regime = "Bull" if ret > p.bull_threshold else "Bear" if ret < p.bear_threshold else "Ranging"
            return stats.price, stats.volume_24h_usd, ret, regime
    raise DataValidationError(
        f"no {p.btc_base} candles closed by {now_ms} for the market regime on {list(exchanges)} "
        f"(snapshots.btc_base={p.btc_base!r}): feed {perp_symbol(p.btc_base, quote)} or "
        f"{spot_symbol(p.btc_base, quote)} bars into the LiveMarket"
    )


# --- snapshots ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PerpRow:
    """One exchange x base at now: its snapshot row and, for the CV, its grid history."""

    snapshot: dict[str, Any]
    scale: float  # 8 h / funding interval hours
    grid_ok: np.ndarray  # the perp had a snapshot row at each grid time
    grid_rate: np.ndarray  # its funding rate there, scaled to 8 h
    spot_grid_ok: np.ndarray | None  # ... and a fresh spot price (None: no spot market held)
    spot_exchange: str  # the venue of the spot leg (the perp's own exchange unless spot_exchanges says)


def _grid_times(now_ms: int, step_ms: int) -> np.ndarray:
    """Snapshot grid times in (now - CV window, now], plus now itself when it is off the grid."""
    first = (now_ms - CV_WINDOW_MS) // step_ms * step_ms + step_ms
    grid = np.arange(first, now_ms + 1, step_ms, dtype=np.int64)
    return grid if now_ms % step_ms == 0 else np.append(grid, np.int64(now_ms))


def _check_args(
    market: LiveMarket,
    now_ms: Any,
    exchange: str | Sequence[str],
    bases: Sequence[str],
    quote: str,
    p: SnapshotParams,
    spot_exchanges: Mapping[str, str] | None,
) -> tuple[int, list[str], dict[str, str]]:
    now = _int_ms(now_ms, "now_ms")
    exchanges = [exchange] if isinstance(exchange, str) else list(exchange)
    if not exchanges or not all(isinstance(e, str) and e for e in exchanges):
        raise ConfigError(f"detect_live: exchange must be an exchange id or a non-empty list of them, got {exchange!r}")
    spot_venues = {ex: ex for ex in exchanges}
    for perp_ex, spot_ex in (spot_exchanges or {}).items():
        if not (isinstance(spot_ex, str) and spot_ex):
            raise ConfigError(f"detect_live: spot_exchanges[{perp_ex!r}] must be an exchange id, got {spot_ex!r}")
        if perp_ex in spot_venues:
            spot_venues[perp_ex] = spot_ex
    if isinstance(bases, str) or not bases or not quote:
        raise ConfigError(f"detect_live: bases must be a non-empty list and quote non-empty, got {bases!r}, {quote!r}")
    need_ms = max(p.regime_lookback_hours * HOUR_MS, CV_WINDOW_MS) + MAX_BAR_AGE_MINUTES * MINUTE_MS + market.bar_ms
    if market.bar_retention_ms < need_ms:
        raise ConfigError(
            f"LiveMarket keeps {market.bar_retention_ms / HOUR_MS:g} h of bars; the regime lookback "
            f"({p.regime_lookback_hours} h) and the 3 d CV window need at least {need_ms / HOUR_MS:g} h"
        )
    if market.book_retention_ms < p.book_max_age_minutes * MINUTE_MS:
        raise ConfigError(
            f"LiveMarket keeps books {market.book_retention_ms / MINUTE_MS:g} min; snapshots.book_max_age_minutes "
            f"is {p.book_max_age_minutes}"
        )
    return now, exchanges, spot_venues


def _perp_rows(
    market: LiveMarket,
    now: int,
    exchanges: Sequence[str],
    bases: Sequence[str],
    quote: str,
    p: SnapshotParams,
    spot_venues: Mapping[str, str],
) -> list[_PerpRow]:
    btc_price, btc_volume, btc_ret, regime = _btc_stats(market, exchanges, quote, now, p, spot_venues)
    grid = _grid_times(now, p.interval_minutes * MINUTE_MS)
    rows = []
    for ex in exchanges:
        spot_ex = spot_venues[ex]
        for base in dict.fromkeys(bases):
            perp, spot = perp_symbol(base, quote), spot_symbol(base, quote)
            view = market._bar_view((ex, perp), now)
            funding = market._funding.get((ex, perp))
            f_ts, f_rate = funding.view(now) if funding is not None else (np.zeros(0, np.int64), np.zeros(0))
            if view is None or not len(f_ts):
                log.debug("%s %s: no closed bar or no settled funding at %d: no snapshot row", ex, perp, now)
                continue
            bars = _bar_stats(view, now, market.bar_ms)
            fund = _funding_stats(f_ts, f_rate, now)
            if not (bars.fresh and fund.known):
                continue
            spread, depth, proxy = _liquidity(market, (ex, perp), bars, now, p)
            snap: dict[str, Any] = {
                "ts_ms": now, "exchange": ex, "base": base, "spot_symbol": None, "perp_symbol": perp,
                "spot_price": math.nan, "perp_price": bars.price, "funding_rate": fund.rate,
                "next_funding_ts_ms": fund.next_ts_ms, "funding_avg_24h": fund.avg_24h,
                "funding_avg_3d": fund.avg_3d, "funding_interval_hours": fund.interval_ms / HOUR_MS,
                "volume_24h_usd": bars.volume_24h_usd, "spot_volume_24h_usd": math.nan,
                "bid_ask_spread_pct": spread, "spot_bid_ask_spread_pct": math.nan, "orderbook_depth_usd": depth,
                "spot_orderbook_depth_usd": math.nan, "depth_is_proxy": proxy, "ret_vol_24h": bars.ret_vol_24h,
                "btc_price": btc_price, "btc_volume_24h_usd": btc_volume, "btc_ret_trailing": btc_ret,
                "regime": regime,
            }  # fmt: skip
            spot_view = market._bar_view((spot_ex, spot), now)
            spot_grid_ok = None
            if spot_view is not None:
                sbars = _bar_stats(spot_view, now, market.bar_ms)
                snap["spot_symbol"] = spot
                if sbars.fresh:
                    sspread, sdepth, sproxy = _liquidity(market, (spot_ex, spot), sbars, now, p)
                    snap["spot_price"] = sbars.price
                    snap["spot_volume_24h_usd"] = sbars.volume_24h_usd
                    snap["spot_bid_ask_spread_pct"] = sspread
                    snap["spot_orderbook_depth_usd"] = sdepth
                    snap["depth_is_proxy"] = proxy or sproxy
                spot_grid_ok = _fresh_at(spot_view[0], grid)
            k = np.searchsorted(f_ts, grid, side="right") - 1
            known = (k >= 0) & (grid - f_ts[np.maximum(k, 0)] <= FUNDING_MAX_AGE_INTERVALS * fund.interval_ms)
            scale = REFERENCE_INTERVAL_HOURS / (fund.interval_ms / HOUR_MS)
            rows.append(
                _PerpRow(
                    snapshot=snap,
                    scale=scale,
                    grid_ok=_fresh_at(view[0], grid) & known,
                    grid_rate=f_rate[np.maximum(k, 0)] * scale,
                    spot_grid_ok=spot_grid_ok,
                    spot_exchange=spot_ex,
                )
            )
    return rows


def live_snapshots(
    market: LiveMarket,
    now_ms: int,
    exchange: str | Sequence[str],
    bases: Sequence[str],
    quote: str,
    snapshot_params: SnapshotParams,
    *,
    spot_exchanges: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The snapshot rows at ``now_ms`` (keys and definitions of the batch ``SNAPSHOT_COLUMNS``).

    One row per exchange x base whose perp has a fresh closed bar and a known funding rate, in the order
    of ``exchange`` then ``bases``; missing spot values are NaN. ``spot_exchanges``: where the spot
    market of a perp exchange is held (see :func:`detect_live`); the row's ``exchange`` is the perp's.
    Raises DataValidationError when no BTC series is held for the regime, ConfigError for bad arguments
    or buffers too short for the params.
    """
    now, exchanges, spots = _check_args(market, now_ms, exchange, bases, quote, snapshot_params, spot_exchanges)
    return [row.snapshot for row in _perp_rows(market, now, exchanges, bases, quote, snapshot_params, spots)]


# --- opportunities -------------------------------------------------------------------------------------


def _cv(values: np.ndarray) -> float:
    """Population std / |mean|; 0 when the values did not vary, CV_CAP around a zero mean (batch rule)."""
    mean = float(np.mean(values))
    std = math.sqrt(max(float(np.mean((values - mean) ** 2)), 0.0))
    if std < CV_EPS:
        return 0.0
    if abs(mean) < CV_EPS:
        return CV_CAP
    return min(std / abs(mean), CV_CAP)


def _perp_leg(row: _PerpRow) -> dict[str, Any]:
    s = row.snapshot
    return {
        "exchange": s["exchange"], "market": "swap", "symbol": s["perp_symbol"], "price": s["perp_price"],
        "rate": s["funding_rate"] * row.scale, "avg24": s["funding_avg_24h"] * row.scale,
        "avg3d": s["funding_avg_3d"] * row.scale, "spread": s["bid_ask_spread_pct"],
        "depth": s["orderbook_depth_usd"], "volume": s["volume_24h_usd"],
    }  # fmt: skip


def _spot_leg(row: _PerpRow) -> dict[str, Any]:
    s = row.snapshot
    return {
        "exchange": row.spot_exchange, "market": "spot", "symbol": s["spot_symbol"], "price": s["spot_price"],
        "rate": 0.0, "avg24": 0.0, "avg3d": 0.0, "spread": s["spot_bid_ask_spread_pct"],
        "depth": s["spot_orderbook_depth_usd"], "volume": s["spot_volume_24h_usd"],
    }  # fmt: skip


def _break_even_hours(long: Mapping[str, Any], short: Mapping[str, Any], spread: float, sim: SimulateParams) -> float:
    cost = sum(leg_round_trip_cost([leg["exchange"]], [leg["spread"]], [leg["depth"]], sim) for leg in (long, short))
    return float(break_even_hours(cost, spread)[0])


def _opportunity(
    strategy: str,
    direction: str,
    long: Mapping[str, Any],
    short: Mapping[str, Any],
    shared: Mapping[str, Any],
    cv: float,
    sim: SimulateParams,
) -> dict[str, Any]:
    spread = short["rate"] - long["rate"]
    oid = f"{strategy}:{shared['base']}:{long['exchange']}-{long['market']}:{short['exchange']}-{short['market']}"
    out: dict[str, Any] = {"ts_ms": shared["ts_ms"], "opportunity_id": oid, "strategy": strategy}
    out["direction"] = direction
    out["base"] = shared["base"]
    for side, leg in (("long", long), ("short", short)):
        for col in ("exchange", "market", "symbol"):
            out[f"{side}_{col}"] = leg[col]
    out["long_price"], out["short_price"] = float(long["price"]), float(short["price"])
    out["funding_rate_long"], out["funding_rate_short"] = float(long["rate"]), float(short["rate"])
    out["funding_spread"] = spread
    out.update(funding_yields(spread))
    out["break_even_hours"] = _break_even_hours(long, short, spread, sim)
    out["spread_volatility_cv"] = cv
    out["funding_spread_avg_24h"] = short["avg24"] - long["avg24"]
    out["funding_spread_avg_3d"] = short["avg3d"] - long["avg3d"]
    out["volume_24h"] = float(np.minimum(long["volume"], short["volume"]))
    out["bid_ask_spread_pct"] = long["spread"] + short["spread"]
    out["orderbook_depth_usd"] = float(np.minimum(long["depth"], short["depth"]))
    out["depth_is_proxy"] = bool(shared["depth_is_proxy"])
    out["liquidity_status"] = None  # set with the thresholds
    out["ret_vol_24h"] = float(shared["ret_vol_24h"])
    out["next_funding_ts_ms"] = int(shared["next_funding_ts_ms"])
    for col in ("btc_price", "btc_volume_24h_usd", "btc_ret_trailing"):
        out[col] = float(shared[col])
    out["regime"] = str(shared["regime"])
    return {k: out[k] for k in LIVE_OPPORTUNITY_KEYS}


def _spot_perp(rows: Sequence[_PerpRow], allow_short_spot: bool, sim: SimulateParams) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        s = row.snapshot
        if row.spot_grid_ok is None or math.isnan(s["spot_price"]):
            continue
        ok = row.grid_ok & row.spot_grid_ok
        cv = _cv(row.grid_rate[ok])
        perp, spot = _perp_leg(row), _spot_leg(row)
        if perp["rate"] >= 0:
            out.append(_opportunity("spot_perp", "long_spot_short_perp", spot, perp, s, cv, sim))
        elif allow_short_spot:
            out.append(_opportunity("spot_perp", "long_perp_short_spot", perp, spot, s, cv, sim))
    return out


def _cross(rows: Sequence[_PerpRow], sim: SimulateParams) -> list[dict[str, Any]]:
    out = []
    for a in rows:
        for b in rows:
            sa, sb = a.snapshot, b.snapshot
            if sa["base"] != sb["base"] or not sa["exchange"] < sb["exchange"]:
                continue
            ok = a.grid_ok & b.grid_ok
            cv = _cv(b.grid_rate[ok] - a.grid_rate[ok])
            leg_a, leg_b = _perp_leg(a), _perp_leg(b)
            long, short = (leg_a, leg_b) if leg_a["rate"] <= leg_b["rate"] else (leg_b, leg_a)
            shared = {
                "ts_ms": sa["ts_ms"], "base": sa["base"],
                "depth_is_proxy": sa["depth_is_proxy"] or sb["depth_is_proxy"],
                "ret_vol_24h": np.fmax(sa["ret_vol_24h"], sb["ret_vol_24h"]),
                "next_funding_ts_ms": min(sa["next_funding_ts_ms"], sb["next_funding_ts_ms"]),
                **{c: sa[c] for c in ("btc_price", "btc_volume_24h_usd", "btc_ret_trailing", "regime")},
            }  # fmt: skip
            direction = f"long_{long['exchange']}_short_{short['exchange']}"
            out.append(_opportunity("cross_exchange", direction, long, short, shared, cv, sim))
    return out


def detect_live(
    market: LiveMarket,
    now_ms: int,
    exchange: str | Sequence[str],
    bases: Sequence[str],
    quote: str,
    snapshot_params: SnapshotParams,
    opportunity_params: OpportunityParams,
    simulate_params: SimulateParams,
    *,
    spot_exchanges: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Funding-arbitrage opportunities at ``now_ms`` from what ``market`` knew by then (see the module doc).

    ``exchange``: one exchange id (spot-perp only) or several (cross-exchange pairs too); its order picks
    the BTC series of the regime, as the batch's exchange list does. ``spot_exchanges``: perp exchange ->
    the venue whose spot market pairs with its perps, for a derivatives-only venue (``{"binanceusdm":
    "binance"}``); by default an exchange's spot is held under its own name, as in the batch store. The
    spot leg of a spot-perp row names that venue (``long_exchange`` / ``short_exchange``, so also the
    ``opportunity_id``), and its taker fee is that venue's (``simulate_params.fee_bps``) in
    ``break_even_hours`` and in the paper positions, as the batch simulator prices each leg.

    Each row is a dict with the keys of :data:`LIVE_OPPORTUNITY_KEYS` (every name of ``INPUT_COLUMNS``
    but ``hold_hours``, which the scorer varies, plus the ids: ``opportunity_id``, legs' exchange / market
    / symbol, ``direction``), plain Python values, ``ts_ms = now_ms``. Rows failing a threshold of
    ``opportunity_params`` are left out; the rest are sorted by ``opportunity_id``. Raises
    DataValidationError when no BTC series is held.
    """
    now, exchanges, spots = _check_args(market, now_ms, exchange, bases, quote, snapshot_params, spot_exchanges)
    rows = _perp_rows(market, now, exchanges, bases, quote, snapshot_params, spots)
    opps: list[dict[str, Any]] = []
    if "spot_perp" in opportunity_params.strategies:
        opps += _spot_perp(rows, opportunity_params.allow_short_spot, simulate_params)
    if "cross_exchange" in opportunity_params.strategies:
        opps += _cross(rows, simulate_params)
    p = opportunity_params
    kept = []
    for o in opps:
        if not (
            o["fund_apr"] >= p.min_fund_apr_pct
            and o["volume_24h"] >= p.min_volume_24h_usd
            and o["bid_ask_spread_pct"] <= p.max_bid_ask_spread_pct
            and o["orderbook_depth_usd"] >= p.min_depth_usd
        ):
            continue
        depth = o["orderbook_depth_usd"]
        o["liquidity_status"] = (
            "high"
            if depth >= p.high_liquidity_depth_usd
            else "medium"
            if depth >= p.medium_liquidity_depth_usd
            else "low"
        )
        kept.append(o)
    return sorted(kept, key=lambda o: o["opportunity_id"])


# --- following a pick on paper ---------------------------------------------------------------------------


def _leg_at(
    market: LiveMarket, exchange: str, symbol: str, t_ms: int, p: SnapshotParams, sim: SimulateParams
) -> tuple[float, float] | None:
    """(close, slippage fraction) of a leg at ``t_ms``: the close of its last bar closed by then (at most
    MAX_BAR_AGE_MINUTES old) and the slippage of a ``position_usd`` fill on the liquidity the snapshot at
    t_ms sees (fresh book, else the proxy); None when there is no such bar (a data gap)."""
    view = market._bar_view((exchange, symbol), t_ms)
    if view is None:
        return None
    stats = _bar_stats(view, t_ms, market.bar_ms)
    if not stats.fresh:
        return None
    spread_pct, depth_usd, _ = _liquidity(market, (exchange, symbol), stats, t_ms, p)
    return stats.price, slippage_frac_one(spread_pct, depth_usd, sim.position_usd, sim)


def open_paper_position(
    market: LiveMarket,
    opportunity: Mapping[str, Any],
    hold_hours: float,
    snapshot_params: SnapshotParams,
    simulate_params: SimulateParams,
) -> dict[str, Any] | None:
    """A JSON-safe paper position entering ``opportunity`` at its ``ts_ms`` for ``hold_hours``; None when a
    leg has no fresh bar at entry (the simulator drops such an entry too).

    As :func:`cryptoml.simulate.reference.simulate_one`: each leg trades ``simulate_params.position_usd``
    at its close, quantity fixed at entry (``qty = position_usd / close``), the long leg buying at close x
    (1 + s) and the short leg selling at close x (1 - s), s the slippage model on the snapshot liquidity.
    """
    entry = _int_ms(opportunity["ts_ms"], "opportunity ts_ms")
    if not (math.isfinite(hold_hours) and hold_hours > 0):
        raise DataValidationError(f"open_paper_position: hold_hours must be > 0, got {hold_hours!r}")
    legs = []
    for side, prefix in ((1, "long"), (-1, "short")):
        exchange, symbol = str(opportunity[f"{prefix}_exchange"]), str(opportunity[f"{prefix}_symbol"])
        at = _leg_at(market, exchange, symbol, entry, snapshot_params, simulate_params)
        if at is None:
            return None
        close, slip = at
        legs.append(
            {
                "side": side, "exchange": exchange, "symbol": symbol, "perp": ":" in symbol,
                "fee": fee_frac(exchange, simulate_params), "p0": close, "s0": slip,
                "qty": simulate_params.position_usd / close, "funding_usd": 0.0, "settlements": 0,
            }
        )  # fmt: skip
    return {
        "opportunity_id": str(opportunity["opportunity_id"]),
        "entry_ts_ms": entry,
        "exit_ts_ms": entry + round(hold_hours * HOUR_MS),
        "hold_hours": float(hold_hours),
        "position_usd": float(simulate_params.position_usd),
        "funding_counted_to_ms": entry,
        "legs": legs,
    }


def advance_paper_position(
    market: LiveMarket,
    position: Mapping[str, Any],
    now_ms: int,
    snapshot_params: SnapshotParams,
    simulate_params: SimulateParams,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Bring a paper position to ``now_ms``: ``(position, outcome)``, outcome None while the hold runs.

    Funding: every settlement of a perp leg in (entry, exit] (one exactly at entry is not received, one
    exactly at exit is) pays ``rate x qty x mark`` to the short side, the mark being the perp's close at
    or before the settlement (the LiveMarket keeps no mark prices; the batch uses the stored mark when it
    has one). Settlements are counted as they become known, so a hold longer than the funding retention
    is still paid in full; one that the exchange publishes only after the hold ended is missed. At
    ``now_ms >= exit`` the legs unwind at their closes at exit with the exit slippage, four taker fees
    are paid, and the outcome is ``{"status": "closed", "realised_profit_pct", "realised_profit_usd",
    "funding_usd", "fees_usd", "slippage_pct", "funding_payments_count", "exit": {...}}`` (percent of one
    leg's notional, USD), or ``{"status": "dropped", "reason"}`` when a leg has no fresh bar at exit.
    """
    now = _int_ms(now_ms, "now_ms")
    entry, exit_ = int(position["entry_ts_ms"]), int(position["exit_ts_ms"])
    counted = int(position["funding_counted_to_ms"])
    until = min(now, exit_)
    legs = [dict(leg) for leg in position["legs"]]
    if until > counted:
        for leg in legs:
            funding = market._funding.get((leg["exchange"], leg["symbol"])) if leg["perp"] else None
            if funding is None:
                continue
            f_ts, f_rate = funding.view(until)
            for t, rate in zip(f_ts.tolist(), f_rate.tolist(), strict=True):
                if max(counted, entry) < t <= until:
                    mark = _close_at(market, leg["exchange"], leg["symbol"], t)
                    leg["funding_usd"] += -leg["side"] * rate * leg["qty"] * (mark if mark is not None else leg["p0"])
                    leg["settlements"] += 1
    out = {**position, "legs": legs, "funding_counted_to_ms": max(counted, until)}
    if now < exit_:
        return out, None
    fees = slippage = price_pnl = 0.0
    exit_prices = []
    for leg in legs:
        at = _leg_at(market, leg["exchange"], leg["symbol"], exit_, snapshot_params, simulate_params)
        if at is None:
            reason = f"no {leg['symbol']} bar at most {MAX_BAR_AGE_MINUTES} min old at the exit {exit_}"
            return out, {"status": "dropped", "reason": reason}
        p1, s1 = at
        fill0 = leg["p0"] * (1 + leg["side"] * leg["s0"])  # a buy pays above the close, a sell gets below
        fill1 = p1 * (1 - leg["side"] * s1)
        price_pnl += leg["side"] * leg["qty"] * (fill1 - fill0)
        fees += leg["fee"] * leg["qty"] * (fill0 + fill1)
        slippage += leg["qty"] * (leg["p0"] * leg["s0"] + p1 * s1)
        exit_prices.append({"symbol": leg["symbol"], "close": p1, "slippage": s1})
    funding_usd = sum(leg["funding_usd"] for leg in legs)
    profit = price_pnl - fees + funding_usd
    pos = float(position["position_usd"])
    return out, {
        "status": "closed",
        "realised_profit_pct": profit / pos * 100.0,
        "realised_profit_usd": profit,
        "funding_usd": funding_usd,
        "fees_usd": fees,
        "slippage_pct": slippage / pos * 100.0,
        "funding_payments_count": max((leg["settlements"] for leg in legs), default=0),
        "exit": exit_prices,
    }


def _close_at(market: LiveMarket, exchange: str, symbol: str, t_ms: int) -> float | None:
    view = market._bar_view((exchange, symbol), t_ms)
    return None if view is None else float(view[1][-1])


# --- the rule scorer -----------------------------------------------------------------------------------

RULE_SCORER = "rule"
_RULE_FIELDS = ("fund_apr", "break_even_hours", "volume_24h", "bid_ask_spread_pct", "orderbook_depth_usd")


def _rule_field(opportunity: Mapping[str, Any], name: str) -> float:
    if name not in opportunity:
        raise DataValidationError(f"rule_score: the opportunity has no {name!r} field")
    return _float(opportunity[name], f"rule_score: {name}")


def rule_score(
    opportunity: Mapping[str, Any],
    opportunity_params: OpportunityParams,
    *,
    hold_grid_hours: Sequence[float] = SimulateParams().hold_hours,
) -> dict[str, Any]:
    """The rule scorer's decision on one opportunity: ``open`` or ``skip``, its score and the reason.

    The training's rule (:mod:`cryptoml.models.evaluation`) ranks entries by ``fund_apr`` (higher first),
    then by ``break_even_hours`` (lower first): ``score`` is ``fund_apr`` (percent per year) and
    ``rank_key`` = ``(fund_apr, -break_even_hours)``, higher is better (:func:`rule_rank` sorts by it).
    As a decision: ``open`` when the opportunity passes the detection thresholds of
    ``opportunity_params`` (APR, 24 h volume, spread, depth) and its break-even fits in the longest hold
    of ``hold_grid_hours`` (else funding at the current spread never repays the costs within a hold the
    models know), with ``hold_hours`` = the shortest grid hold >= break-even (the batch rule has no hold
    of its own: it draws one at random); else ``skip`` with the first failed check as reason.
    """
    apr, be, volume, spread, depth = (_rule_field(opportunity, n) for n in _RULE_FIELDS)
    if not hold_grid_hours:
        raise ConfigError("rule_score: hold_grid_hours is empty")
    longest = max(float(h) for h in hold_grid_hours)
    p = opportunity_params
    checks = (
        (apr >= p.min_fund_apr_pct, f"fund_apr {apr:.4g} % < minimum {p.min_fund_apr_pct:g} %"),
        (be <= longest, f"break-even {be:.4g} h > longest hold {longest:g} h"),
        (volume >= p.min_volume_24h_usd, f"24 h volume {volume:.4g} USD < minimum {p.min_volume_24h_usd:g} USD"),
        (spread <= p.max_bid_ask_spread_pct, f"bid-ask spread {spread:.4g} % > maximum {p.max_bid_ask_spread_pct:g} %"),
        (depth >= p.min_depth_usd, f"depth {depth:.4g} USD < minimum {p.min_depth_usd:g} USD"),
    )
    failed = next((reason for ok, reason in checks if not ok), None)
    hold = None if failed is not None else min(float(h) for h in hold_grid_hours if float(h) >= be)
    return {
        "scorer": RULE_SCORER,
        "decision": "skip" if failed is not None else "open",
        "score": apr if math.isfinite(apr) else None,
        "rank_key": (apr, -be),
        "hold_hours": hold,
        "reason": failed or f"fund_apr {apr:.4g} % >= {p.min_fund_apr_pct:g} %, break-even {be:.4g} h: hold {hold:g} h",
    }


def rule_rank(opportunities: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of ``opportunities`` best first by the rule: ``fund_apr`` desc, then ``break_even_hours`` asc.

    Ties keep the input order (the batch breaks them at random); NaN keys rank last.
    """

    def key(i: int) -> tuple[float, float]:
        apr = _rule_field(opportunities[i], "fund_apr")
        be = _rule_field(opportunities[i], "break_even_hours")
        return (-apr if math.isfinite(apr) else math.inf, be if not math.isnan(be) else math.inf)

    return sorted(range(len(opportunities)), key=key)


# --- ccxt ---------------------------------------------------------------------------------------------


def fetch_into(
    market: LiveMarket,
    exchange_client: ccxt.Exchange,
    symbols: Sequence[str],
    now_ms: int,
    *,
    exchange: str | None = None,
    timeframe: str = "1m",
    book_levels: int = BOOK_FETCH_LEVELS,
    books: bool = True,
) -> dict[str, dict[str, int]]:
    """Fetch what ``market`` lacks for ``symbols`` at ``now_ms`` from one ccxt client and feed it.

    Per symbol: closed candles (``fetch_ohlcv``, paged from the bar after the newest held, or from
    ``bar_retention_ms`` back on the first call; the bar still open at now_ms is not stored), for perps
    (``':'`` in the symbol) the settled funding (``fetch_funding_rate_history`` from the newest held, or
    ``funding_retention_ms`` back: the settled rates are what the snapshots use, not the predicted next
    rate; not asked while the next settlement on the held schedule is still ahead of now_ms), and the
    order book (``fetch_order_book``, ``book_levels`` per side; its exchange time is clamped to now_ms,
    since it was taken during this call; ``books=False`` skips it, e.g. when now_ms is long past and a
    book read now would stand for a moment it never saw). Data is stored under ``exchange`` (default
    the client's id). ccxt ``NetworkError`` propagates for the caller's retry; any other ccxt error
    becomes :class:`SourceError` naming the call. Returns per symbol the bars, settlements and books fed.
    """
    import ccxt  # local: the detection and scoring paths never need it

    label = exchange or str(exchange_client.id)
    now = _int_ms(now_ms, "now_ms")
    if timeframe_ms(timeframe) != market.bar_ms:
        raise ConfigError(
            f"fetch_into: timeframe {timeframe!r} does not match the LiveMarket bar of {market.bar_ms} ms"
        )

    def call(what: str, symbol: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ccxt.NetworkError:
            raise
        except ccxt.BaseError as e:
            raise SourceError(f"{label} {what} {symbol}: {type(e).__name__}: {e}") from e

    summary: dict[str, dict[str, int]] = {}
    for symbol in symbols:
        counts = {"bars": 0, "funding": 0, "books": 0}
        last = market.last_bar_ts_ms(symbol, exchange=label)
        since = last + market.bar_ms if last is not None else now - market.bar_retention_ms
        for _ in range(MAX_PAGES):
            if since + market.bar_ms > now:  # the next bar has not closed yet
                break
            # Ask only for the bars that can have closed: a few after the first call, which keeps the answer
            # small and the request weight low (exchanges weigh a candle request by its limit).
            limit = min(OHLCV_PAGE_LIMIT, (now - since) // market.bar_ms)
            rows = call("fetch_ohlcv", symbol, exchange_client.fetch_ohlcv, symbol, timeframe, since, limit)
            rows = [r for r in rows or [] if r and r[0] is not None and int(r[0]) >= since]
            closed = [r for r in rows if int(r[0]) + market.bar_ms <= now]
            counts["bars"] += market.add_bars(symbol, closed, exchange=label)
            if not closed:
                break
            since = int(closed[-1][0]) + market.bar_ms
        if ":" in symbol and not _settlement_pending(market, (label, symbol), now):
            newest = market.last_funding_ts_ms(symbol, exchange=label)
            cursor = newest + 1 if newest is not None else now - market.funding_retention_ms
            for _ in range(MAX_PAGES):
                # One ms early: a since exactly on a settlement can drop it on some venues (see ccxt_source).
                rows = call(
                    "fetch_funding_rate_history", symbol, exchange_client.fetch_funding_rate_history,
                    symbol, max(cursor - 1, 0), FUNDING_PAGE_LIMIT,
                )  # fmt: skip
                new = [r for r in rows or [] if r.get("timestamp") is not None and int(r["timestamp"]) >= cursor]
                known = [r for r in new if (int(r["timestamp"]) + MINUTE_MS // 2) // MINUTE_MS * MINUTE_MS <= now]
                for r in known:
                    market.add_funding(symbol, int(r["timestamp"]), r.get("fundingRate"), exchange=label)
                counts["funding"] += len(known)
                # A short page is the end of the history; a settlement past now_ms, the end of what is known.
                if not known or len(known) < len(new) or len(rows or []) < FUNDING_PAGE_LIMIT:
                    break
                cursor = max(int(r["timestamp"]) for r in known) + 1
        if books:
            book = call("fetch_order_book", symbol, exchange_client.fetch_order_book, symbol, book_levels)
            book_ts = book.get("timestamp")
            ts = min(int(book_ts), now) if book_ts is not None else now
            counts["books"] += int(
                market.set_book(symbol, ts, book.get("bids") or [], book.get("asks") or [], exchange=label)
            )
        summary[symbol] = counts
    return summary
