"""The lean ccxt import of the edge (:mod:`cryptoml.market.lean_ccxt`): one exchange's modules at a time.

In a fresh interpreter, as ``cryptoml live`` runs it: working Binance USDⓈ-M and spot clients (ccxt's own
parsing of the stub exchange's real recorded exchangeInfo bodies), the ccxt.pro class of the websocket feed,
only those exchanges' modules loaded, and every other part of ccxt and ccxt.pro still there on demand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import ConfigError
from cryptoml.market.lean_ccxt import exchange_class, exchange_ids, is_lean, prepare, pro_exchange_class
from tests.conftest import shared_file
from tests.support.stub_exchange import StubExchange

ROOT = Path(__file__).resolve().parents[2]
START_MS = 1_700_000_000_000 - 1_700_000_000_000 % 60_000


def _bars(n: int, price: float) -> pd.DataFrame:
    ts = START_MS + 60_000 * np.arange(n)
    close = price + np.arange(n, dtype=np.float64)
    return pd.DataFrame(
        {"ts_ms": ts, "open": close, "high": close + 1, "low": close - 1, "close": close, "volume": 2.0}
    )


@pytest.fixture(scope="module")
def stub() -> Iterator[StubExchange]:
    """Binance USDⓈ-M (the recorded 122-symbol exchangeInfo) and spot on 127.0.0.1, BTCUSDT candles on both."""
    perp_info = json.loads(shared_file("binance_fapi_v1_exchangeInfo_20210722.json").read_text())
    spot_info = json.loads(shared_file("binance_spot_api_v3_exchangeInfo_trimmed_20211022.json").read_text())
    with StubExchange(exchange_info=perp_info, spot_exchange_info=spot_info) as server:
        server.set_candles("BTCUSDT", _bars(5, 30_000.0))
        server.set_spot_candles("BTCUSDT", _bars(5, 29_990.0))
        yield server


LEAN_RUN = """
import json, sys
from cryptoml.market import lean_ccxt
registered = [lean_ccxt.prepare(), lean_ccxt.prepare()]
from cryptoml.edge.runner import retryable
from cryptoml.edge.scorer import SPOT_CLIENT_OPTIONS
from cryptoml.market.exchange import make_exchange

perp = make_exchange("binanceusdm", api_url=URL, rate_limit_ms=1)
spot = make_exchange("binance", api_url=URL, rate_limit_ms=1, options=SPOT_CLIENT_OPTIONS["binance"])
pro = lean_ccxt.pro_exchange_class("binanceusdm")
ws = pro({"enableRateLimit": True})


def loaded(package):
    return sorted(m.split(".")[-1] for m in sys.modules if m.rpartition(".")[0] == package)


import ccxt

ids = set(ccxt.exchanges)
lean = {
    "registered": registered,
    "lean": [lean_ccxt.is_lean(p) for p in ("ccxt", "ccxt.async_support", "ccxt.pro")],
    "sync": [m for m in loaded("ccxt") if m in ids],
    "async": [m for m in loaded("ccxt.async_support") if m in ids],
    "pro": [m for m in loaded("ccxt.pro") if m in ids],
    "perp_markets": len(perp.load_markets()),
    "perp_bars": perp.fetch_ohlcv("BTC/USDT:USDT", "1m", since=START, limit=5),
    "spot_bars": spot.fetch_ohlcv("BTC/USDT", "1m", since=START, limit=5),
    "spot_types": sorted({m["type"] for m in spot.load_markets().values()}),
    "ws_id": ws.id, "ws_ohlcv": bool(ws.has.get("watchOHLCV")),
    "retryable": retryable(ccxt.RequestTimeout("slow")),
    "heavy": sorted(m for m in ("pandas", "tensorflow", "mlflow", "prefect") if m in sys.modules),
}
# The whole of ccxt and ccxt.pro, afterwards in the same process: the real __init__ files run in place.
import ccxt.pro

okx = ccxt.okx()
full = {
    "okx": okx.id, "precision": ccxt.decimal_to_precision("1.23456", ccxt.TRUNCATE, 2, ccxt.DECIMAL_PLACES),
    "exchanges": len(ccxt.exchanges), "pro_exchanges": len(ccxt.pro.exchanges), "pro_okx": ccxt.pro.okx().id,
    "async_exchanges": len(ccxt.async_support.exchanges),
    "same_sync": type(perp).__bases__[1] is ccxt.binanceusdm and type(spot).__bases__[1] is ccxt.binance,
    "same_pro": ccxt.pro.binanceusdm is pro,
    "lean": [lean_ccxt.is_lean(p) for p in ("ccxt", "ccxt.async_support", "ccxt.pro")],
}
print(json.dumps({"lean": lean, "full": full}))
"""


@pytest.mark.server
def test_lean_clients_work_and_the_whole_of_ccxt_follows_on_demand(stub: StubExchange) -> None:
    code = f"URL, START = {stub.url!r}, {START_MS}\n" + LEAN_RUN
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    lean, full = result["lean"], result["full"]
    assert lean["registered"] == [True, False]
    # Only the exchanges used were imported: two sync ones, the websocket one and its async REST parent.
    assert lean["lean"] == [True, True, True]
    assert lean["sync"] == ["binance", "binanceusdm"]
    assert lean["async"] == lean["pro"] == ["binance", "binanceusdm"]
    assert lean["heavy"] == []
    # ... and they work: the recorded 122-symbol exchangeInfo parsed, candles of both venues fetched.
    assert lean["perp_markets"] == 122 and lean["spot_types"] == ["spot"]
    assert [r[0] for r in lean["perp_bars"]] == [START_MS + 60_000 * i for i in range(5)]
    assert [r[4] for r in lean["perp_bars"]] == [30_000.0 + i for i in range(5)]
    assert [r[4] for r in lean["spot_bars"]] == [29_990.0 + i for i in range(5)]
    assert lean["ws_id"] == "binanceusdm" and lean["ws_ohlcv"] and lean["retryable"]
    # The full import afterwards: same classes, every exchange, ccxt's helpers.
    assert full["okx"] == full["pro_okx"] == "okx" and full["precision"] == "1.23"
    assert full["exchanges"] > 50 and full["pro_exchanges"] > 50 and full["async_exchanges"] == full["exchanges"]
    assert full["same_sync"] and full["same_pro"]
    assert full["lean"] == [False, False, False]


def test_the_edge_modules_leave_ccxt_unimported_until_the_live_command_prepares_it() -> None:
    """prepare() only helps when it comes first: importing the CLI and the edge modules must not import ccxt."""
    code = (
        "import sys, json, flows.cli, cryptoml.config, cryptoml.edge.runner, cryptoml.edge.scorer, "
        "cryptoml.edge.stream, cryptoml.edge.state, cryptoml.edge.opportunities, cryptoml.edge.live_broker, "
        "cryptoml.market.lean_ccxt\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ccxt' or m.startswith('ccxt.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_an_imported_ccxt_is_used_as_it_is_and_unknown_ids_are_named() -> None:
    import ccxt  # this test process imports ccxt the ordinary way

    assert not prepare() and not is_lean()
    assert exchange_class("binanceusdm") is ccxt.binanceusdm
    assert exchange_ids() == list(ccxt.exchanges)
    with pytest.raises(ConfigError, match="unknown ccxt exchange id 'binanceusdn'; did you mean 'binanceusdm'"):
        exchange_class("binanceusdn")
    cls = pro_exchange_class("binanceusdm")
    assert cls is not None and cls.__name__ == "binanceusdm" and cls().has["watchOHLCV"]
    assert pro_exchange_class("bitbank") is None  # in ccxt, not in ccxt.pro
    assert pro_exchange_class("no such id") is None and pro_exchange_class("") is None
