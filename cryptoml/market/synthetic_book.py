"""Order-book snapshots of the synthetic market: L2 ladders around a venue's price, shaped by volatility.

Used by :mod:`cryptoml.market.synthetic` only. A snapshot stamped ``ts_ms`` shows the book at that
instant, i.e. around the price at the **open** of the 1m bar starting at ``ts_ms`` (= the previous
bar's close), so a snapshot never knows the bar that is still to come. Prices are whole ticks, sizes
whole lots (base currency). When recent volatility is high, spreads and level gaps widen and sizes
thin out, as market makers quote wider and smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryptoml.errors import DataValidationError

# Stress factor = STRESS_FLOOR + (1 - STRESS_FLOOR) * vol_ratio: quotes never tighten below this
# fraction of their nominal width however calm the market is.
STRESS_FLOOR = 0.4
SPREAD_NOISE_SIGMA = 0.2  # lognormal noise of the spread between snapshots
GAP_NOISE_SIGMA = 0.3  # lognormal noise of each gap between consecutive levels
SIZE_NOISE_SIGMA = 0.4  # lognormal noise of each level's size
SIZE_GROWTH_PER_LEVEL = 0.35  # deeper levels hold more: size_k ~ top_size * (1 + 0.35 k)


def decimals_of(step: float) -> int:
    """Decimal places of a tick or lot size (0.01 -> 2, 1.0 -> 0), used to round away float noise."""
    return max(0, math.ceil(-math.log10(step) - 1e-9))


@dataclass(frozen=True)
class BookShape:
    """Nominal shape of one venue's book (at vol_ratio = 1)."""

    tick: float  # price increment, quote currency
    lot: float  # size increment, base currency
    spread_bps: float  # median best ask - best bid, in bps of mid
    level_gap_bps: float  # median distance between consecutive levels, in bps of mid
    top_size: float  # median size at the best level, base currency


def book_frame(
    ts_ms: np.ndarray,
    mid: np.ndarray,
    vol_ratio: np.ndarray,
    shape: BookShape,
    levels: int,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Snapshots in the store's long layout (ts_ms, side, level, price, size), sorted by key.

    ``ts_ms``, ``mid`` (quote currency) and ``vol_ratio`` (recent realised volatility / the asset's
    nominal volatility, >= 0) have one entry per snapshot. Each snapshot has ``levels`` asks
    ascending from the best and ``levels`` bids descending from the best, best bid < best ask.
    """
    n = len(ts_ms)
    if not (len(mid) == len(vol_ratio) == n) or levels <= 0:
        raise DataValidationError(f"book_frame: {n} times, {len(mid)} mids, {len(vol_ratio)} vol ratios")
    if n and float(np.min(mid)) <= 0:
        raise DataValidationError("book_frame: mid prices must be > 0")
    stress = STRESS_FLOOR + (1.0 - STRESS_FLOOR) * np.asarray(vol_ratio, dtype=np.float64)
    spread_bps = shape.spread_bps * stress * np.exp(rng.normal(0.0, SPREAD_NOISE_SIGMA, n))
    gap_bps = shape.level_gap_bps * stress[:, None, None] * np.exp(rng.normal(0.0, GAP_NOISE_SIGMA, (n, 2, levels - 1)))
    size_noise = np.exp(rng.normal(-0.5 * SIZE_NOISE_SIGMA**2, SIZE_NOISE_SIGMA, (n, 2, levels)))

    # Integer tick arithmetic keeps every ladder strictly monotonic after rounding.
    tick_bps = shape.tick / mid * 1e4  # one tick in bps of mid, per snapshot
    half_ticks = np.maximum(1.0, np.ceil(spread_bps / 2.0 / tick_bps))
    gap_ticks = np.maximum(1.0, np.rint(gap_bps / tick_bps[:, None, None]))
    first = np.broadcast_to(half_ticks[:, None, None], (n, 2, 1))
    offset_ticks = np.concatenate([first, gap_ticks], axis=2).cumsum(axis=2)
    direction = np.array([1.0, -1.0])[None, :, None]  # axis 1: 0 = ask (up), 1 = bid (down)
    price_ticks = np.rint(mid / shape.tick)[:, None, None] + direction * offset_ticks
    price = np.round(price_ticks * shape.tick, decimals_of(shape.tick))
    if n and float(price[:, 1, -1].min()) <= 0:
        raise DataValidationError("book_frame: the bid ladder reaches zero; the tick is too coarse")

    depth = shape.top_size * (1.0 + SIZE_GROWTH_PER_LEVEL * np.arange(levels))[None, None, :]
    lots = np.maximum(1.0, np.rint(depth / stress[:, None, None] * size_noise / shape.lot))
    size = np.round(lots * shape.lot, decimals_of(shape.lot))

    # Row order = the store's key order (ts_ms, side, level): "ask" sorts before "bid".
    return pd.DataFrame(
        {
            "ts_ms": np.repeat(np.asarray(ts_ms, dtype=np.int64), 2 * levels),
            "side": np.tile(np.repeat(np.array(["ask", "bid"], dtype=object), levels), n),
            "level": np.tile(np.arange(levels, dtype=np.int32), 2 * n),
            "price": price.reshape(-1),
            "size": size.reshape(-1),
        }
    )
