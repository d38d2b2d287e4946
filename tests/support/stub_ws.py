"""A local Binance USDⓈ-M kline websocket on 127.0.0.1, streaming recorded candles as the exchange does.

ccxt.pro's own code (URL building, SUBSCRIBE request, message routing, candle cache) runs unchanged
against it: point a client's ``urls['api']['ws']`` entries at :attr:`StubKlineServer.url` keeping their
paths (``cryptoml.edge.stream.KlineStream(..., ws_url=stub.url)`` does it). What it speaks, as Binance:

- connections on ``/ws``, ``/market/ws``, ``/public/ws`` (ccxt 4.5 routes USDⓈ-M klines to
  ``/market/ws``) with an optional ``/<n>`` suffix (ccxt numbers its connections); other paths get 404;
- ``{"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 1}`` -> ``{"result": null, "id": 1}``;
  ``UNSUBSCRIBE`` likewise, ``LIST_SUBSCRIPTIONS`` -> ``{"result": [...], "id": ...}``; a malformed request
  gets Binance's ``{"error": {"code": 2, "msg": "Invalid request: ..."}, "id": ...}``;
- raw-stream kline events ``{"e": "kline", "E", "s", "k": {"t", "T", "s", "i", "f", "L", "o", "c", "h", "l",
  "v", "n", "x", "q", "V", "Q", "B"}}``, numbers as strings, exactly the 17 ``k`` fields of a recorded
  fapi message (``../shared/data/binance_fapi_ws_depth-aggtrade-kline-bookticker_20210722.jsonl``).

The market clock is driven by the test, one bar at a time, so nothing depends on wall-clock timing:
:meth:`emit` streams the next bars, each as ``updates_per_bar`` in-progress updates (``"x": false``: the
bar so far -- same open, a close walking from the open to the final close, high / low of those, a share of
the volume) and then the closing update (``"x": true``) carrying the recorded OHLCV exactly;
:meth:`emit_partial` sends only some in-progress updates of the current bar; :meth:`skip` lets bars close
with nobody told (what a client misses while away); :meth:`drop` aborts every connection without a close
frame (a network failure); :attr:`refuse` makes the handshake fail with 503 (an outage). Fields the
candles do not carry (trade ids and counts, quote and taker volumes) are derived from them.
:meth:`play` runs the clock by itself instead (one bar every ``bar_seconds``), e.g. for manual tries::

    python -m tests.support.stub_ws --port 8766 --bar-seconds 0.5 \\
        --data ../shared/data/binance_spot_btcusdt_1m_20230417-20230517.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
BTC_1M = DATA_DIR / "binance_spot_btcusdt_1m_20230417-20230517.parquet"
MINUTE_MS = 60_000
TRADES_PER_UPDATE = 7  # derived trade counts: each update adds this many trades
_PATH = re.compile(r"^(/market|/public)?/ws(/\d+)?$")
_STREAM = re.compile(r"^[a-z0-9_]+@kline_1m$")


def num(x: float) -> str:
    """A float as the exchange writes it: positional, shortest round-trip digits (29496.94, 0.00012)."""
    return np.format_float_positional(float(x), trim="-")


def load_btc_month(n: int | None = None) -> np.ndarray:
    """The real BTC/USDT 1-minute month as ``(bars, 6)`` float64 rows ``ts_ms, open, high, low, close, volume``
    (first ``n`` bars when given). Raises FileNotFoundError when ../shared/data is absent."""
    import pyarrow.parquet as pq

    table = pq.read_table(BTC_1M)
    dates = table.column("date").to_numpy()
    ts_ms = dates.astype("datetime64[ms]").astype(np.int64)
    cols = [table.column(c).to_numpy().astype(np.float64) for c in ("open", "high", "low", "close", "volume")]
    rows = np.column_stack([ts_ms.astype(np.float64), *cols])
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    return rows if n is None else rows[:n]


def kline_updates(
    bar: Sequence[float],
    symbol_id: str,
    n_updates: int,
    first_trade_id: int,
    price_decimals: int = 2,
    volume_decimals: int = 5,
) -> list[dict[str, Any]]:
    """The ``n_updates`` in-progress kline events of one bar and its closing event, in order.

    In-progress prices and volumes are rounded to the symbol's tick / step (BTCUSDT: 0.01 and 0.00001, as
    recorded); the closing event carries the bar's values untouched."""
    ts, o, h, low, c, v = (float(x) for x in bar)
    t = int(ts)
    events = []
    for j in range(n_updates + 1):
        closing = j == n_updates
        share = 1.0 if closing else (j + 1) / (n_updates + 1)
        close = c if closing else round(o + (c - o) * share, price_decimals)
        high = h if closing else max(o, close)
        low_j = low if closing else min(o, close)
        volume = v if closing else round(v * share, volume_decimals)
        trades = TRADES_PER_UPDATE * (j + 1)
        quote = volume * (o + high + low_j + close) / 4.0
        k = {
            "t": t,
            "T": t + MINUTE_MS - 1,
            "s": symbol_id,
            "i": "1m",
            "f": first_trade_id,
            "L": first_trade_id + trades - 1,
            "o": num(o),
            "c": num(close),
            "h": num(high),
            "l": num(low_j),
            "v": num(volume),
            "n": trades,
            "x": closing,
            "q": num(quote),
            "V": num(volume / 2),
            "Q": num(quote / 2),
            "B": "0",
        }
        event_ms = t + MINUTE_MS if closing else t + int(MINUTE_MS * share)
        events.append({"e": "kline", "E": event_ms, "s": symbol_id, "k": k})
    return events


class StubKlineServer:
    """Binance USDⓈ-M kline websocket for one symbol, fed from ``bars`` (rows ts_ms, o, h, l, c, v).

    Thread-safe controls (called from the test thread, run on the server's own event loop thread):
    :meth:`emit`, :meth:`emit_partial`, :meth:`skip`, :meth:`drop`, :meth:`wait_subscribers`, :meth:`play`.
    """

    def __init__(
        self, bars: Any, *, symbol_id: str = "BTCUSDT", updates_per_bar: int = 3, host: str = "127.0.0.1"
    ) -> None:
        self.bars = np.asarray(bars, dtype=np.float64)
        if self.bars.ndim != 2 or self.bars.shape[1] != 6:
            raise ValueError(f"bars must be rows of ts_ms, open, high, low, close, volume; got {self.bars.shape}")
        self.symbol_id = symbol_id
        self.stream_name = f"{symbol_id.lower()}@kline_1m"
        self.updates_per_bar = updates_per_bar
        self.host = host
        self.cursor = 0  # index of the bar now forming
        self.sent_updates = 0  # in-progress updates of that bar already sent
        self.refuse = False  # True: handshakes fail with 503 (an outage)
        self.connections_total = 0
        self.refused_total = 0  # handshakes refused while ``refuse`` was set
        self.requests: list[Any] = []  # every JSON message received, in order
        self._trade_id = 1_000_000
        self._subscribers: dict[ServerConnection, set[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._player: threading.Thread | None = None
        self._stop_play = threading.Event()
        self._changed = threading.Condition()

    # ----- lifecycle -----
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the stub websocket server is not started")
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://{self.host}:{port}"

    def start(self, port: int = 0) -> StubKlineServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port, ready), name="stub-ws", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError("the stub websocket server did not start")
        return self

    def stop(self) -> None:
        self._stop_play.set()
        if self._player is not None:
            self._player.join(timeout=5)
        if self._loop is not None and self._server is not None:
            self._call(self._shutdown())
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = self._server = self._loop = None

    def __enter__(self) -> StubKlineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, port: int, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            self._server = await serve(
                self._handle, self.host, port, process_request=self._check_request, compression=None
            )
            ready.set()
            await self._server.wait_closed()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        if self._loop is None:
            raise RuntimeError("the stub websocket server is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ----- the protocol -----
    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.refuse:
            self.refused_total += 1
            self._notify()
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "stub outage\n")
        if not _PATH.match(request.path.split("?", 1)[0]):
            return connection.respond(HTTPStatus.NOT_FOUND, f"no websocket endpoint at {request.path}\n")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        self.connections_total += 1
        self._subscribers[connection] = set()
        try:
            async for raw in connection:
                await connection.send(json.dumps(self._answer(connection, raw)))
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            self._subscribers.pop(connection, None)
            self._notify()

    def _answer(self, connection: ServerConnection, raw: str | bytes) -> dict[str, Any]:
        try:
            message = json.loads(raw)
        except ValueError as e:
            return {"error": {"code": 3, "msg": f"Invalid JSON: {e}"}, "id": None}
        self.requests.append(message)
        if not isinstance(message, dict):
            return {"error": {"code": 2, "msg": "Invalid request: request must be an object"}, "id": None}
        request_id = message.get("id")
        method = message.get("method")
        params = message.get("params", [])
        if method == "LIST_SUBSCRIPTIONS":
            return {"result": sorted(self._subscribers.get(connection, ())), "id": request_id}
        if method not in ("SUBSCRIBE", "UNSUBSCRIBE"):
            return {"error": {"code": 2, "msg": f"Invalid request: unknown method {method!r}"}, "id": request_id}
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            return {
                "error": {"code": 2, "msg": "Invalid request: params must be a list of stream names"},
                "id": request_id,
            }
        streams = self._subscribers.setdefault(connection, set())
        for name in params:
            if method == "UNSUBSCRIBE":
                streams.discard(name)
            elif _STREAM.match(name):  # Binance accepts any well-formed stream name; ours streams one symbol
                streams.add(name)
        return {"result": None, "id": request_id}

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    async def _broadcast(self, events: list[dict[str, Any]]) -> None:
        for connection, streams in list(self._subscribers.items()):
            if self.stream_name not in streams:
                continue
            try:
                for event in events:
                    await connection.send(json.dumps(event, separators=(",", ":")))
            except ConnectionClosed:
                continue

    # ----- the market clock -----
    def _bar_events(self, index: int) -> list[dict[str, Any]]:
        return kline_updates(self.bars[index], self.symbol_id, self.updates_per_bar, self._trade_id)

    def emit(self, n: int = 1) -> np.ndarray:
        """Stream the next ``n`` bars to the subscribers (the rest of the forming bar's in-progress updates,
        then its closing update, for each); returns the rows that closed."""
        return np.asarray(self._call(self._emit(n)))

    async def _emit(self, n: int) -> list[list[float]]:
        closed = []
        for _ in range(n):
            if self.cursor >= len(self.bars):
                raise IndexError(f"no bars left to stream ({len(self.bars)} served)")
            events = self._bar_events(self.cursor)
            await self._broadcast(events[self.sent_updates :])
            closed.append(self.bars[self.cursor].tolist())
            self._next_bar()
        return closed

    def emit_partial(self, k: int = 1) -> None:
        """Stream ``k`` more in-progress updates of the forming bar (never its closing one)."""
        self._call(self._emit_partial(k))

    async def _emit_partial(self, k: int) -> None:
        if self.sent_updates + k > self.updates_per_bar:
            raise ValueError(f"a bar has {self.updates_per_bar} in-progress updates; {self.sent_updates} sent")
        events = self._bar_events(self.cursor)
        await self._broadcast(events[self.sent_updates : self.sent_updates + k])
        self.sent_updates += k

    def skip(self, n: int = 1) -> np.ndarray:
        """Let ``n`` bars close without telling anyone (what a client misses while disconnected)."""
        return np.asarray(self._call(self._skip(n)))

    async def _skip(self, n: int) -> np.ndarray:
        skipped = self.bars[self.cursor : self.cursor + n].copy()
        for _ in range(n):
            self._next_bar()
        return skipped

    def _next_bar(self) -> None:
        self._trade_id += TRADES_PER_UPDATE * (self.updates_per_bar + 1)
        self.cursor += 1
        self.sent_updates = 0

    # ----- faults and waiting -----
    def drop(self) -> int:
        """Abort every connection without a close frame (a network failure); returns how many."""
        return int(self._call(self._drop()))

    async def _drop(self) -> int:
        connections = list(self._subscribers)
        for connection in connections:
            connection.transport.abort()
        for connection in connections:  # their handlers have ended: `subscribers` no longer counts them
            await asyncio.wait_for(connection.wait_closed(), 5)
            self._subscribers.pop(connection, None)
        self._notify()
        return len(connections)

    @property
    def subscribers(self) -> int:
        """Connections subscribed to this symbol's 1-minute klines."""
        return sum(self.stream_name in streams for streams in list(self._subscribers.values()))

    def wait_subscribers(self, n: int, timeout: float = 20.0) -> None:
        """Block until exactly ``n`` connections are subscribed; raises TimeoutError."""
        self.wait_for(lambda: self.subscribers == n, timeout, f"{n} subscribers")

    def wait_for(self, condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        """Block until ``condition()`` holds, re-checking whenever the server's state changes (and every 0.1 s)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} not reached after {timeout} s")
                self._changed.wait(min(left, 0.1))

    def play(self, bar_seconds: float) -> None:
        """Run the clock by itself: one bar (its updates spread over the interval) every ``bar_seconds``."""
        if self._player is not None:
            return
        self._stop_play.clear()

        def run() -> None:
            step = bar_seconds / (self.updates_per_bar + 1)
            while not self._stop_play.is_set() and self.cursor < len(self.bars):
                for _ in range(self.updates_per_bar - self.sent_updates):
                    if self._stop_play.wait(step):
                        return
                    self.emit_partial(1)
                if self._stop_play.wait(step):
                    return
                self.emit(1)

        self._player = threading.Thread(target=run, name="stub-ws-clock", daemon=True)
        self._player.start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--data", type=Path, default=BTC_1M, help="a candle Parquet file (default: the BTC month)")
    parser.add_argument("--symbol", default="BTCUSDT")
    parser.add_argument("--bar-seconds", type=float, default=1.0, help="wall-clock seconds per streamed bar")
    args = parser.parse_args(argv)
    bars = load_btc_month() if args.data == BTC_1M else _load_file(args.data)
    with StubKlineServer(bars, symbol_id=args.symbol).start(args.port) as stub:
        print(f"streaming {len(bars)} bars of {args.symbol} on {stub.url} (Ctrl-C stops)", flush=True)
        stub.play(args.bar_seconds)
        try:
            while stub.cursor < len(bars):
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def _load_file(path: Path) -> np.ndarray:
    from tests.support.stub_exchange import load_candles

    frame = load_candles(path)
    return frame[["ts_ms", "open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)


if __name__ == "__main__":
    main()
