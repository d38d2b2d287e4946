"""The --live ccxt broker against the stub's copy of Binance USDⓈ-M's signed endpoints (HMAC checked with a
fake secret): keys only from the environment, idempotent client order ids, protective orders, and the key
and secret in no log line, no state row and no error text."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import ccxt
import numpy as np
import pandas as pd
import pytest

from cryptoml.edge.live_broker import ENV_KEY, ENV_SECRET, Credentials, LiveBroker, credentials_from_env
from cryptoml.errors import ConfigError, DataValidationError, SourceError
from cryptoml.features.technical import TECHNICAL_FEATURES
from cryptoml.market.exchange import make_exchange
from tests.edge.test_runner import flat_bars, price_bundle, write_params
from tests.support.stub_exchange import StubExchange

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "BTC/USDT:USDT"
KEY = "fakeKEY0123456789abcdefXYZ"
SECRET = "fakeSECRETzyx9876543210fedcba"
MINUTE = 60_000


@pytest.fixture()
def stub() -> StubExchange:
    with StubExchange() as server:
        server.set_account(KEY, SECRET, wallet_usdt=10_000.0)
        server.set_mark("BTCUSDT", 30_000.0)
        yield server


def broker(stub: StubExchange, key: str = KEY, secret: str = SECRET) -> LiveBroker:
    return LiveBroker(make_exchange("binanceusdm", api_url=stub.url, rate_limit_ms=1), Credentials(key, secret))


def test_keys_come_from_the_environment_and_are_never_shown() -> None:
    with pytest.raises(ConfigError, match=f"{ENV_KEY} and {ENV_SECRET} are not set"):
        credentials_from_env({})
    with pytest.raises(ConfigError, match=f"{ENV_SECRET} is not set") as info:
        credentials_from_env({ENV_KEY: KEY, ENV_SECRET: "  "})
    assert KEY not in str(info.value)
    creds = credentials_from_env({ENV_KEY: KEY, ENV_SECRET: SECRET})
    assert (creds.api_key, creds.secret) == (KEY, SECRET)
    assert KEY not in repr(creds) + str(creds) and SECRET not in repr(creds) + str(creds)


def test_orders_are_signed_and_a_client_order_id_is_sent_once(stub: StubExchange) -> None:
    live = broker(stub)
    order = live.submit_market("cml-test-1-en", SYMBOL, "buy", 0.01, ts_ms=1, price=29_990.0)
    assert order.status == "filled" and order.fill is not None and order.fill.price == 30_000.0
    assert order.fill.slippage_cost == pytest.approx(0.1) and order.fill.fee == pytest.approx(0.12)
    assert live.position(SYMBOL).qty == 0.01 and live.position(SYMBOL).avg_entry_price == 30_000.0
    assert live.cash() == pytest.approx(10_000.0 - 0.12)
    # Again from the same broker, and from a restarted one without its cache: adopted, never sent twice.
    assert live.submit_market("cml-test-1-en", SYMBOL, "buy", 0.01, ts_ms=1, price=29_990.0) is order
    restarted = broker(stub).submit_market("cml-test-1-en", SYMBOL, "buy", 0.01, ts_ms=1, price=29_990.0)
    assert restarted.status == "filled"
    assert stub._account is not None and len(stub._account.orders) == 1
    # The exchange itself refuses a reused id the way Binance does (ccxt maps -4116 by URL; here a plain error).
    raw = make_exchange("binanceusdm", api_url=stub.url, rate_limit_ms=1)
    raw.apiKey, raw.secret, raw.options["fetchCurrencies"] = KEY, SECRET, False
    with pytest.raises(ccxt.ExchangeError, match=r"-4116.*ClientOrderId is duplicated"):
        raw.create_order(SYMBOL, "market", "buy", 0.01, None, {"newClientOrderId": "cml-test-1-en"})
    with pytest.raises(DataValidationError, match="names another order"):
        live.submit_market("cml-test-1-en", SYMBOL, "sell", 0.01, ts_ms=1)


def test_protective_orders_rest_trigger_and_cancel(stub: StubExchange) -> None:
    live = broker(stub)
    live.submit_market("cml-test-2-en", SYMBOL, "buy", 0.02, ts_ms=1, price=30_000.0)
    stop = live.submit_stop("cml-test-2-sl", SYMBOL, "sell", 0.02, 29_700.0, ts_ms=1)
    take = live.submit_take_profit("cml-test-2-tp", SYMBOL, "sell", 0.02, 30_900.0, ts_ms=1)
    assert stop.status == take.status == "open" and len(live.open_orders(SYMBOL)) == 2
    assert live.on_bar(SYMBOL, 2, 30_000.0, 30_010.0, 29_990.0, 30_000.0) == []  # nothing triggered yet
    stub.trigger_algo("cml-test-2-sl")
    (fill,) = live.on_bar(SYMBOL, 3, 30_000.0, 30_000.0, 29_650.0, 29_700.0)
    assert fill.client_order_id == "cml-test-2-sl" and fill.realised_pnl == pytest.approx(-6.0)
    assert live.position(SYMBOL).qty == 0.0
    cancelled = live.cancel("cml-test-2-tp", ts_ms=4)
    assert cancelled.status == "cancelled" and live.open_orders() == []
    assert live.cancel("cml-test-2-tp", ts_ms=5) is cancelled
    summary = live.summary({SYMBOL: 29_700.0})
    assert summary.realised_pnl == pytest.approx(-6.0) and summary.cash == pytest.approx(live.cash())
    state = live.to_dict()
    fresh = broker(stub)
    fresh.load_dict(json.loads(json.dumps(state)))
    assert fresh.to_dict() == state
    with pytest.raises(DataValidationError, match="paper broker"):
        fresh.load_dict({"format": 1, "cash": 1.0})


def test_wrong_key_or_secret_is_refused_without_showing_either(stub: StubExchange) -> None:
    for key, secret, code in ((KEY, "not-the-secret-000", "-1022"), ("not-the-key-000", SECRET, "-2015")):
        with pytest.raises(SourceError, match=code) as info:
            broker(stub, key, secret).submit_market("cml-test-3-en", SYMBOL, "buy", 0.01, ts_ms=1)
        text = "".join(str(e) for e in (info.value, info.value.__cause__))
        assert KEY not in text and SECRET not in text and "not-the-" not in text


@pytest.fixture(scope="module")
def always_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(400, len(TECHNICAL_FEATURES))), columns=list(TECHNICAL_FEATURES))
    out = tmp_path_factory.mktemp("always_long")
    price_bundle(out / "price_lgbm", X, 0.01 + 1e-6 * rng.normal(size=400))
    return out


def _live(
    stub: StubExchange, models: Path, state: Path, params: Path, first_ms: int, last_ms: int, env: dict
) -> subprocess.CompletedProcess:
    iso = [pd.Timestamp(t, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M") for t in (first_ms, last_ms)]
    cmd = [
        sys.executable, "-m", "flows.cli", "live", "--live", "--api-url", stub.url, "--exchange", "binanceusdm",
        "--symbol", SYMBOL, "--state", str(state), "--models", str(models), "--params", str(params),
        "--clock-start", iso[0], "--clock-speed", "1000000", "--until", iso[1], "--log-level", "DEBUG",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=state.parent, env=env, capture_output=True, text=True, timeout=300)


def test_live_command_trades_on_the_exchange_and_never_logs_the_keys(
    stub: StubExchange, always_long: Path, tmp_path: Path
) -> None:
    start = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000
    bars = flat_bars(start, 75, price=30_000.0)
    stub.set_candles("BTCUSDT", bars)
    params = write_params(
        tmp_path / "params.yaml",
        live={"buffer_hours": 1.0, "shadow": False, "opportunity_scoring": False, "model_poll_seconds": 3600.0},
        strategy={"max_bar_age_seconds": 1e9},  # the replay clock runs far ahead of the bars
    )
    base_env = {k: v for k, v in os.environ.items() if k not in (ENV_KEY, ENV_SECRET)}
    base_env["PYTHONPATH"] = str(ROOT)
    first, last = start + 61 * MINUTE, start + 74 * MINUTE

    refused = _live(stub, always_long, tmp_path / "none.sqlite", params, first, last, base_env)
    assert refused.returncode == 2 and f"{ENV_KEY} and {ENV_SECRET} are not set" in refused.stderr
    assert not (tmp_path / "none.sqlite").exists()

    state = tmp_path / "live.sqlite"
    done = _live(stub, always_long, state, params, first, last, {**base_env, ENV_KEY: KEY, ENV_SECRET: SECRET})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["mode"] == "live"
    assert stub._account is not None and any(o["status"] == "FILLED" for o in stub._account.orders.values())
    assert stub._account.algo_orders, "the entry's stop-loss and take-profit rest on the exchange"
    assert "DEBUG" in done.stderr  # the debug log was on, and still:
    db = sqlite3.connect(state)
    dump = "\n".join(db.iterdump())
    db.close()
    assert "cml-" in dump and '"kind":"live"' in dump
    wrong = _live(stub, always_long, tmp_path / "wrong.sqlite", params, first, last,
                  {**base_env, ENV_KEY: KEY, ENV_SECRET: "fakeWRONGsecret"})  # fmt: skip
    assert wrong.returncode != 0 and "-1022" in wrong.stderr
    for text in (done.stdout, done.stderr, dump, wrong.stdout, wrong.stderr):
        assert KEY not in text and SECRET not in text and "fakeWRONGsecret" not in text
