"""Fixtures for the ccxt source: the stub exchange on 127.0.0.1, real data to serve, a fake clock."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cryptoml.config import FetchParams
from cryptoml.market.ccxt_source import CcxtSource
from tests.conftest import shared_file
from tests.support.stub_exchange import StubExchange, load_candles

DAY_MS = 86_400_000
MINUTE_MS = 60_000


class FakeClock:
    """Monotonic seconds that move only when the code under test sleeps; records every sleep asked."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def generated_candles(start_ms: int, n: int, step_ms: int = MINUTE_MS, seed: int = 1) -> pd.DataFrame:
    """A seeded random-walk candle frame in the store schema, prices rounded to a 0.01 tick."""
    rng = np.random.default_rng(seed)
    close = np.round(30_000 * np.exp(np.cumsum(rng.normal(0, 0.001, n))), 2)
    open_ = np.concatenate([[close[0]], close[:-1]])
    spread = np.round(np.abs(rng.normal(0, 5, n)), 2)
    return pd.DataFrame(
        {
            "ts_ms": start_ms + step_ms * np.arange(n, dtype="int64"),
            "open": open_,
            "high": np.maximum(open_, close) + spread,
            "low": np.minimum(open_, close) - spread,
            "close": close,
            "volume": np.round(rng.gamma(2.0, 10.0, n), 5),
        }
    )


@pytest.fixture(scope="session")
def fapi_exchange_info() -> dict[str, Any]:
    """The real recorded Binance USDⓈ-M exchangeInfo body (122 symbols, 2021-07-22)."""
    return json.loads(shared_file("binance_fapi_v1_exchangeInfo_20210722.json").read_text())


@pytest.fixture(scope="session")
def btc_1m_month() -> pd.DataFrame:
    """The real BTC/USDT 1m month (2023-04-17 -> 2023-05-17) in the store schema."""
    return load_candles(shared_file("binance_spot_btcusdt_1m_20230417-20230517.parquet"))


@pytest.fixture()
def stub() -> Iterator[StubExchange]:
    """A stub exchange with generated market lists (needs no shared data)."""
    with StubExchange() as s:
        yield s


@pytest.fixture()
def recorded_stub(fapi_exchange_info: dict[str, Any]) -> Iterator[StubExchange]:
    """A stub exchange whose Binance market list is the real recorded exchangeInfo body."""
    with StubExchange(exchange_info=fapi_exchange_info) as s:
        yield s


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


# Fast and patient enough for the faults the tests inject; every real wait goes through FakeClock.
TEST_FETCH = FetchParams(
    page_limit=1000,
    timeout_ms=3_000,
    max_retry_seconds=30.0,
    backoff_base_seconds=0.5,
    backoff_max_seconds=8.0,
    rate_limit_ms=1,
)


@pytest.fixture()
def make_source(clock: FakeClock) -> Iterator[Callable[..., CcxtSource]]:
    """Factory: a CcxtSource pointed at a stub for binanceusdm and bybit, with the fake clock and sleep."""
    sources: list[CcxtSource] = []

    def make(stub: StubExchange, **fetch_changes: Any) -> CcxtSource:
        source = CcxtSource(
            replace(TEST_FETCH, **fetch_changes),
            api_urls={"binanceusdm": stub.url, "bybit": stub.url},
            sleep=clock.sleep,
            clock=clock,
            now_ms=lambda: 1_700_000_000_000,
            rng=random.Random(0),
        )
        sources.append(source)
        return source

    yield make
    for source in sources:
        source.close()
