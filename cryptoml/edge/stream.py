"""Closed 1-minute bars pushed by the exchange's websocket (ccxt.pro ``watch_ohlcv``), for the edge runner.

:class:`KlineStream` follows one symbol's 1-minute candles with ccxt.pro in a background thread that runs
its own asyncio loop, reconnects with exponential backoff, and keeps the **closed** bars it saw as one
contiguous run (at most ``max_bars``). The runner asks :meth:`KlineStream.closed_bars` for the bars after
its last one; ``None`` means "poll REST instead". REST stays the source of truth: at start-up, after a
restart, an outage or a gap, the runner's REST path fills in, and the stream only answers for bars that
it saw close and that follow on from the caller's last bar.

When a bar counts as closed:

- Binance family (``binance``, ``binanceusdm``, ``binancecoinm``, ``binanceus``): by the kline event's
  own flag ``k.x``. The closing event carries the bar's final OHLCV; in-progress updates (``x: false``)
  never surface.
- other exchanges with ccxt.pro ``watchOHLCV``: ccxt's candles drop the exchanges' closed flags, so a bar
  counts as closed once the exchange starts the next one on the same connection, with the last values
  seen for it.

``closed_bars`` returns None while not connected, after a (re)connect until the new connection has
delivered a closed bar that links up with the run kept (a first bar that does not -- bars were missed --
starts a new run), when nothing arrived for ``stale_after_s``, when the caller's last bar is older than
the run (bars in between may be missing), for an exchange without ``watchOHLCV`` (said once in the log),
and after a fatal error (unknown symbol; logged, :attr:`KlineStream.error`) or :meth:`KlineStream.close`.

Import cost: importing this module costs nothing beyond the standard library. A stream loads the one
ccxt.pro exchange it follows through :func:`cryptoml.market.lean_ccxt.pro_exchange_class` (~14 modules,
+11 MiB RSS, instead of the ~190 of ccxt.pro's package ``__init__``, +31 MiB, against an edge budget of
150 MiB). Imports: the standard library, ccxt (at first use) and :mod:`cryptoml.market`'s ``lean_ccxt``
and ``exchange``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from cryptoml.errors import ConfigError, DataValidationError

__all__ = ["BAR_MS", "KlineStream", "watch_ohlcv_class"]

log = logging.getLogger(__name__)

BAR_MS = 60_000
TIMEFRAME = "1m"
CLOSE_RULES = ("auto", "flag", "next_bar")
_BINANCE_MODULE = "ccxt.pro.binance"  # its subclasses read k.x; see the module doc
_FATAL_ERRORS = ("BadSymbol", "AuthenticationError", "NotSupported", "ArgumentsRequired")  # ccxt names


def watch_ohlcv_class(exchange_id: str) -> type | None:
    """ccxt.pro's class for ``exchange_id`` (loading only that exchange's modules, see
    :func:`cryptoml.market.lean_ccxt.pro_exchange_class`); None when ccxt.pro has no such exchange or it
    has no ``watchOHLCV``."""
    from cryptoml.market.lean_ccxt import pro_exchange_class

    cls = pro_exchange_class(exchange_id)
    if cls is None or not cls().has.get("watchOHLCV"):
        return None
    return cls


def _rebase(value: Any, base_url: str, *, skip: str | None = None) -> Any:
    """Every URL string in ``value`` (a string or nested dicts) re-pointed at ``base_url``, paths kept."""
    from cryptoml.market.exchange import rebase_url

    if isinstance(value, str):
        return rebase_url(value, base_url) if "://" in value else value
    if isinstance(value, dict):
        return {k: v if k == skip else _rebase(v, base_url, skip=skip) for k, v in value.items()}
    return value


class KlineStream:
    """Closed 1-minute bars of ``symbol`` on ``exchange_id`` from its websocket (see the module doc).

    ``ws_url``: re-point every ``urls['api']['ws']`` entry at this base (``ws://127.0.0.1:PORT``), keeping
    paths; ``api_url``: the same for the REST API (markets are loaded from it once, unless ``markets``,
    ccxt's ``exchange.markets`` of another client, are given). ``max_bars``: closed bars kept;
    ``stale_after_s``: no candle update for this long counts as disconnected; reconnect delays grow from
    ``retry_base_s`` to ``retry_max_s`` (x2 per failed attempt, 50-100 % jitter). ``close_rule``: ``flag``
    (the kline's closed flag; Binance family only), ``next_bar`` (closed once the next bar starts) or
    ``auto`` (``flag`` where it can be read, else ``next_bar``). Starts at once; call
    :meth:`close` (or use it as a context manager) to stop. Raises ConfigError for an exchange id ccxt
    does not know or bad numbers; an exchange without ccxt.pro ``watchOHLCV`` is accepted and answers None.
    """

    def __init__(
        self,
        exchange_id: str,
        symbol: str,
        *,
        ws_url: str | None = None,
        api_url: str | None = None,
        markets: Mapping[str, Any] | Sequence[Any] | None = None,
        max_bars: int = 1440,
        stale_after_s: float = 90.0,
        retry_base_s: float = 0.5,
        retry_max_s: float = 30.0,
        timeout_ms: int = 10_000,
        close_rule: str = "auto",
    ) -> None:
        from cryptoml.market.lean_ccxt import exchange_ids

        if exchange_id not in exchange_ids():
            raise ConfigError(f"kline stream: unknown ccxt exchange id {exchange_id!r}")
        if close_rule not in CLOSE_RULES:
            raise ConfigError(f"kline stream: close_rule must be one of {CLOSE_RULES}, got {close_rule!r}")
        if not isinstance(symbol, str) or not symbol:
            raise ConfigError(f"kline stream: symbol must be a ccxt symbol like 'BTC/USDT:USDT', got {symbol!r}")
        for name, value in (
            ("max_bars", max_bars),
            ("stale_after_s", stale_after_s),
            ("retry_base_s", retry_base_s),
            ("retry_max_s", retry_max_s),
            ("timeout_ms", timeout_ms),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"kline stream: {name} must be a number > 0, got {value!r}")
        self.exchange_id = exchange_id
        self.symbol = symbol
        self.ws_url = ws_url
        self.api_url = api_url
        self.max_bars = int(max_bars)
        self.stale_after_s = float(stale_after_s)
        self.retry_base_s = float(retry_base_s)
        self.retry_max_s = float(retry_max_s)
        self.timeout_ms = int(timeout_ms)
        self.close_rule = close_rule
        self.error: str | None = None  # set by a fatal error: the stream has stopped for good
        self.connects = 0  # connections that delivered data
        self.gaps = 0  # closed bars that did not follow on from the run kept (a new run started)
        self.updates = 0  # candle messages received
        self._markets = markets
        self._lock = threading.Lock()
        self._bars: deque[list[float]] = deque(maxlen=self.max_bars)
        self._connected = False
        self._linked = False  # this connection delivered a closed bar that follows on from the run
        self._last_update_s = 0.0
        self._forming: list[float] | None = None  # the newest bar of this connection (no-flag exchanges)
        self._rng = random.Random()
        self._closed = False
        self._thread: threading.Thread | None = None

        cls = watch_ohlcv_class(exchange_id)
        if cls is None:
            self.supported = False
            log.warning(
                "kline stream: ccxt.pro has no watchOHLCV for %s; %s bars come from REST polling",
                exchange_id,
                symbol,
            )
            return
        self.supported = True
        binance_family = any(c.__module__ == _BINANCE_MODULE for c in cls.__mro__)
        if close_rule == "flag" and not binance_family:
            raise ConfigError(f"kline stream: {exchange_id} sends no closed flag the stream can read; use 'next_bar'")
        self.close_rule = close_rule if close_rule != "auto" else ("flag" if binance_family else "next_bar")
        self._flagged = self.close_rule == "flag"
        self._cls = _with_kline_hook(cls)
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._follow())
        self._thread = threading.Thread(target=self._run, name=f"kline-stream-{exchange_id}", daemon=True)
        self._thread.start()

    # --- what the runner calls ---------------------------------------------------------------------

    def closed_bars(self, since_ms: int) -> list[list[float]] | None:
        """Closed 1-minute bars ``[ts_ms, open, high, low, close, volume]`` (``ts_ms`` = bar open, epoch ms
        UTC) with ``ts_ms > since_ms``, oldest first; ``[]`` when none has closed yet. ``since_ms``: the
        open time of the caller's last bar. None: poll REST instead (see the module doc for when)."""
        if isinstance(since_ms, bool) or not isinstance(since_ms, int):
            raise DataValidationError(f"closed_bars: since_ms must be integer epoch milliseconds, got {since_ms!r}")
        with self._lock:
            if not (self._connected and self._linked and self._bars):
                return None
            if time.monotonic() - self._last_update_s > self.stale_after_s:
                return None
            first = int(self._bars[0][0])
            if since_ms < first - BAR_MS:
                return None  # bars between the caller's last and the run's first may be missing
            skip = max(0, (since_ms - first) // BAR_MS + 1)
            return [list(bar) for i, bar in enumerate(self._bars) if i >= skip]

    @property
    def connected(self) -> bool:
        """A connection is up and has delivered candle updates."""
        return self._connected

    def status(self) -> dict[str, Any]:
        """For logs: connected, linked, bars kept (first / last ``ts_ms``), connects, gaps, updates, error."""
        with self._lock:
            return {
                "exchange": self.exchange_id,
                "symbol": self.symbol,
                "supported": self.supported,
                "connected": self._connected,
                "linked": self._linked,
                "bars": len(self._bars),
                "first_ts_ms": int(self._bars[0][0]) if self._bars else None,
                "last_ts_ms": int(self._bars[-1][0]) if self._bars else None,
                "connects": self.connects,
                "gaps": self.gaps,
                "updates": self.updates,
                "error": self.error,
            }

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop following and close the connection; closed_bars answers None from now on."""
        with self._lock:
            self._closed = True
            self._connected = False
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> KlineStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the background thread ---------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a fault of this code: say so, stop, and leave the bars to REST
            log.exception("kline stream %s %s stopped", self.exchange_id, self.symbol)
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._connected = False
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _new_exchange(self) -> Any:
        exchange = self._cls({"enableRateLimit": True, "timeout": self.timeout_ms})
        exchange.cryptoml_stream = self
        exchange.cryptoml_started = False  # one exchange object per connection attempt
        exchange.cryptoml_market_id = None
        if self.api_url is not None:  # REST first, the websocket entries are re-pointed next
            for key in ("api", "test", "demo"):
                if key in exchange.urls:
                    exchange.urls[key] = _rebase(exchange.urls[key], self.api_url, skip="ws")
        if self.ws_url is not None:
            exchange.urls["api"]["ws"] = _rebase(exchange.urls["api"]["ws"], self.ws_url)
        return exchange

    async def _follow(self) -> None:
        attempt = 0
        while True:
            exchange = self._new_exchange()
            try:
                if self._markets is not None:
                    exchange.set_markets(self._markets)
                else:
                    await exchange.load_markets()
                    self._markets = exchange.markets  # reconnects reuse them: no REST call per reconnect
                market_id = exchange.market(self.symbol)["id"]
                exchange.cryptoml_market_id = market_id
                while True:
                    candles = await exchange.watch_ohlcv(self.symbol, TIMEFRAME)
                    attempt = 0  # data flows: the next failure starts the backoff afresh
                    self._on_candles(candles)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._on_disconnected(e, exchange.cryptoml_started)
                if type(e).__name__ in _FATAL_ERRORS or isinstance(e, ConfigError):
                    self.error = f"{type(e).__name__}: {e}"
                    log.error(
                        "kline stream %s %s stopped: %s; bars come from REST polling", self.exchange_id, self.symbol, e
                    )
                    return
            finally:
                try:
                    await exchange.close()
                except Exception as e:  # closing a broken connection may fail too; nothing left to do
                    log.debug("closing the %s client failed: %s", self.exchange_id, e)
            delay = min(self.retry_max_s, self.retry_base_s * 2**attempt) * (0.5 + self._rng.random() / 2)
            attempt += 1
            log.info("kline stream %s %s: reconnecting in %.2f s", self.exchange_id, self.symbol, delay)
            await asyncio.sleep(delay)

    # --- bookkeeping (loop thread) -----------------------------------------------------------------

    def _on_connected(self) -> None:
        with self._lock:
            self._connected = True
            self._linked = False
            self._forming = None
            self._last_update_s = time.monotonic()
            self.connects += 1
        log.info("kline stream %s %s connected (connection %d)", self.exchange_id, self.symbol, self.connects)

    def _on_disconnected(self, error: BaseException, delivered: bool) -> None:
        with self._lock:
            self._connected = False
            self._linked = False
        what = "connection lost" if delivered else "connecting failed"
        log.warning(
            "kline stream %s %s: %s (%s: %s); REST polling meanwhile",
            self.exchange_id, self.symbol, what, type(error).__name__, error,
        )  # fmt: skip

    def _on_message(self, exchange: Any, message: Any) -> None:
        """Every candle message, as ccxt handles it (before watch_ohlcv returns, which may be several
        messages later): the connection's first one marks it connected; the closing kline events of the
        Binance family are the closed bars."""
        if self._closed:
            return
        if not exchange.cryptoml_started:
            exchange.cryptoml_started = True
            self._on_connected()
        with self._lock:
            self.updates += 1
            self._last_update_s = time.monotonic()
        if self._flagged and isinstance(message, dict):
            k = message.get("k")
            if isinstance(k, dict) and k.get("s") == exchange.cryptoml_market_id:
                self._on_kline_event(k)

    def _on_candles(self, candles: Sequence[Sequence[Any]]) -> None:
        """watch_ohlcv's updated candles (latest values): the ``next_bar`` rule's closed bars."""
        if self._flagged:
            return
        for candle in candles:
            bar = [int(candle[0]), *(float(x) for x in candle[1:6])]
            if self._forming is not None and bar[0] > self._forming[0]:
                self._add_closed(self._forming)  # the exchange started the next bar
            if self._forming is None or bar[0] >= self._forming[0]:
                self._forming = bar

    def _on_kline_event(self, k: dict[str, Any]) -> None:
        """The ``k`` of a raw Binance kline event of our symbol; a closing one (``x``) is a closed bar."""
        if k.get("x") is not True or k.get("i") != TIMEFRAME:
            return
        try:
            bar = [int(k["t"]), float(k["o"]), float(k["h"]), float(k["l"]), float(k["c"]), float(k["v"])]
        except (KeyError, TypeError, ValueError) as e:
            log.warning("kline stream %s: malformed closing kline %s (%s)", self.exchange_id, k, e)
            return
        self._add_closed(bar)

    def _add_closed(self, bar: list[float]) -> None:
        with self._lock:
            bars = self._bars
            if bars and bar[0] <= bars[-1][0]:
                if bar[0] == bars[-1][0]:  # the last bar again (a resend): it still links the run
                    bars[-1] = bar
                    self._linked = True
                return
            if bars and bar[0] != bars[-1][0] + BAR_MS:
                missed = int(bar[0] - bars[-1][0]) // BAR_MS - 1
                self.gaps += 1
                log.warning(
                    "kline stream %s %s: bar %d follows %d (%d bars missed); a new run starts, earlier callers "
                    "catch up by REST",
                    self.exchange_id, self.symbol, int(bar[0]), int(bars[-1][0]), missed,
                )  # fmt: skip
                bars.clear()
            bars.append(bar)
            self._linked = True


def _with_kline_hook(cls: type) -> type:
    """``cls`` whose handle_ohlcv also hands each raw candle message -- with the closed flag that
    watch_ohlcv's candles drop -- to the instance's ``cryptoml_stream``."""
    base_handler = cls.handle_ohlcv  # type: ignore[attr-defined]

    def handle_ohlcv(self: Any, client: Any, message: Any) -> None:
        base_handler(self, client, message)
        stream: KlineStream | None = getattr(self, "cryptoml_stream", None)
        if stream is not None:
            stream._on_message(self, message)

    return type(f"{cls.__name__}_kline_stream", (cls,), {"handle_ohlcv": handle_ohlcv})
