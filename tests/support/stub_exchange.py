"""A local fake exchange on 127.0.0.1 that speaks the real Binance USDⓈ-M and Bybit v5 REST JSON.

ccxt's own code (URL building, parsing, error mapping, rate limiter) runs unchanged against it: point a
client at :attr:`StubExchange.url` (``cryptoml.market.exchange.make_exchange(..., api_url=stub.url)``).
One stub serves both venues from the same in-memory data, keyed by exchange symbol id (``BTCUSDT``):

- candles per (symbol, timeframe) in the store schema ``ts_ms`` (bar open, UTC ms) + open/high/low/close/
  volume; funding rows ``ts_ms, funding_rate, mark_price``; order books (bids/asks best first).
- Binance USDⓈ-M: ``/fapi/v1/exchangeInfo`` (a recorded body when given, plus generated entries for served
  symbols it lacks), ``/fapi/v1/klines`` (12-field rows, limit default 500 / max 1500), ``/fapi/v1/fundingRate``
  (default 100 / max 1000), ``/fapi/v1/depth`` (limit in 5, 10, 20, 50, 100, 500, 1000), ``/fapi/v1/time``.
- Binance spot (the spot legs of the funding-arbitrage scorer, ``ccxt.binance`` with
  ``fetchMarkets.types = ["spot"]``): ``/api/v3/exchangeInfo`` (a recorded body when given, plus generated
  entries for served spot symbols), ``/api/v3/klines`` (default 500 / max 1000), ``/api/v3/depth`` (default
  100 / max 5000, no timestamp, as the venue), ``/api/v3/time``, ``/api/v3/ping``. Spot data is kept apart
  from the perps' (``set_spot_candles`` / ``set_spot_book``).
- Binance USDⓈ-M **signed** endpoints (the ``--live`` broker, after :meth:`StubExchange.set_account`):
  ``POST/GET/DELETE /fapi/v1/order`` (market orders fill at once at the symbol's mark; limits rest),
  ``POST/GET/DELETE /fapi/v1/algoOrder`` (stop / take-profit: ccxt 4.5 sends conditional orders there; they
  rest until :meth:`StubExchange.trigger_algo`), ``GET /fapi/v3/positionRisk``, ``GET /fapi/v3/account``,
  ``GET /fapi/v1/leverageBracket``. Every one checks the ``X-MBX-APIKEY`` header and the HMAC-SHA256
  ``signature`` of the query (or form body) with the account's secret, as Binance does (-2015 / -1022 on
  failure); a ``newClientOrderId`` / ``clientAlgoId`` used before is refused like the venue (-4116
  "ClientOrderId is duplicated." / -20132); an unknown order is -2013 (query) or -2011 (cancel).
- Bybit v5: ``/v5/market/instruments-info`` (linear perpetuals for the served symbols), ``/v5/market/kline``
  (newest first, default 200 / max 1000), ``/v5/market/funding/history`` (newest first, max 200, ``startTime``
  alone is an error), ``/v5/market/orderbook`` (linear max 500), ``/v5/market/time``.

Paging follows the venues' documented rules: with a start time the oldest ``limit`` rows from it are
served; without one the newest ``limit`` rows up to the end time; Bybit funding with both bounds serves the
newest ``limit`` rows of the range. Fields a test frame does not carry (Binance quote volume, trade counts,
taker volumes; Bybit turnover) are derived from it. Unknown paths get a 404 JSON body and are recorded in
:attr:`StubExchange.unknown_paths`; every request is counted per path.

Faults are programmed per path prefix (``stub.faults.add("/fapi/v1/klines", "429", times=2,
retry_after_s=1)``); data quirks (short pages, duplicated rows, rows before the asked start) are set on
:attr:`StubExchange.quirks`; holes are simply rows left out of the served frame.

Run it standalone for manual CLI tries (serves until Ctrl-C)::

    python -m tests.support.stub_exchange --port 8765 \\
        --data ../shared/data/binance_spot_btcusdt_1m_20230417-20230517.parquet --symbol BTCUSDT

and point the project at it with ``market.api_urls: {binanceusdm: "http://127.0.0.1:8765"}`` in
params.yaml (or ``make_exchange("binanceusdm", api_url="http://127.0.0.1:8765")``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import numpy as np
import pandas as pd

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
FAPI_EXCHANGE_INFO = DATA_DIR / "binance_fapi_v1_exchangeInfo_20210722.json"
SPOT_EXCHANGE_INFO = DATA_DIR / "binance_spot_api_v3_exchangeInfo_trimmed_20211022.json"

# The venues' documented per-request limits (default, max).
BINANCE_KLINES_LIMIT = (500, 1500)
BINANCE_FUNDING_LIMIT = (100, 1000)
BINANCE_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)
BINANCE_DEPTH_DEFAULT = 500
BINANCE_SPOT_KLINES_LIMIT = (500, 1000)
BINANCE_SPOT_DEPTH_LIMIT = (100, 5000)
BYBIT_KLINE_LIMIT = (200, 1000)
BYBIT_FUNDING_LIMIT = (200, 200)
BYBIT_BOOK_LIMIT = (25, 500)  # linear / inverse

_MINUTE_MS = 60_000
BINANCE_INTERVALS_MS = {
    "1m": _MINUTE_MS,
    "3m": 3 * _MINUTE_MS,
    "5m": 5 * _MINUTE_MS,
    "15m": 15 * _MINUTE_MS,
    "30m": 30 * _MINUTE_MS,
    "1h": 60 * _MINUTE_MS,
    "2h": 120 * _MINUTE_MS,
    "4h": 240 * _MINUTE_MS,
    "6h": 360 * _MINUTE_MS,
    "8h": 480 * _MINUTE_MS,
    "12h": 720 * _MINUTE_MS,
    "1d": 1440 * _MINUTE_MS,
    "3d": 3 * 1440 * _MINUTE_MS,
    "1w": 7 * 1440 * _MINUTE_MS,
}
BYBIT_INTERVALS_MS = {
    **{str(m): m * _MINUTE_MS for m in (1, 3, 5, 15, 30, 60, 120, 240, 360, 720)},
    "D": 1440 * _MINUTE_MS,
    "W": 7 * 1440 * _MINUTE_MS,
}
QUOTES = ("USDT", "USDC", "BUSD")
FAULT_KINDS = ("429", "418", "403", "500", "502", "503", "504", "slow", "truncate", "bad_json", "reset", "reject")

HTML_ERRORS = {
    403: "403 Forbidden",
    500: "500 Internal Server Error",
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    504: "504 Gateway Time-out",
}


def now_ms() -> int:
    return int(time.time() * 1000)


def num(x: float) -> str:
    """A float as the exchanges write it: positional, shortest round-trip digits (29496.94, 0.0001)."""
    return np.format_float_positional(float(x), trim="-")


def split_symbol(symbol_id: str) -> tuple[str, str]:
    """``BTCUSDT`` -> (``BTC``, ``USDT``)."""
    for quote in QUOTES:
        if symbol_id.endswith(quote) and len(symbol_id) > len(quote):
            return symbol_id[: -len(quote)], quote
    raise ValueError(f"cannot split {symbol_id!r} into base and quote (quotes known: {QUOTES})")


def load_candles(path: str | Path) -> pd.DataFrame:
    """Read a candle file (Parquet, Feather or CSV) into the store schema ts_ms/open/high/low/close/volume.

    Accepts the store layout (``ts_ms``) or the shared-data layout (``date`` or ``open_time`` = bar open,
    tz-aware UTC).
    """
    p = Path(path)
    if p.suffix == ".parquet":
        raw = pd.read_parquet(p)
    elif p.suffix == ".feather":
        raw = pd.read_feather(p)
    else:
        raw = pd.read_csv(p)
    return candles_to_store(raw)


def candles_to_store(raw: pd.DataFrame) -> pd.DataFrame:
    """A candle frame with ``ts_ms`` or a datetime ``date``/``open_time`` column -> store schema."""
    if "ts_ms" in raw.columns:
        ts = raw["ts_ms"].astype("int64")
    else:
        col = "date" if "date" in raw.columns else "open_time"
        when = pd.to_datetime(raw[col], utc=True)
        ts = (when - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    out = pd.DataFrame({"ts_ms": ts.to_numpy(dtype="int64")})
    for name in ("open", "high", "low", "close", "volume"):
        out[name] = raw[name].to_numpy(dtype="float64")
    return out.sort_values("ts_ms", kind="stable").reset_index(drop=True)


@dataclass
class Fault:
    """One programmed failure for requests whose path starts with ``path_prefix``."""

    path_prefix: str
    kind: str
    remaining: int | None  # None = every matching request, forever
    retry_after_s: float | None = None
    delay_s: float = 1.0


class FaultPlan:
    """Thread-safe queue of faults; the first matching fault with requests left is applied.

    Kinds: ``429`` (the venue's rate-limit JSON) / ``418`` (Binance's IP ban), both with ``Retry-After``
    when ``retry_after_s`` is set; ``403`` (the HTML page of an IP ban, Bybit's rate-limit answer);
    ``500`` / ``502`` / ``503`` / ``504`` (HTML body); ``slow`` (answer after ``delay_s``); ``truncate``
    (Content-Length of the whole body, half of it sent, connection closed); ``bad_json`` (a complete 200
    response whose JSON body is cut in half); ``reset`` (connection closed without an answer); ``reject``
    (the venue's "invalid symbol" answer: a permanent error, not worth retrying).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(
        self,
        path_prefix: str,
        kind: str,
        times: int | None = 1,
        *,
        retry_after_s: float | None = None,
        delay_s: float = 1.0,
    ) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if times is not None and times <= 0:
            raise ValueError(f"times must be > 0 or None (forever), got {times}")
        with self._lock:
            self._faults.append(Fault(path_prefix, kind, times, retry_after_s, delay_s))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if path.startswith(fault.path_prefix) and fault.remaining != 0:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    def pending(self) -> int:
        """Faults still to be served (a forever fault counts as one)."""
        with self._lock:
            return sum(1 for f in self._faults if f.remaining != 0)


@dataclass
class Quirks:
    """Data-level misbehaviour of the candle and funding endpoints (all off by default)."""

    short_page_rows: int | None = None  # serve at most this many rows, whatever limit was asked
    duplicate_rows: bool = False  # every served row appears twice in the page
    rows_before_start: int = 0  # also serve this many rows older than the asked start (overlap)
    ignore_start: bool = False  # answer every request as if no start time had been asked


@dataclass
class Book:
    """An order-book snapshot; bids descending and asks ascending (best first), prices and sizes."""

    bids: list[tuple[float, float]]
    asks: list[tuple[float, float]]
    ts_ms: int
    update_id: int = 1


@dataclass
class _Series:
    """Served rows as sorted numpy columns (fast slicing per request)."""

    ts: np.ndarray
    cols: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, names: tuple[str, ...]) -> _Series:
        df = df.sort_values("ts_ms", kind="stable")
        return cls(
            ts=df["ts_ms"].to_numpy(dtype="int64"),
            cols={n: df[n].to_numpy(dtype="float64") for n in names},
        )


class ApiError(Exception):
    """An error answer: HTTP status and JSON body."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body


@dataclass
class _Account:
    """The signed-endpoint account: credentials, USDT wallet, one-way positions and orders by client id."""

    api_key: str
    secret: str
    wallet: float
    taker_fee_bps: float = 4.0
    positions: dict[str, list[float]] = field(default_factory=dict)  # symbol -> [amount (signed), entry price]
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)  # clientOrderId -> order JSON
    algo_orders: dict[str, dict[str, Any]] = field(default_factory=dict)  # clientAlgoId -> algo order JSON
    next_id: int = 1000


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    return int(value)


class StubExchange:
    """The fake exchange; start it with ``with StubExchange() as stub:`` (or :meth:`start` / :meth:`stop`)."""

    def __init__(
        self,
        *,
        exchange_info: Mapping[str, Any] | None = None,
        spot_exchange_info: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.faults = FaultPlan()
        self.quirks = Quirks()
        self.unknown_paths: list[str] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._counts: Counter[str] = Counter()
        self._lock = threading.RLock()  # re-entrant: signed routes run under it and read marks and symbols
        self._exchange_info = dict(exchange_info) if exchange_info is not None else None
        self._spot_exchange_info = dict(spot_exchange_info) if spot_exchange_info is not None else None
        self._spot_candles: dict[tuple[str, int], _Series] = {}
        self._spot_books: dict[str, Book] = {}
        self._candles: dict[tuple[str, int], _Series] = {}
        self._funding: dict[str, _Series] = {}
        self._books: dict[str, Book] = {}
        self._extra_symbols: set[str] = {"BTCUSDT", "ETHUSDT"}
        self._account: _Account | None = None
        self._marks: dict[str, float] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- data -----
    def set_candles(self, symbol_id: str, df: pd.DataFrame, timeframe_ms: int = _MINUTE_MS) -> None:
        """Serve ``df`` (store schema, ``ts_ms`` = bar open) as ``symbol_id`` candles of that timeframe."""
        split_symbol(symbol_id)
        series = _Series.from_frame(df, ("open", "high", "low", "close", "volume"))
        with self._lock:
            self._candles[(symbol_id, timeframe_ms)] = series

    def set_funding(self, symbol_id: str, df: pd.DataFrame) -> None:
        """Serve ``df`` (ts_ms = funding time, funding_rate, optional mark_price) as funding history."""
        split_symbol(symbol_id)
        if "mark_price" not in df.columns:
            df = df.assign(mark_price=np.nan)
        series = _Series.from_frame(df, ("funding_rate", "mark_price"))
        with self._lock:
            self._funding[symbol_id] = series

    def set_book(self, symbol_id: str, book: Book) -> None:
        split_symbol(symbol_id)
        with self._lock:
            self._books[symbol_id] = book

    def set_spot_candles(self, symbol_id: str, df: pd.DataFrame, timeframe_ms: int = _MINUTE_MS) -> None:
        """Serve ``df`` (store schema) as Binance **spot** ``symbol_id`` candles (``/api/v3/klines``)."""
        split_symbol(symbol_id)
        series = _Series.from_frame(df, ("open", "high", "low", "close", "volume"))
        with self._lock:
            self._spot_candles[(symbol_id, timeframe_ms)] = series

    def set_spot_book(self, symbol_id: str, book: Book) -> None:
        split_symbol(symbol_id)
        with self._lock:
            self._spot_books[symbol_id] = book

    def spot_symbols(self) -> list[str]:
        with self._lock:
            return sorted({sym for sym, _ in self._spot_candles} | set(self._spot_books))

    def add_symbol(self, symbol_id: str) -> None:
        """List a symbol in the market lists even without data for it."""
        split_symbol(symbol_id)
        with self._lock:
            self._extra_symbols.add(symbol_id)

    def symbols(self) -> list[str]:
        with self._lock:
            ids = set(self._extra_symbols) | set(self._funding) | set(self._books)
            ids |= {sym for sym, _ in self._candles}
        return sorted(ids)

    # ----- bookkeeping -----
    def count(self, path: str) -> int:
        """Requests received for exactly ``path`` (faulty ones included)."""
        with self._lock:
            return self._counts[path]

    def queries(self, path: str) -> list[dict[str, str]]:
        """Query parameters of every request to ``path``, in arrival order."""
        with self._lock:
            return [q for p, q in self.requests if p == path]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self.requests.clear()
            self.unknown_paths.clear()

    def _record(self, path: str, query: dict[str, str]) -> None:
        with self._lock:
            self._counts[path] += 1
            self.requests.append((path, query))

    # ----- server lifecycle -----
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the stub exchange is not started")
        port = self._server.server_address[1]
        return f"http://{self.host}:{port}"

    def start(self) -> StubExchange:
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler)
        server.stub = self
        self._server = server
        # A short poll interval makes stop() quick (shutdown waits for the serving loop to notice).
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="stub-exchange", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> StubExchange:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- shared selection rules -----
    def _select(self, series: _Series, start: int | None, end: int | None, limit: int, newest: bool) -> np.ndarray:
        """Row indices in [start, end], the oldest ``limit`` (or newest when ``newest``), quirks applied."""
        q = self.quirks
        if q.ignore_start:
            start = None
            newest = False
        lo = 0 if start is None else int(np.searchsorted(series.ts, start, side="left"))
        hi = len(series.ts) if end is None else int(np.searchsorted(series.ts, end, side="right"))
        if q.short_page_rows is not None:
            limit = min(limit, q.short_page_rows)
        idx = np.arange(max(lo, hi - limit), hi) if newest else np.arange(lo, min(hi, lo + limit))
        if q.rows_before_start and start is not None and len(idx):
            first = int(idx[0])
            idx = np.concatenate([np.arange(max(0, first - q.rows_before_start), first), idx])
        if q.duplicate_rows:
            idx = np.repeat(idx, 2)
        return idx

    # ----- Binance USDⓈ-M -----
    def binance_exchange_info(self) -> dict[str, Any]:
        if self._exchange_info is not None:
            body = json.loads(json.dumps(self._exchange_info))
        else:
            body = {
                "timezone": "UTC",
                "serverTime": now_ms(),
                "futuresType": "U_MARGINED",
                "rateLimits": [
                    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 2400},
                    {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
                ],
                "exchangeFilters": [],
                "assets": [],
                "symbols": [],
            }
        known = {s["symbol"] for s in body["symbols"]}
        for symbol_id in self.symbols():
            if symbol_id not in known:
                body["symbols"].append(_binance_symbol_entry(symbol_id))
        return body

    def _binance_symbol(self, query: Mapping[str, str]) -> str:
        symbol = query.get("symbol")
        if not symbol:
            raise ApiError(
                400,
                {
                    "code": -1102,
                    "msg": "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
                },
            )
        known = {s["symbol"] for s in self.binance_exchange_info()["symbols"]}
        if symbol not in known:
            raise ApiError(400, {"code": -1121, "msg": "Invalid symbol."})
        return symbol

    @staticmethod
    def _binance_limit(query: Mapping[str, str], default_max: tuple[int, int]) -> int:
        default, maximum = default_max
        limit = _int_param(query, "limit")
        if limit is None:
            return default
        if not 1 <= limit <= maximum:
            raise ApiError(400, {"code": -1130, "msg": "Data sent for parameter 'limit' is not valid."})
        return limit

    def binance_klines(self, query: Mapping[str, str], spot: bool = False) -> list[list[Any]]:
        symbol = self._binance_spot_symbol(query) if spot else self._binance_symbol(query)
        interval_ms = BINANCE_INTERVALS_MS.get(query.get("interval", ""))
        if interval_ms is None:
            raise ApiError(400, {"code": -1120, "msg": "Invalid interval."})
        limit = self._binance_limit(query, BINANCE_SPOT_KLINES_LIMIT if spot else BINANCE_KLINES_LIMIT)
        start, end = _int_param(query, "startTime"), _int_param(query, "endTime")
        with self._lock:
            series = (self._spot_candles if spot else self._candles).get((symbol, interval_ms))
        if series is None:
            return []
        idx = self._select(series, start, end, limit, newest=start is None)
        c = series.cols
        rows = []
        for i in idx:
            ts = int(series.ts[i])
            volume, close = c["volume"][i], c["close"][i]
            rows.append(
                [
                    ts,
                    num(c["open"][i]),
                    num(c["high"][i]),
                    num(c["low"][i]),
                    num(close),
                    num(volume),
                    ts + interval_ms - 1,
                    num(round(volume * close, 8)),
                    max(1, int(volume * 10)),
                    num(round(volume / 2, 8)),
                    num(round(volume * close / 2, 8)),
                    "0",
                ]
            )
        return rows

    def binance_funding(self, query: Mapping[str, str]) -> list[dict[str, Any]]:
        symbols = [self._binance_symbol(query)] if query.get("symbol") else sorted(self._funding)
        limit = self._binance_limit(query, BINANCE_FUNDING_LIMIT)
        start, end = _int_param(query, "startTime"), _int_param(query, "endTime")
        out: list[dict[str, Any]] = []
        for symbol in symbols:
            with self._lock:
                series = self._funding.get(symbol)
            if series is None:
                continue
            for i in self._select(series, start, end, limit, newest=start is None):
                row = {
                    "symbol": symbol,
                    "fundingTime": int(series.ts[i]),
                    "fundingRate": num(series.cols["funding_rate"][i]),
                }
                mark = series.cols["mark_price"][i]
                if not np.isnan(mark):
                    row["markPrice"] = num(mark)
                out.append(row)
        return out

    def binance_depth(self, query: Mapping[str, str]) -> dict[str, Any]:
        symbol = self._binance_symbol(query)
        limit = _int_param(query, "limit") or BINANCE_DEPTH_DEFAULT
        if limit not in BINANCE_DEPTH_LIMITS:
            legal = ", ".join(str(v) for v in BINANCE_DEPTH_LIMITS)
            raise ApiError(
                400,
                {"code": -1100, "msg": f"Illegal characters found in parameter 'limit'; legal range is '{legal}'."},
            )
        with self._lock:
            book = self._books.get(symbol)
        if book is None:
            book = Book(bids=[], asks=[], ts_ms=now_ms())
        return {
            "lastUpdateId": book.update_id,
            "E": book.ts_ms,
            "T": book.ts_ms,
            "bids": [[num(p), num(q)] for p, q in book.bids[:limit]],
            "asks": [[num(p), num(q)] for p, q in book.asks[:limit]],
        }

    # ----- Binance spot -----
    def binance_spot_exchange_info(self) -> dict[str, Any]:
        if self._spot_exchange_info is not None:
            body = json.loads(json.dumps(self._spot_exchange_info))
        else:
            body = {
                "timezone": "UTC",
                "serverTime": now_ms(),
                "rateLimits": [
                    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
                    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 50},
                ],
                "exchangeFilters": [],
                "symbols": [],
            }
        known = {s["symbol"] for s in body["symbols"]}
        for symbol_id in self.spot_symbols():
            if symbol_id not in known:
                body["symbols"].append(_binance_spot_symbol_entry(symbol_id))
        return body

    def _binance_spot_symbol(self, query: Mapping[str, str]) -> str:
        symbol = query.get("symbol")
        if not symbol:
            raise ApiError(
                400, {"code": -1102, "msg": "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."}
            )
        if symbol not in {s["symbol"] for s in self.binance_spot_exchange_info()["symbols"]}:
            raise ApiError(400, {"code": -1121, "msg": "Invalid symbol."})
        return symbol

    def binance_spot_depth(self, query: Mapping[str, str]) -> dict[str, Any]:
        symbol = self._binance_spot_symbol(query)
        limit = self._binance_limit(query, BINANCE_SPOT_DEPTH_LIMIT)
        with self._lock:
            book = self._spot_books.get(symbol)
        if book is None:
            book = Book(bids=[], asks=[], ts_ms=now_ms())
        return {  # the spot venue stamps no time on a depth answer
            "lastUpdateId": book.update_id,
            "bids": [[num(p), num(q)] for p, q in book.bids[:limit]],
            "asks": [[num(p), num(q)] for p, q in book.asks[:limit]],
        }

    # ----- Binance USDⓈ-M, signed -----
    def set_account(self, api_key: str, secret: str, wallet_usdt: float = 10_000.0, taker_fee_bps: float = 4.0) -> None:
        """Open the signed endpoints for one API key / secret with a USDT wallet (and no position)."""
        with self._lock:
            self._account = _Account(api_key, secret, wallet_usdt, taker_fee_bps)

    def set_mark(self, symbol_id: str, price: float) -> None:
        """The price market orders of ``symbol_id`` fill at (default: the last served candle's close)."""
        with self._lock:
            self._marks[symbol_id] = float(price)

    def mark(self, symbol_id: str) -> float:
        with self._lock:
            if symbol_id in self._marks:
                return self._marks[symbol_id]
            series = self._candles.get((symbol_id, _MINUTE_MS))
        return float(series.cols["close"][-1]) if series is not None and len(series.ts) else 100.0

    def check_signature(self, headers: Mapping[str, str], payload: str) -> None:
        """Binance's checks of a signed request: the key header, then HMAC-SHA256(secret, payload minus the
        trailing ``signature`` parameter) against that parameter."""
        account = self._account
        if account is None or headers.get("X-MBX-APIKEY") != account.api_key:
            raise ApiError(401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."})
        signed, sep, signature = payload.rpartition("&signature=")
        want = hmac.new(account.secret.encode(), signed.encode(), hashlib.sha256).hexdigest()
        if not sep or not hmac.compare_digest(signature, want):
            raise ApiError(400, {"code": -1022, "msg": "Signature for this request is not valid."})
        if "timestamp=" not in signed:
            raise ApiError(
                400,
                {"code": -1102, "msg": "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed."},
            )

    def _new_id(self) -> int:
        assert self._account is not None
        self._account.next_id += 1
        return self._account.next_id

    def _fill(self, symbol: str, side: str, qty: float, price: float) -> None:
        """Book a taker fill on the one-way position (realised PnL and fee to the wallet)."""
        account = self._account
        assert account is not None
        amt, entry = account.positions.get(symbol, [0.0, 0.0])
        delta = qty if side == "BUY" else -qty
        if amt and (amt > 0) != (delta > 0):  # reduces (or flips) the position
            closed = min(abs(delta), abs(amt))
            account.wallet += closed * (price - entry) * (1 if amt > 0 else -1)
        new = amt + delta
        if abs(new) < 1e-12:
            new, entry = 0.0, 0.0
        elif amt == 0 or (amt > 0) != (new > 0):
            entry = price
        elif (amt > 0) == (delta > 0):
            entry = (amt * entry + delta * price) / new
        account.positions[symbol] = [new, entry]
        account.wallet -= qty * price * account.taker_fee_bps / 10_000

    def _order_json(self, order: dict[str, Any]) -> dict[str, Any]:
        return dict(order)

    def binance_new_order(self, q: Mapping[str, str]) -> dict[str, Any]:
        symbol = self._binance_symbol(q)
        account = self._account
        assert account is not None
        cid = q.get("newClientOrderId") or f"stub{self._new_id()}"
        if cid in account.orders:
            raise ApiError(400, {"code": -4116, "msg": "ClientOrderId is duplicated."})
        kind, side, qty = q.get("type", ""), q.get("side", ""), float(q.get("quantity", "0"))
        if kind not in ("MARKET", "LIMIT") or side not in ("BUY", "SELL") or qty <= 0:
            raise ApiError(400, {"code": -1116, "msg": "Invalid orderType."})
        now = now_ms()
        order = {
            "orderId": self._new_id(), "symbol": symbol, "status": "NEW", "clientOrderId": cid,
            "price": q.get("price", "0"), "avgPrice": "0", "origQty": num(qty), "executedQty": "0", "cumQty": "0",
            "cumQuote": "0", "timeInForce": q.get("timeInForce", "GTC"), "type": kind,
            "reduceOnly": q.get("reduceOnly") == "true", "closePosition": False, "side": side, "positionSide": "BOTH",
            "stopPrice": "0", "workingType": "CONTRACT_PRICE", "priceProtect": False, "origType": kind,
            "priceMatch": "NONE", "selfTradePreventionMode": "EXPIRE_MAKER", "goodTillDate": 0, "time": now,
            "updateTime": now,
        }  # fmt: skip
        if kind == "MARKET":
            price = self.mark(symbol)
            self._fill(symbol, side, qty, price)
            order.update(status="FILLED", avgPrice=num(price), executedQty=num(qty), cumQty=num(qty),
                         cumQuote=num(round(qty * price, 8)))  # fmt: skip
        account.orders[cid] = order
        return self._order_json(order)

    def _find_order(self, q: Mapping[str, str], cancel: bool) -> dict[str, Any]:
        account = self._account
        assert account is not None
        self._binance_symbol(q)
        cid = q.get("origClientOrderId")
        order = account.orders.get(cid) if cid else None
        if order is None and q.get("orderId"):
            order = next((o for o in account.orders.values() if str(o["orderId"]) == q["orderId"]), None)
        if order is None:
            raise ApiError(400, {"code": -2011, "msg": "Unknown order sent."} if cancel else
                           {"code": -2013, "msg": "Order does not exist."})  # fmt: skip
        return order

    def binance_get_order(self, q: Mapping[str, str]) -> dict[str, Any]:
        return self._order_json(self._find_order(q, cancel=False))

    def binance_cancel_order(self, q: Mapping[str, str]) -> dict[str, Any]:
        order = self._find_order(q, cancel=True)
        if order["status"] != "NEW":
            raise ApiError(400, {"code": -2011, "msg": "Unknown order sent."})
        order.update(status="CANCELED", updateTime=now_ms())
        return self._order_json(order)

    def binance_new_algo_order(self, q: Mapping[str, str]) -> dict[str, Any]:
        symbol = self._binance_symbol(q)
        account = self._account
        assert account is not None
        cid = q.get("clientAlgoId") or f"stubalgo{self._new_id()}"
        if cid in account.algo_orders:
            raise ApiError(400, {"code": -20132, "msg": "The client algo id is duplicated."})
        kind, side = q.get("type", ""), q.get("side", "")
        if q.get("algoType") != "CONDITIONAL" or kind not in (
            "STOP_MARKET",
            "TAKE_PROFIT_MARKET",
            "STOP",
            "TAKE_PROFIT",
        ):
            raise ApiError(400, {"code": -1116, "msg": "Invalid orderType."})
        now = now_ms()
        order = {
            "algoId": self._new_id(), "clientAlgoId": cid, "algoType": "CONDITIONAL", "orderType": kind,
            "symbol": symbol, "side": side, "positionSide": "BOTH", "timeInForce": q.get("timeInForce", "GTC"),
            "quantity": q.get("quantity", "0"), "algoStatus": "NEW", "triggerPrice": q.get("triggerPrice", "0"),
            "price": q.get("price", "0"), "icebergQuantity": None, "selfTradePreventionMode": "EXPIRE_MAKER",
            "workingType": q.get("workingType", "CONTRACT_PRICE"), "priceMatch": "NONE", "closePosition": False,
            "priceProtect": False, "reduceOnly": q.get("reduceOnly") == "true", "activatePrice": "",
            "callbackRate": "", "createTime": now, "updateTime": now, "triggerTime": 0, "goodTillDate": 0,
        }  # fmt: skip
        account.algo_orders[cid] = order
        return dict(order)

    def _find_algo(self, q: Mapping[str, str], cancel: bool) -> dict[str, Any]:
        account = self._account
        assert account is not None
        order = account.algo_orders.get(q.get("clientAlgoId", ""))
        if order is None and q.get("algoId"):
            order = next((o for o in account.algo_orders.values() if str(o["algoId"]) == q["algoId"]), None)
        if order is None:
            raise ApiError(400, {"code": -2011, "msg": "Unknown order sent."} if cancel else
                           {"code": -2013, "msg": "Order does not exist."})  # fmt: skip
        return order

    def binance_get_algo_order(self, q: Mapping[str, str]) -> dict[str, Any]:
        return dict(self._find_algo(q, cancel=False))

    def binance_cancel_algo_order(self, q: Mapping[str, str]) -> dict[str, Any]:
        order = self._find_algo(q, cancel=True)
        if order["algoStatus"] != "NEW":
            raise ApiError(400, {"code": -2011, "msg": "Unknown order sent."})
        order.update(algoStatus="CANCELED", updateTime=now_ms())
        return {"algoId": order["algoId"], "clientAlgoId": order["clientAlgoId"], "code": "200", "msg": "success"}

    def trigger_algo(self, client_algo_id: str, price: float | None = None) -> None:
        """The market reached a resting stop / take-profit: it fills (at ``price``, default its trigger)."""
        with self._lock:
            account = self._account
            assert account is not None
            order = account.algo_orders[client_algo_id]
            fill = float(order["triggerPrice"]) if price is None else price
            self._fill(order["symbol"], order["side"], float(order["quantity"]), fill)
            order.update(algoStatus="FINISHED", updateTime=now_ms(), triggerTime=now_ms(), actualPrice=num(fill))

    def binance_position_risk(self, q: Mapping[str, str]) -> list[dict[str, Any]]:
        account = self._account
        assert account is not None
        wanted = q.get("symbol")
        out = []
        for symbol, (amt, entry) in sorted(account.positions.items()):
            if amt == 0 or (wanted and wanted != symbol):
                continue  # v3 lists only the symbols with a position
            mark = self.mark(symbol)
            margin = num(round(abs(amt) * mark, 8))
            out.append({
                "symbol": symbol, "positionSide": "BOTH", "positionAmt": num(amt), "entryPrice": num(entry),
                "breakEvenPrice": num(entry), "markPrice": num(mark),
                "unRealizedProfit": num(round(amt * (mark - entry), 8)), "liquidationPrice": "0",
                "isolatedMargin": "0", "notional": num(round(amt * mark, 8)), "marginAsset": "USDT",
                "isolatedWallet": "0", "initialMargin": margin, "maintMargin": "0", "positionInitialMargin": margin,
                "openOrderInitialMargin": "0", "adl": 0, "bidNotional": "0", "askNotional": "0",
                "updateTime": now_ms(),
            })  # fmt: skip
        return out

    def binance_account(self, q: Mapping[str, str]) -> dict[str, Any]:
        account = self._account
        assert account is not None
        unrealised = sum(amt * (self.mark(s) - entry) for s, (amt, entry) in account.positions.items())
        wallet, margin = num(round(account.wallet, 8)), num(round(account.wallet + unrealised, 8))
        upnl = num(round(unrealised, 8))
        return {
            "totalInitialMargin": "0", "totalMaintMargin": "0", "totalWalletBalance": wallet,
            "totalUnrealizedProfit": upnl, "totalMarginBalance": margin, "totalPositionInitialMargin": "0",
            "totalOpenOrderInitialMargin": "0", "totalCrossWalletBalance": wallet, "totalCrossUnPnl": upnl,
            "availableBalance": margin, "maxWithdrawAmount": margin,
            "assets": [{
                "asset": "USDT", "walletBalance": wallet, "unrealizedProfit": upnl, "marginBalance": margin,
                "maintMargin": "0", "initialMargin": "0", "positionInitialMargin": "0", "openOrderInitialMargin": "0",
                "crossWalletBalance": wallet, "crossUnPnl": upnl, "availableBalance": margin,
                "maxWithdrawAmount": margin, "updateTime": now_ms(),
            }],
            "positions": [],
        }  # fmt: skip

    def binance_leverage_brackets(self, q: Mapping[str, str]) -> list[dict[str, Any]]:
        bracket = {"bracket": 1, "initialLeverage": 125, "notionalCap": 50000, "notionalFloor": 0,
                   "maintMarginRatio": 0.004, "cum": 0.0}  # fmt: skip
        return [{"symbol": s, "brackets": [bracket]} for s in self.symbols()]

    def signed_routes(self) -> dict[tuple[str, str], Callable[[Mapping[str, str]], Any]]:
        return {
            ("POST", "/fapi/v1/order"): self.binance_new_order,
            ("GET", "/fapi/v1/order"): self.binance_get_order,
            ("DELETE", "/fapi/v1/order"): self.binance_cancel_order,
            ("POST", "/fapi/v1/algoOrder"): self.binance_new_algo_order,
            ("GET", "/fapi/v1/algoOrder"): self.binance_get_algo_order,
            ("DELETE", "/fapi/v1/algoOrder"): self.binance_cancel_algo_order,
            ("GET", "/fapi/v3/positionRisk"): self.binance_position_risk,
            ("GET", "/fapi/v3/account"): self.binance_account,
            ("GET", "/fapi/v1/leverageBracket"): self.binance_leverage_brackets,
        }

    def answer_signed(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], payload: str
    ) -> tuple[int, Any] | None:
        """Status and JSON body of a signed request, None when (method, path) is not a signed route."""
        route = self.signed_routes().get((method, path))
        if route is None:
            return None
        try:
            self.check_signature(headers, payload)
            with self._lock:
                return 200, route(query)
        except ApiError as e:
            return e.status, e.body
        except ValueError as e:
            return 400, {"code": -1100, "msg": f"Illegal characters found in a parameter: {e}"}

    # ----- Bybit v5 -----
    @staticmethod
    def _bybit_ok(result: Any) -> dict[str, Any]:
        return {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": now_ms()}

    @staticmethod
    def _bybit_error(code: int, msg: str) -> ApiError:
        # Bybit answers parameter errors with HTTP 200 and a non-zero retCode.
        return ApiError(200, {"retCode": code, "retMsg": msg, "result": {}, "retExtInfo": {}, "time": now_ms()})

    def _bybit_symbol(self, query: Mapping[str, str]) -> str:
        symbol = query.get("symbol")
        if not symbol:
            raise self._bybit_error(10001, "params error: symbol is required")
        if symbol not in self.symbols():
            raise self._bybit_error(10001, "params error: Symbol Is Invalid")
        if query.get("category", "linear") != "linear":
            raise self._bybit_error(10001, "params error: the stub serves category=linear only")
        return symbol

    def _bybit_limit(self, query: Mapping[str, str], default_max: tuple[int, int]) -> int:
        default, maximum = default_max
        limit = _int_param(query, "limit")
        if limit is None:
            return default
        if not 1 <= limit <= maximum:
            raise self._bybit_error(10001, f"params error: limit must be in [1, {maximum}]")
        return limit

    def bybit_instruments(self, query: Mapping[str, str]) -> dict[str, Any]:
        category = query.get("category", "")
        items: list[dict[str, Any]] = []
        if category == "linear" and query.get("status", "Trading") == "Trading":
            wanted = query.get("symbol")
            items = [_bybit_instrument(s) for s in self.symbols() if wanted in (None, s)]
        return self._bybit_ok({"category": category, "list": items, "nextPageCursor": ""})

    def bybit_kline(self, query: Mapping[str, str]) -> dict[str, Any]:
        symbol = self._bybit_symbol(query)
        interval_ms = BYBIT_INTERVALS_MS.get(query.get("interval", ""))
        if interval_ms is None:
            raise self._bybit_error(10001, "params error: invalid interval")
        limit = self._bybit_limit(query, BYBIT_KLINE_LIMIT)
        start, end = _int_param(query, "start"), _int_param(query, "end")
        rows: list[list[str]] = []
        with self._lock:
            series = self._candles.get((symbol, interval_ms))
        if series is not None:
            c = series.cols
            for i in self._select(series, start, end, limit, newest=start is None):
                rows.append(
                    [
                        str(int(series.ts[i])),
                        num(c["open"][i]),
                        num(c["high"][i]),
                        num(c["low"][i]),
                        num(c["close"][i]),
                        num(c["volume"][i]),
                        num(round(c["volume"][i] * c["close"][i], 8)),
                    ]
                )
        rows.reverse()  # Bybit lists newest first
        return self._bybit_ok({"category": "linear", "symbol": symbol, "list": rows})

    def bybit_funding(self, query: Mapping[str, str]) -> dict[str, Any]:
        symbol = self._bybit_symbol(query)
        limit = self._bybit_limit(query, BYBIT_FUNDING_LIMIT)
        start, end = _int_param(query, "startTime"), _int_param(query, "endTime")
        if start is not None and end is None:
            raise self._bybit_error(10001, "params error: endTime is required when startTime is passed")
        items: list[dict[str, str]] = []
        with self._lock:
            series = self._funding.get(symbol)
        if series is not None:
            # Bybit: the newest `limit` records up to endTime (within startTime when given).
            for i in self._select(series, start, end, limit, newest=True):
                items.append(
                    {
                        "symbol": symbol,
                        "fundingRate": num(series.cols["funding_rate"][i]),
                        "fundingRateTimestamp": str(int(series.ts[i])),
                    }
                )
        items.reverse()
        return self._bybit_ok({"category": "linear", "list": items})

    def bybit_orderbook(self, query: Mapping[str, str]) -> dict[str, Any]:
        symbol = self._bybit_symbol(query)
        limit = self._bybit_limit(query, BYBIT_BOOK_LIMIT)
        with self._lock:
            book = self._books.get(symbol)
        if book is None:
            book = Book(bids=[], asks=[], ts_ms=now_ms())
        return self._bybit_ok(
            {
                "s": symbol,
                "b": [[num(p), num(q)] for p, q in book.bids[:limit]],
                "a": [[num(p), num(q)] for p, q in book.asks[:limit]],
                "ts": book.ts_ms,
                "u": book.update_id,
                "seq": book.update_id,
                "cts": book.ts_ms,
            }
        )

    def routes(self) -> dict[str, Callable[[Mapping[str, str]], Any]]:
        return {
            "/fapi/v1/exchangeInfo": lambda q: self.binance_exchange_info(),
            "/fapi/v1/time": lambda q: {"serverTime": now_ms()},
            "/fapi/v1/ping": lambda q: {},
            "/fapi/v1/klines": self.binance_klines,
            "/fapi/v1/fundingRate": self.binance_funding,
            "/fapi/v1/depth": self.binance_depth,
            "/api/v3/exchangeInfo": lambda q: self.binance_spot_exchange_info(),
            "/api/v3/time": lambda q: {"serverTime": now_ms()},
            "/api/v3/ping": lambda q: {},
            "/api/v3/klines": lambda q: self.binance_klines(q, spot=True),
            "/api/v3/depth": self.binance_spot_depth,
            "/v5/market/time": lambda q: self._bybit_ok(
                {"timeSecond": str(now_ms() // 1000), "timeNano": str(time.time_ns())}
            ),
            "/v5/market/instruments-info": self.bybit_instruments,
            "/v5/market/kline": self.bybit_kline,
            "/v5/market/funding/history": self.bybit_funding,
            "/v5/market/orderbook": self.bybit_orderbook,
        }

    def answer(self, path: str, query: Mapping[str, str]) -> tuple[int, Any]:
        """Status and JSON body for a request (no faults); unknown paths -> 404 and recorded."""
        route = self.routes().get(path)
        if route is None:
            with self._lock:
                self.unknown_paths.append(path)
            return 404, {"code": -5, "msg": f"stub exchange: unknown path {path}"}
        try:
            return 200, route(query)
        except ApiError as e:
            return e.status, e.body
        except ValueError as e:  # a malformed number in the query
            if path.startswith("/v5/"):
                return 200, self._bybit_error(10001, f"params error: {e}").body
            return 400, {"code": -1100, "msg": f"Illegal characters found in a parameter: {e}"}


def _binance_symbol_entry(symbol_id: str) -> dict[str, Any]:
    """A USDⓈ-M exchangeInfo symbol entry with the fields of the recorded 2021/2022 bodies."""
    base, quote = split_symbol(symbol_id)
    return {
        "symbol": symbol_id,
        "pair": symbol_id,
        "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000,
        "onboardDate": 1569398400000,
        "status": "TRADING",
        "maintMarginPercent": "2.5000",
        "requiredMarginPercent": "5.0000",
        "baseAsset": base,
        "quoteAsset": quote,
        "marginAsset": quote,
        "pricePrecision": 4,
        "quantityPrecision": 3,
        "baseAssetPrecision": 8,
        "quotePrecision": 8,
        "underlyingType": "COIN",
        "underlyingSubType": [],
        "settlePlan": 0,
        "triggerProtect": "0.0500",
        "liquidationFee": "0.012000",
        "marketTakeBound": "0.30",
        "filters": [
            {"minPrice": "0.0001", "maxPrice": "1000000", "filterType": "PRICE_FILTER", "tickSize": "0.0001"},
            {"stepSize": "0.001", "filterType": "LOT_SIZE", "maxQty": "1000000", "minQty": "0.001"},
            {"stepSize": "0.001", "filterType": "MARKET_LOT_SIZE", "maxQty": "100000", "minQty": "0.001"},
            {"limit": 200, "filterType": "MAX_NUM_ORDERS"},
            {"limit": 10, "filterType": "MAX_NUM_ALGO_ORDERS"},
            {"notional": "5", "filterType": "MIN_NOTIONAL"},
            {
                "multiplierDown": "0.8500",
                "multiplierUp": "1.1500",
                "multiplierDecimal": "4",
                "filterType": "PERCENT_PRICE",
            },
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
    }


def _binance_spot_symbol_entry(symbol_id: str) -> dict[str, Any]:
    """A spot exchangeInfo symbol entry with the fields of the recorded 2021 body."""
    base, quote = split_symbol(symbol_id)
    return {
        "symbol": symbol_id,
        "status": "TRADING",
        "baseAsset": base,
        "baseAssetPrecision": 8,
        "quoteAsset": quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": True,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": "0.01000000",
                "maxPrice": "1000000.00000000",
                "tickSize": "0.01000000",
            },
            {"filterType": "PERCENT_PRICE", "multiplierUp": "5", "multiplierDown": "0.2", "avgPriceMins": 5},
            {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000.00000000", "stepSize": "0.00001000"},
            {"filterType": "MIN_NOTIONAL", "minNotional": "10.00000000", "applyToMarket": True, "avgPriceMins": 5},
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
        ],
        "permissions": ["SPOT", "MARGIN"],
    }


def _bybit_instrument(symbol_id: str) -> dict[str, Any]:
    """A v5 linear-perpetual instruments-info entry (field names as Bybit's documented response)."""
    base, quote = split_symbol(symbol_id)
    return {
        "symbol": symbol_id,
        "contractType": "LinearPerpetual",
        "status": "Trading",
        "baseCoin": base,
        "quoteCoin": quote,
        "launchTime": "1585526400000",
        "deliveryTime": "0",
        "deliveryFeeRate": "",
        "priceScale": "4",
        "leverageFilter": {"minLeverage": "1", "maxLeverage": "50.00", "leverageStep": "0.01"},
        "priceFilter": {"minPrice": "0.0001", "maxPrice": "1999999.8", "tickSize": "0.0001"},
        "lotSizeFilter": {
            "maxOrderQty": "1000000.000",
            "minOrderQty": "0.001",
            "qtyStep": "0.001",
            "postOnlyMaxOrderQty": "1000000.000",
            "maxMktOrderQty": "100000.000",
            "minNotionalValue": "5",
        },
        "unifiedMarginTrade": True,
        "fundingInterval": 480,
        "settleCoin": quote,
        "copyTrading": "both",
        "upperFundingRate": "0.00375",
        "lowerFundingRate": "-0.00375",
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stub: StubExchange


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read stub.requests instead
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        stub = self.server.stub
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        payload = body if method == "POST" else parts.query  # what a signature covers
        query = {k: v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
        query.update(parse_qsl(body, keep_blank_values=True))
        stub._record(parts.path, query)
        fault = stub.faults.take(parts.path)
        try:
            if fault is not None:
                self._fault(fault, parts.path, query)
                return
            signed = stub.answer_signed(method, parts.path, query, dict(self.headers.items()), payload)
            if signed is not None:
                self._send(*signed)
            elif method == "GET":
                self._send(*stub.answer(parts.path, query))
            else:
                with stub._lock:
                    stub.unknown_paths.append(f"{method} {parts.path}")
                self._send(404, {"code": -5, "msg": f"stub exchange: unknown path {method} {parts.path}"})
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test): nothing to answer

    def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        self._send_raw(status, payload, "application/json", headers)

    def _send_raw(
        self,
        status: int,
        payload: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload) if content_length is None else content_length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _fault(self, fault: Fault, path: str, query: Mapping[str, str]) -> None:
        bybit = path.startswith("/v5/")
        kind = fault.kind
        retry_headers = {}
        if fault.retry_after_s is not None:
            retry_headers["Retry-After"] = num(fault.retry_after_s)
        if kind == "429":
            body: Any = (
                {"retCode": 10006, "retMsg": "Too many visits!", "result": {}, "retExtInfo": {}, "time": now_ms()}
                if bybit
                else {
                    "code": -1003,
                    "msg": "Too many requests; current limit of IP(127.0.0.1) is 2400 requests per minute.",
                }
            )
            self._send(429, body, retry_headers)
        elif kind == "418":
            until = now_ms() + int((fault.retry_after_s or 60) * 1000)
            self._send(
                418,
                {"code": -1003, "msg": f"Way too much request weight used; IP banned until {until}."},
                retry_headers,
            )
        elif kind in ("403", "500", "502", "503", "504"):
            status = int(kind)
            title = HTML_ERRORS[status]
            html = (
                f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
                f"<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n"
            )
            self._send_raw(status, html.encode(), "text/html", retry_headers)
        elif kind == "slow":
            time.sleep(fault.delay_s)
            self._send(*self.server.stub.answer(path, query))
        elif kind in ("truncate", "bad_json"):
            status, body = self.server.stub.answer(path, query)
            payload = json.dumps(body, separators=(",", ":")).encode()
            half = payload[: max(1, len(payload) // 2)]
            if kind == "truncate":
                # Promise the whole body, send half, hang up: the client sees an incomplete read.
                self._send_raw(status, half, "application/json", content_length=len(payload))
                self.close_connection = True
            else:
                self._send_raw(status, half, "application/json")
        elif kind == "reject":
            if bybit:
                self._send(200, self.server.stub._bybit_error(10001, "params error: Symbol Is Invalid").body)
            else:
                self._send(400, {"code": -1121, "msg": "Invalid symbol."})
        elif kind == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


def _funding_from_csv(path: Path, symbol_id: str) -> pd.DataFrame:
    raw = pd.read_csv(path)
    rows = raw[raw["symbol"] == symbol_id]
    return pd.DataFrame(
        {
            "ts_ms": rows["funding_time_ms"].to_numpy(dtype="int64"),
            "funding_rate": rows["funding_rate"].to_numpy(dtype="float64"),
            "mark_price": np.nan,
        }
    )


def _iter_depth_snapshots(path: Path) -> Iterator[tuple[str, Book]]:
    """(symbol id, book) from a recorded ``{"url","received_at","response"}`` depth JSONL file."""
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        symbol = parse_qs(urlsplit(rec["url"]).query)["symbol"][0]
        resp = rec["response"]
        yield (
            symbol,
            Book(
                bids=[(float(p), float(q)) for p, q in resp["bids"]],
                asks=[(float(p), float(q)) for p, q in resp["asks"]],
                ts_ms=int(resp["T"]),
                update_id=int(resp["lastUpdateId"]),
            ),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a fake Binance USDⓈ-M / Bybit v5 REST API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data", type=Path, help="candle file (Parquet/Feather/CSV, ts_ms or date column)")
    parser.add_argument("--symbol", default="BTCUSDT", help="exchange symbol id the candles are served as")
    parser.add_argument("--timeframe-minutes", type=int, default=1)
    parser.add_argument("--funding", type=Path, help="funding CSV like shared/data/funding_rates_binance_8h.csv")
    parser.add_argument("--funding-symbol", default="XRPUSDT")
    parser.add_argument("--depth", type=Path, help="recorded depth JSONL like binance_fapi_v1_depth_snapshots")
    parser.add_argument("--exchange-info", type=Path, default=FAPI_EXCHANGE_INFO)
    args = parser.parse_args(argv)

    info = json.loads(args.exchange_info.read_text()) if args.exchange_info.is_file() else None
    stub = StubExchange(exchange_info=info, port=args.port)
    if args.data:
        stub.set_candles(args.symbol, load_candles(args.data), args.timeframe_minutes * _MINUTE_MS)
    if args.funding:
        stub.set_funding(args.funding_symbol, _funding_from_csv(args.funding, args.funding_symbol))
    if args.depth:
        for symbol, book in _iter_depth_snapshots(args.depth):
            stub.set_book(symbol, book)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # `kill PID` stops it like Ctrl-C, printing the unknown paths

    signal.signal(signal.SIGTERM, interrupt)
    with stub:
        print(f"stub exchange on {stub.url} serving {', '.join(stub.symbols())} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        unknown = sorted(set(stub.unknown_paths))
        if unknown:
            print(f"unknown paths asked: {unknown}")


if __name__ == "__main__":
    main()
