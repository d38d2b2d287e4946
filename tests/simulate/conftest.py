"""Small deterministic markets for the simulate tests: 2 exchanges x 2 bases, spot + perp 1m candles.

binance has order books (every 15 min) and funding stamped 17 ms after the hour with a mark price;
bybit has no books (volume proxies) and funding without mark price. bybit's ETH perp has a 2-hour hole
in its candles on day 3, for the data-gap rules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptoml.config import OpportunityParams, SimulateParams, SnapshotParams
from cryptoml.simulate.opportunities import detect_opportunities
from cryptoml.simulate.positions import FundingEvents, PricePaths, build_funding_events, build_price_paths
from cryptoml.simulate.snapshots import MarketFrames, snapshots_from_frames

EXCHANGES = ("binance", "bybit")
BASES = ("BTC", "ETH")
QUOTE = "USDT"
START_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC
DAYS = 4
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
GAP_START_MS = START_MS + 3 * 86_400_000 + 2 * HOUR_MS  # bybit ETH perp: no bars opening in [start, end)
GAP_END_MS = GAP_START_MS + 2 * HOUR_MS
DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _candles(rng: np.random.Generator, fair: np.ndarray, basis: float, volume: float) -> pd.DataFrame:
    n = len(fair)
    close = fair * (1 + basis + rng.normal(0, 1e-4, n))
    open_ = np.concatenate([[close[0]], close[:-1]])
    wiggle = 1 + np.abs(rng.normal(0, 2e-4, n))
    return pd.DataFrame(
        {
            "ts_ms": START_MS + MINUTE_MS * np.arange(n, dtype=np.int64),
            "open": open_,
            "high": np.maximum(open_, close) * wiggle,
            "low": np.minimum(open_, close) / wiggle,
            "close": close,
            "volume": volume * rng.lognormal(0, 0.5, n),
        }
    )


def _book(rng: np.random.Generator, candles: pd.DataFrame, every_min: int, size: float) -> pd.DataFrame:
    rows = []
    for i in range(every_min, len(candles), every_min):
        ts = int(candles["ts_ms"].iloc[i])  # taken at bar i's open = bar i-1's close
        mid = float(candles["close"].iloc[i - 1])
        half = mid * rng.uniform(0.5e-4, 2e-4)
        for level in range(12):
            for side, sign in (("bid", -1), ("ask", 1)):
                price = mid + sign * (half + level * mid * 1e-4)
                rows.append((ts, side, level, price, size * rng.uniform(0.5, 1.5)))
    df = pd.DataFrame(rows, columns=["ts_ms", "side", "level", "price", "size"])
    return df.astype({"level": np.int32})


def make_frames(days: int = DAYS, seed: int = 11) -> MarketFrames:
    """The test market (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    n = days * 1440
    ohlcv, funding, books = {}, {}, {}
    for base, p0, vol, book_size in (("BTC", 40_000.0, 0.8, 0.6), ("ETH", 2_200.0, 10.0, 4.0)):
        fair = p0 * np.exp(np.cumsum(rng.normal(0, 5e-4, n)))
        for ex, mean_rate, stamp_ms in (("binance", 4e-4, 17), ("bybit", 1.5e-4, 0)):
            spot, perp = f"{base}/{QUOTE}", f"{base}/{QUOTE}:{QUOTE}"
            ohlcv[(ex, spot)] = _candles(rng, fair, 0.0, vol)
            perp_bars = _candles(rng, fair, 4e-4, vol * 2)
            if (ex, base) == ("bybit", "ETH"):
                hole = (perp_bars["ts_ms"] >= GAP_START_MS) & (perp_bars["ts_ms"] < GAP_END_MS)
                perp_bars = perp_bars[~hole].reset_index(drop=True)
            ohlcv[(ex, perp)] = perp_bars
            settle = START_MS + 8 * HOUR_MS * np.arange(days * 3 + 1, dtype=np.int64)
            mark = fair[np.minimum((settle - START_MS) // MINUTE_MS, n - 1)] * 1.0003
            funding[(ex, perp)] = pd.DataFrame(
                {
                    "ts_ms": settle + stamp_ms,
                    "funding_rate": rng.normal(mean_rate, 1.5e-4, len(settle)),
                    "mark_price": mark if ex == "binance" else np.nan,
                }
            )
            if ex == "binance":
                books[(ex, spot)] = _book(rng, ohlcv[(ex, spot)], 15, book_size)
                books[(ex, perp)] = _book(rng, perp_bars, 15, book_size * 3)
    return MarketFrames(ohlcv=ohlcv, funding=funding, books=books, bar_ms=MINUTE_MS)


@pytest.fixture(scope="session")
def frames() -> MarketFrames:
    return make_frames()


@pytest.fixture(scope="session")
def snapshot_params() -> SnapshotParams:
    return SnapshotParams()


@pytest.fixture(scope="session")
def sim_params() -> SimulateParams:
    return SimulateParams(hold_hours=(1, 4, 8, 24, 48))


@pytest.fixture(scope="session")
def snapshots(frames: MarketFrames, snapshot_params: SnapshotParams) -> pd.DataFrame:
    return snapshots_from_frames(frames, EXCHANGES, BASES, QUOTE, snapshot_params)


@pytest.fixture(scope="session")
def opportunities(snapshots: pd.DataFrame, sim_params: SimulateParams) -> pd.DataFrame:
    return detect_opportunities(snapshots, OpportunityParams(allow_short_spot=True), sim_params)


@pytest.fixture(scope="session")
def paths(frames: MarketFrames, snapshots: pd.DataFrame) -> tuple[PricePaths, FundingEvents]:
    prices = build_price_paths(frames, snapshots)
    return prices, build_funding_events(frames, prices)
