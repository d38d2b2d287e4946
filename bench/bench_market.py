"""Market-data layer throughput: synthetic generation, Parquet write / read, great-expectations validation."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd

from cryptoml.config import SyntheticParams, ValidationParams
from cryptoml.market.store import ParquetStore


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run() -> dict[str, float]:
    from cryptoml.market.synthetic import generate_market
    from cryptoml.market.validation import validate_frame

    params = SyntheticParams()
    datasets: list = []
    gen_s = _best(lambda: datasets.__setitem__(slice(None), generate_market(params)), repeat=2)
    rows = sum(len(d.frame) for d in datasets)
    candles = [d for d in datasets if d.key.kind == "ohlcv"]
    candle_rows = sum(len(d.frame) for d in candles)

    with tempfile.TemporaryDirectory() as tmp:
        store = ParquetStore(Path(tmp))
        write_s = _best(lambda: [store.write(d.key, d.frame, d.metadata) for d in candles])
        read_s = _best(lambda: [store.read(d.key) for d in candles])

    vparams = ValidationParams()
    frame = candles[0].frame
    validate_frame(frame, "ohlcv", vparams, timeframe="1m")  # warm the GE context once
    val_s = _best(lambda: validate_frame(frame, "ohlcv", vparams, timeframe="1m"))
    big = pd.concat([frame.assign(ts_ms=frame.ts_ms + i * len(frame) * 60_000) for i in range(12)], ignore_index=True)
    val_big_s = _best(lambda: validate_frame(big, "ohlcv", vparams, timeframe="1m"), repeat=1)

    figures = {
        "synthetic_rows": rows,
        "synthetic_generate_s": round(gen_s, 3),
        "synthetic_rows_per_s": round(rows / gen_s),
        "parquet_write_rows_per_s": round(candle_rows / write_s),
        "parquet_read_rows_per_s": round(candle_rows / read_s),
        "validation_rows": len(frame),
        "validation_rows_per_s": round(len(frame) / val_s),
        "validation_rows_big": len(big),
        "validation_big_rows_per_s": round(len(big) / val_big_s),
    }
    for k, v in figures.items():
        print(f"  {k:28s} {v:>14,}" if isinstance(v, int) else f"  {k:28s} {v:>14}")
    return figures
