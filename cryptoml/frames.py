"""Derived tables (snapshots, opportunities, positions, features) as Parquet: atomic and byte-stable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cryptoml.atomic import atomic_path
from cryptoml.errors import DataValidationError


def write_frame(df: pd.DataFrame, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``df`` (index dropped) atomically; same frame -> same bytes."""
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta.update({f"cryptoml.{k}".encode(): str(v).encode() for k, v in (metadata or {}).items()})
    table = table.replace_schema_metadata(dict(sorted(meta.items())))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_frame(path: str | Path, what: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a derived table, naming the stage that should have produced it when it is missing."""
    p = Path(path)
    if not p.is_file():
        raise DataValidationError(f"{what} not found at {p}: run the stage that writes it first (dvc repro)")
    return pq.read_table(p, columns=columns).to_pandas()


def frame_metadata(path: str | Path) -> dict[str, str]:
    raw = pq.read_schema(path).metadata or {}
    return {k.decode()[9:]: v.decode() for k, v in raw.items() if k.startswith(b"cryptoml.")}
