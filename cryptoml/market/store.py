"""Parquet store for raw market data: one file per exchange / market / symbol / dataset.

Layout under the store root (``data/raw`` by default)::

    <exchange>/<market>/<symbol slug>/<dataset>.parquet
    binance/swap/BTC_USDT_USDT/ohlcv_1m.parquet
    binance/swap/BTC_USDT_USDT/funding.parquet
    binance/spot/BTC_USDT/book.parquet

``market`` is ``swap`` for perpetuals (ccxt's unified ``BASE/QUOTE:SETTLE`` symbols) and ``spot``
otherwise. Every file has an explicit pyarrow schema: ``ts_ms`` is a UTC epoch-millisecond int64
(for candles the bar **open** time, for funding the funding time, for books the snapshot time),
prices and sizes are float64. Writes are atomic (temporary file in the same folder + ``os.replace``),
so a reader or a crash never sees half a file, and merging de-duplicates on the dataset's key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cryptoml.atomic import atomic_path, atomic_write_bytes
from cryptoml.errors import DataValidationError

__all__ = ["KINDS", "SCHEMAS", "DatasetKey", "ParquetStore", "atomic_write_bytes", "market_of", "symbol_slug"]

Kind = Literal["ohlcv", "funding", "book"]
KINDS: tuple[Kind, ...] = ("ohlcv", "funding", "book")

SCHEMAS: dict[str, pa.Schema] = {
    "ohlcv": pa.schema(
        [
            ("ts_ms", pa.int64()),
            ("open", pa.float64()),
            ("high", pa.float64()),
            ("low", pa.float64()),
            ("close", pa.float64()),
            ("volume", pa.float64()),
        ]
    ),
    "funding": pa.schema(
        [
            ("ts_ms", pa.int64()),
            ("funding_rate", pa.float64()),
            ("mark_price", pa.float64()),
        ]
    ),
    # Long layout: one row per level; side is "bid" or "ask", level 0 is the best price.
    "book": pa.schema(
        [
            ("ts_ms", pa.int64()),
            ("side", pa.string()),
            ("level", pa.int32()),
            ("price", pa.float64()),
            ("size", pa.float64()),
        ]
    ),
}

# Columns that identify a row; merging keeps the newest row per key.
KEY_COLUMNS: dict[str, list[str]] = {
    "ohlcv": ["ts_ms"],
    "funding": ["ts_ms"],
    "book": ["ts_ms", "side", "level"],
}

META_PREFIX = "cryptoml."


def market_of(symbol: str) -> str:
    """``swap`` for a unified perpetual symbol (``BTC/USDT:USDT``), else ``spot``."""
    return "swap" if ":" in symbol else "spot"


def symbol_slug(symbol: str) -> str:
    """File-system name of a unified symbol: ``BTC/USDT:USDT`` -> ``BTC_USDT_USDT``."""
    return symbol.replace("/", "_").replace(":", "_")


@dataclass(frozen=True)
class DatasetKey:
    """Identifies one stored dataset. ``timeframe`` is only meaningful for OHLCV."""

    exchange: str
    symbol: str
    kind: Kind
    timeframe: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataValidationError(f"unknown dataset kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "ohlcv" and not self.timeframe:
            raise DataValidationError("an OHLCV dataset needs a timeframe (e.g. '1m')")

    @property
    def market(self) -> str:
        return market_of(self.symbol)

    @property
    def dataset(self) -> str:
        return f"ohlcv_{self.timeframe}" if self.kind == "ohlcv" else self.kind

    def relpath(self) -> Path:
        return Path(self.exchange) / self.market / symbol_slug(self.symbol) / f"{self.dataset}.parquet"

    def label(self) -> str:
        tf = f" {self.timeframe}" if self.kind == "ohlcv" else ""
        return f"{self.exchange} {self.symbol} {self.kind}{tf}"


def to_table(df: pd.DataFrame, kind: str, metadata: Mapping[str, str] | None = None) -> pa.Table:
    """Convert a frame to the kind's exact schema; missing or non-numeric columns raise."""
    schema = SCHEMAS[kind]
    missing = [name for name in schema.names if name not in df.columns]
    if missing:
        raise DataValidationError(f"{kind} frame is missing columns {missing}; has {list(df.columns)}")
    try:
        table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataValidationError(f"{kind} frame does not fit the schema {schema}: {e}") from e
    meta = {f"{META_PREFIX}kind": kind}
    for k, v in (metadata or {}).items():
        meta[k if k.startswith(META_PREFIX) else META_PREFIX + k] = str(v)
    # Sorted keys and no pandas metadata: same data -> same bytes.
    return table.replace_schema_metadata({k: meta[k] for k in sorted(meta)})


def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file so that ``path`` holds either the old file or the whole new one."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)


def normalise(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Sort by key and drop duplicate keys, keeping the last occurrence (the newest data)."""
    keys = KEY_COLUMNS[kind]
    out = df.drop_duplicates(subset=keys, keep="last")
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


class ParquetStore:
    """The raw-data store rooted at ``root`` (``data/raw`` in the DVC pipeline)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: DatasetKey) -> Path:
        return self.root / key.relpath()

    def exists(self, key: DatasetKey) -> bool:
        return self.path(key).is_file()

    def write(self, key: DatasetKey, df: pd.DataFrame, metadata: Mapping[str, str] | None = None) -> Path:
        """Replace the dataset with ``df`` (sorted, de-duplicated), atomically."""
        meta = {"exchange": key.exchange, "symbol": key.symbol, "market": key.market}
        if key.timeframe:
            meta["timeframe"] = key.timeframe
        meta.update(metadata or {})
        table = to_table(normalise(df, key.kind), key.kind, meta)
        path = self.path(key)
        atomic_write_table(table, path)
        return path

    def append(self, key: DatasetKey, df: pd.DataFrame, metadata: Mapping[str, str] | None = None) -> Path:
        """Merge ``df`` into the stored dataset without duplicates (new rows win on equal keys)."""
        if self.exists(key):
            to_table(df, key.kind)  # fail on a malformed frame before touching the stored data
            old = self.read(key)
            merged_meta = {**self.metadata(key), **(metadata or {})}
            df = pd.concat([old, df[SCHEMAS[key.kind].names]], ignore_index=True)
        else:
            merged_meta = dict(metadata or {})
        return self.write(key, df, merged_meta)

    def read(self, key: DatasetKey, start_ms: int | None = None, end_ms: int | None = None) -> pd.DataFrame:
        """Rows with ``start_ms <= ts_ms < end_ms`` (either bound optional), sorted by key."""
        path = self.path(key)
        if not path.is_file():
            raise DataValidationError(f"no stored data for {key.label()} (expected {path})")
        filters: list[tuple[str, str, int]] = []
        if start_ms is not None:
            filters.append(("ts_ms", ">=", int(start_ms)))
        if end_ms is not None:
            filters.append(("ts_ms", "<", int(end_ms)))
        table = pq.read_table(path, filters=filters or None, schema=SCHEMAS[key.kind])
        return table.to_pandas()

    def metadata(self, key: DatasetKey) -> dict[str, str]:
        """The file's ``cryptoml.*`` metadata with the prefix removed."""
        raw = pq.read_schema(self.path(key)).metadata or {}
        out = {}
        for k, v in raw.items():
            name = k.decode()
            if name.startswith(META_PREFIX):
                out[name[len(META_PREFIX) :]] = v.decode()
        return out

    def last_timestamp(self, key: DatasetKey) -> int | None:
        """Largest stored ``ts_ms`` (from Parquet statistics, without reading the data), or None."""
        path = self.path(key)
        if not path.is_file():
            return None
        meta = pq.ParquetFile(path).metadata
        col = meta.schema.names.index("ts_ms")
        best: int | None = None
        for rg in range(meta.num_row_groups):
            stats = meta.row_group(rg).column(col).statistics
            if stats is None or not stats.has_min_max:
                return int(self.read(key)["ts_ms"].max())
            best = int(stats.max) if best is None else max(best, int(stats.max))
        return best

    def datasets(self) -> Iterator[DatasetKey]:
        """Every dataset under the root, read back from each file's metadata."""
        for path in sorted(self.root.glob("*/*/*/*.parquet")):
            raw = pq.read_schema(path).metadata or {}
            meta = {k.decode(): v.decode() for k, v in raw.items()}
            try:
                yield DatasetKey(
                    exchange=meta[f"{META_PREFIX}exchange"],
                    symbol=meta[f"{META_PREFIX}symbol"],
                    kind=meta[f"{META_PREFIX}kind"],
                    timeframe=meta.get(f"{META_PREFIX}timeframe", ""),
                )
            except KeyError:
                continue  # not written by this store
