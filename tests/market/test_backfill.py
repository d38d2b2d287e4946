"""Backfill driver: windows to fetch, gap report, resume after interruption."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptoml.market.backfill import Gap, backfill_ohlcv, find_gaps, missing_windows
from cryptoml.market.store import DatasetKey, ParquetStore

MIN = 60_000


def test_find_gaps_reports_runs_of_missing_bars() -> None:
    ts = np.array([0, 1, 2, 5, 6, 9]) * MIN
    assert find_gaps(ts, MIN, 0, 10 * MIN) == [Gap(3 * MIN, 5 * MIN, 2), Gap(7 * MIN, 9 * MIN, 2)]
    assert find_gaps(ts, MIN, 0, 7 * MIN) == [Gap(3 * MIN, 5 * MIN, 2)]
    assert find_gaps([], MIN, 0, 3 * MIN) == [Gap(0, 3 * MIN, 3)]
    assert find_gaps(np.arange(10) * MIN, MIN, 0, 10 * MIN) == []


def test_missing_windows() -> None:
    assert missing_windows(None, 0, 100, 10) == [(0, 100)]
    assert missing_windows((30, 60), 0, 100, 10) == [(0, 30), (70, 100)]
    assert missing_windows((0, 90), 0, 100, 10) == []


class ListSource:
    """A paged source over an in-memory frame that can be told to die after N pages."""

    name = "memory"

    def __init__(self, frame: pd.DataFrame, page: int, die_after: int | None = None) -> None:
        self.frame, self.page, self.die_after, self.pages_served = frame, page, die_after, 0
        self.windows: list[tuple[int, int]] = []

    def fetch_ohlcv(
        self, exchange: str, symbol: str, timeframe: str, since_ms: int, until_ms: int
    ) -> Iterator[pd.DataFrame]:
        self.windows.append((since_ms, until_ms))
        rows = self.frame[(self.frame.ts_ms >= since_ms) & (self.frame.ts_ms < until_ms)]
        for i in range(0, len(rows), self.page):
            if self.die_after is not None and self.pages_served >= self.die_after:
                raise KeyboardInterrupt("simulated crash")
            self.pages_served += 1
            yield rows.iloc[i : i + self.page]

    def fetch_funding(self, *a: object) -> Iterator[pd.DataFrame]:
        return iter(())

    def fetch_book(self, *a: object) -> pd.DataFrame:
        raise AssertionError


def frame(n: int, holes: tuple[int, ...] = ()) -> pd.DataFrame:
    ts = np.array([i for i in range(n) if i not in holes], dtype=np.int64) * MIN
    px = 100 + np.sin(ts / 1e6)
    return pd.DataFrame({"ts_ms": ts, "open": px, "high": px + 1, "low": px - 1, "close": px, "volume": 2.0})


def test_interrupted_backfill_resumes_to_identical_bytes(tmp_path: Path) -> None:
    data = frame(1000, holes=(500, 501, 502))
    full = ParquetStore(tmp_path / "full")
    r = backfill_ohlcv(ListSource(data, 50), full, "x", "BTC/USDT:USDT", "1m", 0, 1000 * MIN, flush_every_pages=3)
    assert r.rows_total == 997 and r.gaps == [Gap(500 * MIN, 503 * MIN, 3)]

    part = ParquetStore(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        backfill_ohlcv(
            ListSource(data, 50, die_after=10), part, "x", "BTC/USDT:USDT", "1m", 0, 1000 * MIN, flush_every_pages=3
        )
    key = DatasetKey("x", "BTC/USDT:USDT", "ohlcv", "1m")
    assert 0 < len(part.read(key)) < 997  # some pages were flushed, the file is whole
    resumed_source = ListSource(data, 50)
    backfill_ohlcv(resumed_source, part, "x", "BTC/USDT:USDT", "1m", 0, 1000 * MIN, flush_every_pages=3)
    assert resumed_source.windows[0][0] > 0  # resumed after the last stored candle
    assert part.path(key).read_bytes() == full.path(key).read_bytes()


def test_backfill_extends_backwards_when_since_moves_earlier(tmp_path: Path) -> None:
    data = frame(300)
    store = ParquetStore(tmp_path)
    backfill_ohlcv(ListSource(data, 40), store, "x", "ETH/USDT", "1m", 100 * MIN, 300 * MIN)
    src = ListSource(data, 40)
    r = backfill_ohlcv(src, store, "x", "ETH/USDT", "1m", 0, 300 * MIN)
    assert src.windows == [(0, 100 * MIN)]
    assert r.rows_total == 300 and r.gaps == []
