"""Backfill candles, funding rates and order books from real exchanges through ccxt, page by page.

Every page comes back as a DataFrame in the store schema (:data:`cryptoml.market.store.SCHEMAS`): candles
keyed by bar **open** time ``ts_ms`` (UTC epoch ms) and limited to ``[since_ms, until_ms)``, funding rows
keyed by funding time, books in the long layout (one row per side and level, level 0 = best). Each page is
sorted and de-duplicated; pages never repeat a timestamp. Every exchange call goes through
:func:`cryptoml.market.retry.call_with_retry`, so network trouble is retried within the configured budget
and anything else becomes a :class:`SourceError` naming the exchange and symbol.

``api_urls`` re-points an exchange's whole REST API at another base URL (testnet, proxy, the local stub
exchange used by the tests), keeping each endpoint's path.
"""

from __future__ import annotations

import difflib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

import ccxt
import numpy as np
import pandas as pd

from cryptoml.config import FetchParams, timeframe_ms
from cryptoml.errors import ConfigError, SourceError
from cryptoml.market.exchange import make_exchange
from cryptoml.market.retry import call_with_retry, parse_retry_after
from cryptoml.market.store import SCHEMAS

log = logging.getLogger(__name__)

# The endpoints' real per-request maxima (exchange API docs); page_limit is capped to these.
# binance (spot) klines allow 1000, USDⓈ-M / COIN-M 1500; ccxt 4.5.90 itself clamps Binance klines
# to 1000, so that is what actually goes on the wire.
PAGE_MAX: dict[str, dict[str, int]] = {
    "binance": {"ohlcv": 1000, "funding": 1000},
    "binanceusdm": {"ohlcv": 1500, "funding": 1000},
    "binancecoinm": {"ohlcv": 1500, "funding": 1000},
    "bybit": {"ohlcv": 1000, "funding": 200},
}
# Binance depth endpoints accept only these limits; other exchanges take the level count as is.
BINANCE_DEPTHS = (5, 10, 20, 50, 100, 500, 1000)


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _float(value: Any) -> float:
    """A number from ccxt or a raw exchange field; None and "" (a field sent empty) are NaN."""
    return float("nan") if value is None or value == "" else float(value)


def _empty(kind: str) -> pd.DataFrame:
    return SCHEMAS[kind].empty_table().to_pandas()


def ohlcv_frame(rows: list[list[Any]]) -> pd.DataFrame:
    """ccxt OHLCV rows ``[ts, o, h, l, c, v]`` -> store-schema frame, sorted, one row per ts (last wins)."""
    clean = [r[:6] for r in rows if r and r[0] is not None]
    if not clean:
        return _empty("ohlcv")
    df = pd.DataFrame(
        {
            "ts_ms": np.array([int(r[0]) for r in clean], dtype="int64"),
            **{
                name: np.array([_float(r[i]) for r in clean], dtype="float64")
                for i, name in enumerate(("open", "high", "low", "close", "volume"), start=1)
            },
        }
    )
    return _dedupe(df)


def funding_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """ccxt funding-rate-history structures -> ts_ms / funding_rate / mark_price (NaN when not sent)."""
    clean = [r for r in rows if r.get("timestamp") is not None]
    if not clean:
        return _empty("funding")
    df = pd.DataFrame(
        {
            "ts_ms": np.array([int(r["timestamp"]) for r in clean], dtype="int64"),
            "funding_rate": np.array([_float(r.get("fundingRate")) for r in clean], dtype="float64"),
            # ccxt's unified structure has no mark price; Binance sends one in the raw row.
            "mark_price": np.array([_float((r.get("info") or {}).get("markPrice")) for r in clean], dtype="float64"),
        }
    )
    return _dedupe(df)


def book_frame(book: Mapping[str, Any], levels: int, fallback_ts_ms: int) -> pd.DataFrame:
    """ccxt order book -> long layout (ts_ms, side, level, price, size), the best ``levels`` per side."""
    ts_ms = int(book["timestamp"]) if book.get("timestamp") is not None else fallback_ts_ms
    parts = []
    for side, key in (("bid", "bids"), ("ask", "asks")):
        entries = list(book.get(key) or [])[:levels]
        parts.append(
            pd.DataFrame(
                {
                    "ts_ms": np.full(len(entries), ts_ms, dtype="int64"),
                    "side": pd.Series([side] * len(entries), dtype="str"),
                    "level": np.arange(len(entries), dtype="int32"),
                    "price": np.array([float(e[0]) for e in entries], dtype="float64"),
                    "size": np.array([float(e[1]) for e in entries], dtype="float64"),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    out = df.drop_duplicates(subset="ts_ms", keep="last")
    return out.sort_values("ts_ms", kind="stable").reset_index(drop=True)


class CcxtSource:
    """Market data from ccxt exchanges; clients are created lazily, one per exchange id, and reused.

    ``api_urls`` maps exchange id -> base URL (see :func:`make_exchange`). ``sleep``, ``clock``
    (monotonic seconds, for the retry budget), ``now_ms`` (wall clock, for books without a timestamp)
    and ``rng`` (backoff jitter) are injectable for tests. Call :meth:`close` (or use ``with``) to release
    the HTTP sessions.
    """

    name = "ccxt"

    def __init__(
        self,
        fetch: FetchParams,
        api_urls: Mapping[str, str] | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        now_ms: Callable[[], int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        fetch.validate()
        self.fetch = fetch
        self.api_urls = dict(api_urls or {})
        self._sleep = sleep
        self._clock = clock
        self._now_ms = now_ms if now_ms is not None else (lambda: int(time.time() * 1000))
        self._rng = rng if rng is not None else random.Random()
        self._exchanges: dict[str, ccxt.Exchange] = {}
        self._markets_loaded: set[str] = set()
        # Tasks may share one source from several threads: create and load each client once.
        self._lock = threading.RLock()

    # ----- plumbing -----
    def exchange(self, exchange_id: str) -> ccxt.Exchange:
        """The cached client for ``exchange_id`` (created on first use; markets not loaded yet)."""
        with self._lock:
            ex = self._exchanges.get(exchange_id)
            if ex is None:
                ex = make_exchange(
                    exchange_id,
                    api_url=self.api_urls.get(exchange_id),
                    timeout_ms=self.fetch.timeout_ms,
                    rate_limit_ms=self.fetch.rate_limit_ms,
                )
                self._exchanges[exchange_id] = ex
            return ex

    def _call(self, ex: ccxt.Exchange, what: str, fn: Callable[[], Any]) -> Any:
        def attempt() -> Any:
            # A failure without an HTTP answer (timeout, reset) must not reuse an older Retry-After.
            ex.last_response_headers = None
            return fn()

        def retry_after() -> float | None:
            headers = ex.last_response_headers
            return parse_retry_after(headers.get("Retry-After")) if headers else None

        return call_with_retry(
            attempt,
            what=what,
            max_total_seconds=self.fetch.max_retry_seconds,
            base_seconds=self.fetch.backoff_base_seconds,
            max_seconds=self.fetch.backoff_max_seconds,
            retry_after=retry_after,
            sleep=self._sleep,
            clock=self._clock,
            rng=self._rng,
        )

    def _market_client(self, exchange_id: str, symbol: str) -> ccxt.Exchange:
        """The client with markets loaded (once, retried), after checking ``symbol`` is listed there."""
        ex = self.exchange(exchange_id)
        with self._lock:
            if exchange_id not in self._markets_loaded:
                self._call(ex, f"{exchange_id} load_markets", ex.load_markets)
                self._markets_loaded.add(exchange_id)
        if symbol not in ex.markets:
            close = difflib.get_close_matches(symbol, list(ex.markets), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SourceError(f"{exchange_id} has no market {symbol!r}{hint}")
        return ex

    def _page_limit(self, exchange_id: str, kind: str) -> int:
        cap = PAGE_MAX.get(exchange_id, {}).get(kind)
        return self.fetch.page_limit if cap is None else min(self.fetch.page_limit, cap)

    @staticmethod
    def _check_window(since_ms: int, until_ms: int) -> None:
        if since_ms >= until_ms:
            raise ConfigError(f"empty fetch window: since {_iso(since_ms)} is not before until {_iso(until_ms)}")

    # ----- data -----
    def fetch_ohlcv(
        self, exchange: str, symbol: str, timeframe: str, since_ms: int, until_ms: int
    ) -> Iterator[pd.DataFrame]:
        """Candles with bar open time in ``[since_ms, until_ms)``, one frame per exchange page.

        Pages are asked from ``since`` = last bar + one timeframe, so overlapping or short pages and holes
        in the exchange's data are handled; the loop ends on an empty page, past ``until_ms``, or when a
        page does not move forward.
        """
        step_ms = timeframe_ms(timeframe)
        self._check_window(since_ms, until_ms)
        self.exchange(exchange)  # unknown id -> ConfigError now, not at the first next()
        return self._ohlcv_pages(exchange, symbol, timeframe, step_ms, since_ms, until_ms)

    def _ohlcv_pages(
        self, exchange: str, symbol: str, timeframe: str, step_ms: int, since_ms: int, until_ms: int
    ) -> Iterator[pd.DataFrame]:
        ex = self._market_client(exchange, symbol)
        limit = self._page_limit(exchange, "ohlcv")
        cursor = since_ms
        while cursor < until_ms:
            at = cursor
            rows = self._call(
                ex,
                f"{exchange} fetch_ohlcv {symbol} {timeframe} since {_iso(at)}",
                partial(ex.fetch_ohlcv, symbol, timeframe, since=at, limit=limit),
            )
            page = ohlcv_frame(rows)
            if page.empty:  # no candles from `at` on: the end of the history
                return
            # Rows older than `at` were yielded already (or precede since_ms). A page made only of them
            # does not advance: asking again would loop forever.
            page = page[page["ts_ms"] >= at]
            if page.empty:
                log.warning("%s %s %s: page did not advance past %s; stopping", exchange, symbol, timeframe, _iso(at))
                return
            inside = page[page["ts_ms"] < until_ms].reset_index(drop=True)
            if not inside.empty:
                yield inside
            cursor = int(page["ts_ms"].iloc[-1]) + step_ms

    def fetch_funding(self, exchange: str, symbol: str, since_ms: int, until_ms: int) -> Iterator[pd.DataFrame]:
        """Funding rates with funding time in ``[since_ms, until_ms)``, one frame per exchange page.

        ``mark_price`` is the mark price the exchange reports at the funding time, NaN where it sends none.
        """
        self._check_window(since_ms, until_ms)
        self.exchange(exchange)
        return self._funding_pages(exchange, symbol, since_ms, until_ms)

    def _funding_pages(self, exchange: str, symbol: str, since_ms: int, until_ms: int) -> Iterator[pd.DataFrame]:
        ex = self._market_client(exchange, symbol)
        limit = self._page_limit(exchange, "funding")
        cursor = since_ms  # the next funding time wanted is >= cursor
        while cursor < until_ms:
            # Ask from one ms earlier: ccxt's bybit turns `since` into the window [since, since + limit x
            # interval] and Bybit returns the newest `limit` rows of it, so a `since` falling exactly on a
            # funding time would drop that row. Starting 1 ms early keeps it (or only drops the row already
            # held); the overlap is filtered out below.
            ask = max(cursor - 1, 0)
            rows = self._call(
                ex,
                f"{exchange} fetch_funding_rate_history {symbol} since {_iso(cursor)}",
                partial(ex.fetch_funding_rate_history, symbol, since=ask, limit=limit),
            )
            page = funding_frame(rows)
            page = page[page["ts_ms"] >= cursor]
            if page.empty:  # nothing newer: the end of the history (or a page that did not advance)
                return
            inside = page[page["ts_ms"] < until_ms].reset_index(drop=True)
            if not inside.empty:
                yield inside
            cursor = int(page["ts_ms"].iloc[-1]) + 1

    def fetch_book(self, exchange: str, symbol: str, levels: int) -> pd.DataFrame:
        """A snapshot of the best ``levels`` bids and asks now, in the long book layout.

        ``ts_ms`` is the exchange's book time, or the local wall clock when the exchange sends none.
        """
        if levels <= 0:
            raise ConfigError(f"book levels must be > 0, got {levels}")
        ex = self._market_client(exchange, symbol)
        depth = levels
        if exchange.startswith("binance"):
            depth = next((d for d in BINANCE_DEPTHS if d >= levels), BINANCE_DEPTHS[-1])
        book = self._call(
            ex,
            f"{exchange} fetch_order_book {symbol} limit {depth}",
            partial(ex.fetch_order_book, symbol, limit=depth),
        )
        return book_frame(book, levels, self._now_ms())

    def close(self) -> None:
        """Close every client's HTTP session; the source can be used again afterwards (new clients)."""
        with self._lock:
            for ex in self._exchanges.values():
                ex.close()
            self._exchanges.clear()
            self._markets_loaded.clear()

    def __enter__(self) -> CcxtSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
