"""Backfill through ccxt's own client against the stub exchange: interrupted + resumed == uninterrupted,
and transient faults leave no trace in the stored data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cryptoml.errors import SourceError
from cryptoml.market.backfill import backfill_ohlcv
from cryptoml.market.store import DatasetKey, ParquetStore
from tests.market.test_ccxt_source import MakeSource
from tests.support.stub_exchange import StubExchange

BTC = "BTC/USDT:USDT"
SINCE = 1_681_776_000_000  # 2023-04-18 00:00 UTC
UNTIL = SINCE + 3 * 86_400_000
KEY = DatasetKey("binanceusdm", BTC, "ohlcv", "1m")


class Crash(Exception):
    """Stands for the process being killed between two pages."""


def _crash_after(pages: int):  # type: ignore[no-untyped-def]
    seen = 0

    def on_page(rows: int) -> None:
        nonlocal seen
        seen += 1
        if seen >= pages:
            raise Crash

    return on_page


def test_interrupted_ccxt_backfill_resumes_to_identical_bytes(
    recorded_stub: StubExchange, btc_1m_month: pd.DataFrame, make_source: MakeSource, tmp_path: Path
) -> None:
    recorded_stub.set_candles("BTCUSDT", btc_1m_month)
    whole = ParquetStore(tmp_path / "whole")
    backfill_ohlcv(make_source(recorded_stub), whole, "binanceusdm", BTC, "1m", SINCE, UNTIL, flush_every_pages=1)

    resumed = ParquetStore(tmp_path / "resumed")
    with pytest.raises(Crash):
        backfill_ohlcv(make_source(recorded_stub), resumed, "binanceusdm", BTC, "1m", SINCE, UNTIL,
                       flush_every_pages=1, on_page=_crash_after(3))  # fmt: skip
    assert 0 < len(resumed.read(KEY)) < 3 * 1440
    recorded_stub.reset_counts()
    result = backfill_ohlcv(make_source(recorded_stub), resumed, "binanceusdm", BTC, "1m", SINCE, UNTIL)
    assert result.rows_total == 3 * 1440 and result.gaps == []
    first_start = int(recorded_stub.queries("/fapi/v1/klines")[0]["startTime"])
    assert first_start > SINCE  # it asked only for what was missing
    assert resumed.path(KEY).read_bytes() == whole.path(KEY).read_bytes()


def test_transient_faults_leave_no_trace_and_persistent_ones_leave_the_file_whole(
    recorded_stub: StubExchange, btc_1m_month: pd.DataFrame, make_source: MakeSource, tmp_path: Path
) -> None:
    recorded_stub.set_candles("BTCUSDT", btc_1m_month)
    clean = ParquetStore(tmp_path / "clean")
    backfill_ohlcv(make_source(recorded_stub), clean, "binanceusdm", BTC, "1m", SINCE, UNTIL)

    faulty = ParquetStore(tmp_path / "faulty")
    for kind in ("429", "502", "truncate"):
        recorded_stub.faults.add("/fapi/v1/klines", kind, times=1, retry_after_s=1)
    backfill_ohlcv(make_source(recorded_stub), faulty, "binanceusdm", BTC, "1m", SINCE, UNTIL)
    assert faulty.path(KEY).read_bytes() == clean.path(KEY).read_bytes()

    broken = ParquetStore(tmp_path / "broken")
    backfill_ohlcv(make_source(recorded_stub), broken, "binanceusdm", BTC, "1m", SINCE, SINCE + 86_400_000)
    before = broken.path(KEY).read_bytes()
    recorded_stub.faults.add("/fapi/v1/klines", "503", times=None)
    with pytest.raises(SourceError, match="binanceusdm"):
        backfill_ohlcv(make_source(recorded_stub, max_retry_seconds=5.0), broken, "binanceusdm", BTC, "1m",
                       SINCE, UNTIL)  # fmt: skip
    assert broken.path(KEY).read_bytes() == before
    assert [p.name for p in broken.path(KEY).parent.iterdir()] == ["ohlcv_1m.parquet"]
