"""Parquet store: explicit schema, atomic writes, merge-append without duplicates, range reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cryptoml.errors import DataValidationError
from cryptoml.market.store import SCHEMAS, DatasetKey, ParquetStore

KEY = DatasetKey("binanceusdm", "BTC/USDT:USDT", "ohlcv", "1m")


def candles(start_min: int, n: int, price: float = 100.0) -> pd.DataFrame:
    ts = (np.arange(start_min, start_min + n, dtype=np.int64)) * 60_000
    close = price + np.arange(n, dtype=float)
    return pd.DataFrame(
        {"ts_ms": ts, "open": close, "high": close + 1, "low": close - 1, "close": close, "volume": 1.0}
    )


def test_layout_and_schema(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path)
    path = store.write(KEY, candles(0, 10), {"source": "test"})
    assert path == tmp_path / "binanceusdm" / "swap" / "BTC_USDT_USDT" / "ohlcv_1m.parquet"
    schema = pq.read_schema(path)
    assert schema.field("ts_ms").type == pa.int64()
    assert all(schema.field(c).type == pa.float64() for c in ("open", "high", "low", "close", "volume"))
    assert store.metadata(KEY)["source"] == "test"
    assert store.metadata(KEY)["symbol"] == "BTC/USDT:USDT"
    assert list(store.datasets()) == [KEY]


def test_append_merges_without_duplicates_new_rows_win(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path)
    store.append(KEY, candles(0, 10))
    store.append(KEY, candles(5, 10, price=200.0))
    df = store.read(KEY)
    assert df["ts_ms"].is_unique and df["ts_ms"].is_monotonic_increasing
    assert len(df) == 15
    assert df.loc[df.ts_ms == 5 * 60_000, "close"].item() == 200.0
    assert store.last_timestamp(KEY) == 14 * 60_000


def test_read_time_range(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path)
    store.write(KEY, candles(0, 100))
    part = store.read(KEY, start_ms=10 * 60_000, end_ms=20 * 60_000)
    assert part["ts_ms"].tolist() == [m * 60_000 for m in range(10, 20)]


def test_same_data_same_bytes(tmp_path: Path) -> None:
    a, b = ParquetStore(tmp_path / "a"), ParquetStore(tmp_path / "b")
    a.write(KEY, candles(0, 50))
    b.append(KEY, candles(0, 20))
    b.append(KEY, candles(20, 30, price=120.0))
    assert a.path(KEY).read_bytes() == b.path(KEY).read_bytes()


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path)
    store.write(KEY, candles(0, 10))
    before = store.path(KEY).read_bytes()
    bad = candles(10, 5).drop(columns=["volume"])
    with pytest.raises(DataValidationError, match="missing columns"):
        store.append(KEY, bad)
    bad = candles(10, 5).assign(close="not a number")
    with pytest.raises(DataValidationError, match="does not fit the schema"):
        store.append(KEY, bad)
    assert store.path(KEY).read_bytes() == before
    assert [p.name for p in store.path(KEY).parent.iterdir()] == ["ohlcv_1m.parquet"]


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="no stored data for binanceusdm BTC/USDT:USDT ohlcv 1m"):
        ParquetStore(tmp_path).read(KEY)
    assert ParquetStore(tmp_path).last_timestamp(KEY) is None


def test_book_key_dedupes_per_level(tmp_path: Path) -> None:
    key = DatasetKey("bybit", "ETH/USDT", "book")
    store = ParquetStore(tmp_path)
    book = pd.DataFrame(
        {
            "ts_ms": [1, 1, 1, 1],
            "side": ["bid", "bid", "ask", "ask"],
            "level": [0, 1, 0, 1],
            "price": [10.0, 9.0, 11.0, 12.0],
            "size": [1.0, 2.0, 1.0, 2.0],
        }
    )
    store.append(key, book)
    store.append(key, book)
    assert len(store.read(key)) == 4
    assert store.path(key).parent.parent.name == "spot"
    assert pq.read_schema(store.path(key)).names == SCHEMAS["book"].names
