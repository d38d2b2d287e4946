"""Incremental, resumable backfill of candles and funding from a paged source into the Parquet store.

A backfill only asks the source for what the store lacks inside ``[since_ms, until_ms)``: the part before
the first stored row and the part after the last one. Pages are merged into the store every
``flush_every_pages`` pages with an atomic write, so an interrupted run loses at most that many pages and a
re-run resumes after the last stored row; the finished file is byte-identical to an uninterrupted run's.
Missing candles are reported (``GapReport``), never filled: the store holds only prices the exchange sent.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from cryptoml.atomic import atomic_write_bytes
from cryptoml.config import timeframe_ms
from cryptoml.market.store import DatasetKey, ParquetStore

FUNDING_STEP_MS = 1  # funding rows have irregular ms stamps: resume just after the last one


class PagedSource(Protocol):
    """What a backfill needs from a source: pages of store-schema frames inside a time window."""

    name: str

    def fetch_ohlcv(
        self, exchange: str, symbol: str, timeframe: str, since_ms: int, until_ms: int
    ) -> Iterator[pd.DataFrame]: ...

    def fetch_funding(self, exchange: str, symbol: str, since_ms: int, until_ms: int) -> Iterator[pd.DataFrame]: ...

    def fetch_book(self, exchange: str, symbol: str, levels: int) -> pd.DataFrame: ...


@dataclass(frozen=True)
class Gap:
    """Missing candles: bars opening at ``start_ms``, ``start_ms + tf``, ... up to ``end_ms`` exclusive."""

    start_ms: int
    end_ms: int
    missing_bars: int


@dataclass(frozen=True)
class BackfillResult:
    key: DatasetKey
    path: str
    rows_added: int
    rows_total: int
    source: str
    gaps: list[Gap] = field(default_factory=list)

    @property
    def missing_bars(self) -> int:
        return sum(g.missing_bars for g in self.gaps)

    def to_dict(self) -> dict[str, object]:
        return {
            "dataset": self.key.label(),
            "exchange": self.key.exchange,
            "symbol": self.key.symbol,
            "kind": self.key.kind,
            "timeframe": self.key.timeframe,
            "path": self.path,
            "rows_added": self.rows_added,
            "rows_total": self.rows_total,
            "source": self.source,
            "synthetic": self.source == "synthetic",
            "missing_bars": self.missing_bars,
            "gaps": [asdict(g) for g in self.gaps],
        }


def find_gaps(ts_ms: Iterable[int] | np.ndarray, step_ms: int, since_ms: int, until_ms: int) -> list[Gap]:
    """Runs of grid points in ``[since_ms, until_ms)`` (aligned to ``step_ms``) with no candle."""
    first = -(-since_ms // step_ms) * step_ms  # first grid point at or after since
    ts = np.asarray(list(ts_ms) if not isinstance(ts_ms, np.ndarray) else ts_ms, dtype=np.int64)
    ts = np.unique(ts[(ts >= first) & (ts < until_ms) & ((ts - first) % step_ms == 0)])
    bounds = np.concatenate([[first - step_ms], ts, [-(-until_ms // step_ms) * step_ms]])
    gaps = []
    for prev, nxt in itertools.pairwise(bounds):
        missing = int((nxt - prev) // step_ms) - 1
        if missing > 0:
            gaps.append(Gap(int(prev + step_ms), int(nxt), missing))
    return gaps


def _stored_range(store: ParquetStore, key: DatasetKey) -> tuple[int, int] | None:
    if not store.exists(key):
        return None
    ts = store.read(key)["ts_ms"]
    return (int(ts.min()), int(ts.max())) if len(ts) else None


def missing_windows(
    stored: tuple[int, int] | None, since_ms: int, until_ms: int, step_ms: int
) -> list[tuple[int, int]]:
    """The windows of ``[since_ms, until_ms)`` outside the stored ``(first, last)`` range."""
    if stored is None:
        return [(since_ms, until_ms)]
    first, last = stored
    windows = []
    if since_ms < first:
        windows.append((since_ms, min(first, until_ms)))
    if last + step_ms < until_ms:
        windows.append((max(since_ms, last + step_ms), until_ms))
    return windows


def _drain(
    pages: Iterator[pd.DataFrame],
    store: ParquetStore,
    key: DatasetKey,
    metadata: Mapping[str, str],
    flush_every_pages: int,
    on_page: Callable[[int], None] | None,
) -> int:
    buffer: list[pd.DataFrame] = []
    added = 0

    def flush() -> None:
        nonlocal buffer
        if buffer:
            store.append(key, pd.concat(buffer, ignore_index=True), metadata)
            buffer = []

    for page in pages:
        if len(page):
            buffer.append(page)
            added += len(page)
        if on_page is not None:
            on_page(len(page))
        if len(buffer) >= flush_every_pages:
            flush()
    flush()
    return added


def backfill_ohlcv(
    source: PagedSource,
    store: ParquetStore,
    exchange: str,
    symbol: str,
    timeframe: str,
    since_ms: int,
    until_ms: int,
    *,
    flush_every_pages: int = 20,
    on_page: Callable[[int], None] | None = None,
) -> BackfillResult:
    """Fetch the candles the store lacks in ``[since_ms, until_ms)`` and report the gaps left."""
    key = DatasetKey(exchange, symbol, "ohlcv", timeframe)
    step = timeframe_ms(timeframe)
    added = 0
    meta = {"source": source.name}
    for lo, hi in missing_windows(_stored_range(store, key), since_ms, until_ms, step):
        pages = source.fetch_ohlcv(exchange, symbol, timeframe, lo, hi)
        added += _drain(pages, store, key, meta, flush_every_pages, on_page)
    if not store.exists(key):
        return BackfillResult(key, str(store.path(key)), 0, 0, source.name, find_gaps([], step, since_ms, until_ms))
    window = store.read(key, since_ms, until_ms)
    total = len(store.read(key))
    gaps = find_gaps(window["ts_ms"].to_numpy(), step, since_ms, until_ms)
    return BackfillResult(key, str(store.path(key)), added, total, source.name, gaps)


def backfill_funding(
    source: PagedSource,
    store: ParquetStore,
    exchange: str,
    symbol: str,
    since_ms: int,
    until_ms: int,
    *,
    flush_every_pages: int = 20,
    on_page: Callable[[int], None] | None = None,
) -> BackfillResult:
    """Fetch the funding history the store lacks in ``[since_ms, until_ms)``."""
    key = DatasetKey(exchange, symbol, "funding")
    added = 0
    meta = {"source": source.name}
    for lo, hi in missing_windows(_stored_range(store, key), since_ms, until_ms, FUNDING_STEP_MS):
        pages = source.fetch_funding(exchange, symbol, lo, hi)
        added += _drain(pages, store, key, meta, flush_every_pages, on_page)
    total = len(store.read(key)) if store.exists(key) else 0
    return BackfillResult(key, str(store.path(key)), added, total, source.name)


def write_backfill_report(results: Iterable[BackfillResult], path: Path, extra: Mapping[str, object]) -> Path:
    """JSON summary of a backfill: one entry per dataset with rows and gaps (atomic write)."""
    items = [r.to_dict() for r in results]
    body = {
        **extra,
        "datasets": items,
        "missing_bars": sum(int(str(i["missing_bars"])) for i in items),
    }
    atomic_write_bytes((json.dumps(body, indent=2, sort_keys=True) + "\n").encode(), path)
    return path
