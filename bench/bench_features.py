"""Technical features throughput: batch over a year of 1m bars (target <= 2 s), streaming us per bar (target <= 50).

The input is the real BTC/USDT 1m month of ../shared/data tiled to 525,600 bars (each copy rescaled to
continue from the previous close, time stamps made consecutive), or a seeded random walk when that
file is absent. The streaming figure covers the first STREAM_BARS bars, fed one by one as the edge runner
does, and also reports its largest difference from the batch rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cryptoml.features.streaming import StreamingFeatures
from cryptoml.features.technical import TECHNICAL_FEATURES, technical_features

YEAR_BARS = 525_600
STREAM_BARS = 200_000
MONTH = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "binance_spot_btcusdt_1m_20230417-20230517.parquet"
)
T0_MS = 1_672_531_200_000  # 2023-01-01T00:00Z


def _year_of_bars() -> tuple[pd.DataFrame, str]:
    if MONTH.is_file():
        month = pd.read_parquet(MONTH)
        prices = month[["open", "high", "low", "close"]].to_numpy(dtype=np.float64)
        volume = month["volume"].to_numpy(dtype=np.float64)
        copies = -(-YEAR_BARS // len(month))
        # copy k is scaled so that its first open equals the previous copy's last close (no seam jump)
        step = prices[-1, 3] / prices[0, 0]
        scale = np.repeat(step ** np.arange(copies), len(month))[:YEAR_BARS, None]
        ohlc = np.tile(prices, (copies, 1))[:YEAR_BARS] * scale
        vol = np.tile(volume, copies)[:YEAR_BARS]
        source = f"real BTC/USDT 1m month tiled x{copies}"
    else:
        rng = np.random.default_rng(0)
        close = 30_000 * np.exp(np.cumsum(rng.normal(0, 6e-4, YEAR_BARS)))
        open_ = np.concatenate([[close[0]], close[:-1]])
        wick = np.abs(rng.normal(0, 5.0, YEAR_BARS))
        ohlc = np.column_stack([open_, np.maximum(open_, close) + wick, np.minimum(open_, close) - wick, close])
        vol = rng.gamma(2.0, 10.0, YEAR_BARS)
        source = "seeded random walk (shared data absent)"
    frame = pd.DataFrame(ohlc, columns=["open", "high", "low", "close"])
    frame.insert(0, "ts_ms", T0_MS + 60_000 * np.arange(YEAR_BARS, dtype=np.int64))
    frame["volume"] = vol
    return frame, source


def run() -> dict[str, object]:
    frame, source = _year_of_bars()
    technical_features(frame.iloc[:1_000])  # import pandas' ewm machinery once
    times = []
    for _ in range(3):
        started = time.perf_counter()
        batch = technical_features(frame)
        times.append(time.perf_counter() - started)
    batch_s = min(times)

    part = frame.iloc[:STREAM_BARS]
    columns = [part[c].to_numpy() for c in ("ts_ms", "open", "high", "low", "close", "volume")]
    bars = list(zip(columns[0].tolist(), *(c.tolist() for c in columns[1:]), strict=True))
    features = StreamingFeatures()
    update = features.update
    started = time.perf_counter()
    rows = [update(*bar) for bar in bars]
    stream_s = time.perf_counter() - started
    streamed = np.vstack([r for r in rows if r is not None])
    expected = batch.iloc[:STREAM_BARS]
    expected = expected.loc[~expected["is_warmup"], list(TECHNICAL_FEATURES)].to_numpy()

    figures: dict[str, object] = {
        "input": source,
        "batch_bars": len(frame),
        "batch_best_s": round(batch_s, 3),
        "batch_bars_per_s": round(len(frame) / batch_s),
        "stream_bars": len(bars),
        "stream_us_per_bar": round(stream_s / len(bars) * 1e6, 2),
        "stream_vs_batch_max_abs": float(f"{np.abs(streamed - expected).max():.3g}"),
        "snapshot_json_bytes": len(json.dumps(features.snapshot())),
    }
    for k, v in figures.items():
        print(f"  {k:26s} {v:>14,}" if isinstance(v, int) else f"  {k:26s} {v!s:>14}")
    return figures


if __name__ == "__main__":
    run()
