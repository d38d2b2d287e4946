"""The websocket kline stream against a local Binance USDⓈ-M websocket replaying the real BTC/USDT month.

ccxt.pro runs unchanged: its SUBSCRIBE request, message routing and candle cache meet the stub's real
Binance JSON on 127.0.0.1 (markets from the REST stub's recorded exchangeInfo). The market clock moves
only when a test says so (one bar = in-progress updates, then the closing one), and every wait below is
for a condition, with a timeout only as a failure guard.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryptoml.edge.stream import BAR_MS, KlineStream
from cryptoml.errors import ConfigError, DataValidationError
from tests.conftest import shared_file
from tests.support.stub_exchange import StubExchange
from tests.support.stub_ws import StubKlineServer, load_btc_month

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "BTC/USDT:USDT"
FAST_RETRY: dict[str, Any] = {"retry_base_s": 0.05, "retry_max_s": 0.2}


def until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Wait for ``condition()`` to be truthy (checked every 10 ms) and return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout} s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def bars() -> np.ndarray:
    shared_file("binance_spot_btcusdt_1m_20230417-20230517.parquet")
    return load_btc_month(120)


@pytest.fixture(scope="module")
def rest() -> Iterator[StubExchange]:
    info = json.loads(shared_file("binance_fapi_v1_exchangeInfo_20210722.json").read_text())
    with StubExchange(exchange_info=info) as stub:
        yield stub


@pytest.fixture(scope="module")
def markets(rest: StubExchange) -> dict[str, Any]:
    from cryptoml.market.exchange import make_exchange

    return dict(make_exchange("binanceusdm", api_url=rest.url).load_markets())


@pytest.fixture()
def ws(bars: np.ndarray) -> Iterator[StubKlineServer]:
    with StubKlineServer(bars) as stub:
        yield stub


@pytest.fixture()
def stream(ws: StubKlineServer, markets: dict[str, Any]) -> Iterator[KlineStream]:
    with KlineStream("binanceusdm", SYMBOL, ws_url=ws.url, markets=markets, **FAST_RETRY) as s:
        ws.wait_subscribers(1)
        yield s


def n_bars(stream: KlineStream, since_ms: int, n: int) -> list[list[float]]:
    return until(lambda: (got := stream.closed_bars(since_ms)) is not None and len(got) == n and got, what=f"{n} bars")


def test_closed_bars_equal_the_recorded_candles_and_in_progress_updates_never_surface(
    ws: StubKlineServer, rest: StubExchange, bars: np.ndarray
) -> None:
    before_first = int(bars[0, 0]) - BAR_MS
    with KlineStream("binanceusdm", SYMBOL, ws_url=ws.url, api_url=rest.url, **FAST_RETRY) as stream:
        ws.wait_subscribers(1)
        # ccxt.pro's own SUBSCRIBE, answered the Binance way; markets came from the REST stub
        assert ws.requests == [{"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 1}]
        assert rest.count("/fapi/v1/exchangeInfo") >= 1
        assert stream.closed_bars(before_first) is None  # nothing closed yet

        ws.emit_partial(2)  # the first bar, still forming
        until(lambda: stream.updates == 2, what="2 updates")
        assert stream.connected and stream.closed_bars(before_first) is None

        closed = ws.emit(20)
        got = n_bars(stream, before_first, 20)
        assert got == closed.tolist() == bars[:20].tolist()
        assert all(isinstance(bar[0], int) for bar in got)

        ws.emit_partial(3)  # every in-progress update of bar 21, not its close
        until(lambda: stream.updates == 2 + 2 + 19 * 4 + 3, what="the in-progress updates")
        assert stream.closed_bars(before_first) == closed.tolist()
        assert stream.closed_bars(int(closed[-1, 0])) == []
        assert stream.closed_bars(int(closed[9, 0])) == closed[10:].tolist()
        assert stream.closed_bars(int(closed[9, 0]) + 1) == closed[10:].tolist()  # any time inside bar 9
        assert stream.closed_bars(before_first - BAR_MS) is None  # bars before the first one may be missing
        status = stream.status()
        assert status["connects"] == 1 and status["gaps"] == 0 and status["bars"] == 20 and status["linked"]
        with pytest.raises(DataValidationError, match="since_ms"):
            stream.closed_bars(1.7e12)  # type: ignore[arg-type]
    assert stream.closed_bars(before_first) is None  # closed


def test_the_next_bar_rule_gives_the_same_bars_one_update_later(
    ws: StubKlineServer, markets: dict[str, Any], bars: np.ndarray
) -> None:
    """The rule for exchanges whose closed flag ccxt drops: a bar is closed once the next one starts."""
    before_first = int(bars[0, 0]) - BAR_MS
    with KlineStream(
        "binanceusdm", SYMBOL, ws_url=ws.url, markets=markets, close_rule="next_bar", **FAST_RETRY
    ) as stream:
        assert stream.close_rule == "next_bar"
        ws.wait_subscribers(1)
        closed = ws.emit(6)
        until(lambda: stream.updates == 24, what="6 bars of updates")
        assert stream.closed_bars(before_first) == closed[:5].tolist()  # the 6th closed, but nothing said so
        ws.emit_partial(1)
        assert n_bars(stream, before_first, 6) == closed.tolist()


def test_a_dropped_connection_reconnects_and_carries_on_without_a_gap(
    ws: StubKlineServer, stream: KlineStream, bars: np.ndarray
) -> None:
    before_first = int(bars[0, 0]) - BAR_MS
    ws.emit(3)
    n_bars(stream, before_first, 3)
    ws.emit_partial(1)  # bar 4 is forming when the network fails
    assert ws.drop() == 1
    until(lambda: not stream.connected, what="the stream to notice")
    assert stream.closed_bars(before_first) is None  # not connected: REST meanwhile
    ws.wait_subscribers(1)  # it reconnected by itself
    ws.emit(3)  # the rest of bar 4 (its close carries the whole bar) and two more
    assert n_bars(stream, before_first, 6) == bars[:6].tolist()
    assert stream.connects == 2 and stream.gaps == 0
    assert ws.connections_total == 2


def test_missed_bars_during_an_outage_return_none_until_the_caller_is_past_the_gap(
    ws: StubKlineServer, stream: KlineStream, bars: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cryptoml.edge.stream")
    before_first = int(bars[0, 0]) - BAR_MS
    kept = ws.emit(3)
    n_bars(stream, before_first, 3)
    ws.refuse = True  # an outage: handshakes fail with 503 and the stream keeps retrying with backoff
    ws.drop()
    until(lambda: not stream.connected, what="the stream to notice")
    ws.wait_for(lambda: ws.refused_total >= 2, what="two refused reconnects")
    assert stream.closed_bars(int(kept[-1, 0])) is None
    missed = ws.skip(4)  # these close while nobody listens
    ws.refuse = False
    ws.wait_subscribers(1)
    assert stream.closed_bars(int(kept[-1, 0])) is None  # connected, but nothing links it to the run yet
    new = ws.emit(2)
    got = n_bars(stream, int(missed[-1, 0]), 2)
    assert got == new.tolist() == bars[7:9].tolist()
    assert stream.closed_bars(int(kept[-1, 0])) is None  # the caller's last bar is before the gap: REST
    assert stream.closed_bars(int(missed[-2, 0])) is None
    assert stream.gaps == 1 and stream.connects == 2
    assert "4 bars missed" in caplog.text and "connecting failed" in caplog.text and "reconnecting in" in caplog.text


def test_a_silent_connection_counts_as_disconnected(
    ws: StubKlineServer, markets: dict[str, Any], bars: np.ndarray
) -> None:
    before_first = int(bars[0, 0]) - BAR_MS
    with KlineStream("binanceusdm", SYMBOL, ws_url=ws.url, markets=markets, stale_after_s=0.3, **FAST_RETRY) as stream:
        ws.wait_subscribers(1)
        ws.emit(2)
        n_bars(stream, before_first, 2)
        until(lambda: stream.closed_bars(before_first) is None, what="staleness")
        ws.emit_partial(1)  # the line comes back to life
        assert n_bars(stream, before_first, 2) == bars[:2].tolist()


def test_exchanges_without_watch_ohlcv_answer_none_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cryptoml.edge.stream")
    stream = KlineStream("bitbank", "BTC/JPY")  # in ccxt, not in ccxt.pro
    assert not stream.supported and stream.closed_bars(0) is None
    assert "ccxt.pro has no watchOHLCV for bitbank" in caplog.text and "REST polling" in caplog.text
    stream.close()
    with pytest.raises(ConfigError, match="unknown ccxt exchange id 'binanceusdn'"):
        KlineStream("binanceusdn", SYMBOL)
    with pytest.raises(ConfigError, match="no closed flag"):
        KlineStream("bybit", SYMBOL, close_rule="flag")
    with pytest.raises(ConfigError, match="close_rule"):
        KlineStream("binanceusdm", SYMBOL, close_rule="x")
    with pytest.raises(ConfigError, match="stale_after_s"):
        KlineStream("binanceusdm", SYMBOL, stale_after_s=0)
    with pytest.raises(ConfigError, match="symbol"):
        KlineStream("binanceusdm", "")


def test_an_unknown_symbol_stops_the_stream_with_a_clear_error(
    ws: StubKlineServer, markets: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with KlineStream("binanceusdm", "NOPE/USDT:USDT", ws_url=ws.url, markets=markets, **FAST_RETRY) as stream:
        error = until(lambda: stream.error, what="the error")
        assert "BadSymbol" in error and "NOPE/USDT:USDT" in error
        assert stream.closed_bars(0) is None
        assert "bars come from REST polling" in caplog.text
    assert ws.connections_total == 0  # no retry loop against a symbol that does not exist


def test_starting_a_stream_imports_one_ccxt_pro_exchange_and_nothing_heavy(
    ws: StubKlineServer, rest: StubExchange
) -> None:
    """In a fresh interpreter: the module costs nothing; a running stream loads one ccxt.pro exchange
    (not all ~110), no pandas / tensorflow / mlflow / prefect; the rest of ccxt.pro still works on demand."""
    code = f"""
import json, sys, time
import cryptoml.edge.stream as stream_module
after_import = sorted(m for m in sys.modules if m.startswith("ccxt"))
stream = stream_module.KlineStream("binanceusdm", "BTC/USDT:USDT", ws_url={ws.url!r}, api_url={rest.url!r})
deadline = time.monotonic() + 60
while stream.updates == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
pro = [m for m in sys.modules if m.startswith(("ccxt.pro.", "ccxt.async_support."))]
heavy = sorted(m for m in ("pandas", "tensorflow", "keras", "mlflow", "prefect") if m in sys.modules)
lazy = {{"pro_modules": len(pro), "bybit_loaded": "ccxt.pro.bybit" in sys.modules}}
stream.close()
import ccxt.pro
full = {{"exchanges": len(ccxt.pro.exchanges), "same_class": ccxt.pro.binanceusdm.__name__ == "binanceusdm"}}
print(json.dumps({{"after_import": after_import, "updates": stream.updates, "heavy": heavy, **lazy, **full}}))
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ws.wait_subscribers(1, timeout=60)
        ws.emit_partial(1)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["after_import"] == [] and result["updates"] == 1 and result["heavy"] == []
    assert result["pro_modules"] < 30 and not result["bybit_loaded"]
    assert result["exchanges"] > 50 and result["same_class"]
