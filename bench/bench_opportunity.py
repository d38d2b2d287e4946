"""The funding-arbitrage stages on the default synthetic market: seconds per stage (target: all <= 3 min).

Library calls only (no Prefect start-up), in a temporary folder: snapshots + detection, simulation,
features, training of the three XGBoost models with evaluation and plots. Then :func:`small_rows`: the
per-request scoring work of the API in microseconds per call, on the small-row path and on the NumPy path.
"""

from __future__ import annotations

import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from cryptoml.config import Params


def run() -> dict[str, float]:
    from cryptoml.features.opportunity import opportunity_features
    from cryptoml.market.store import ParquetStore
    from cryptoml.market.synthetic import write_market
    from cryptoml.models.opportunity import train_opportunity_models
    from cryptoml.simulate.opportunities import detect_opportunities
    from cryptoml.simulate.positions import build_funding_events, build_price_paths, simulate_positions
    from cryptoml.simulate.snapshots import build_snapshots, load_market_frames

    params = Params()
    s = params.synthetic
    ex, bases, quote = list(s.exchanges), list(s.bases), s.quote
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ParquetStore(Path(tmp) / "raw")
        write_market(s, store)
        t = time.perf_counter()
        snaps = build_snapshots(store, ex, bases, quote, params.snapshots)
        opps = detect_opportunities(snaps, params.opportunities, params.simulate)
        figures["snapshots_s"] = time.perf_counter() - t
        t = time.perf_counter()
        frames = load_market_frames(store, ex, bases, quote)
        prices = build_price_paths(frames, snaps)
        result = simulate_positions(opps, prices, build_funding_events(frames, prices), params.simulate)
        figures["simulate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        X = opportunity_features(result.positions)
        figures["features_s"] = time.perf_counter() - t
        t = time.perf_counter()
        train_opportunity_models(
            result.positions, params.opportunity_model, params.simulate, Path(tmp) / "out", features=X
        )
        figures["train_s"] = time.perf_counter() - t
    figures = {k: round(v, 2) for k, v in figures.items()}
    figures["total_s"] = round(sum(figures.values()), 2)
    figures["positions"] = len(result.positions)
    figures.update(small_rows(params.simulate.hold_hours))
    for k, v in figures.items():
        print(f"  {k:34s} {v:>12}")
    return figures


def small_rows(holds: tuple[float, ...], repeats: int = 7) -> dict[str, float]:
    """Microseconds per call (min over ``repeats`` timings) of what the API does per request: the features
    of one entry at 1 hold and at each of ``holds`` (the grid), the composite score of those candidates and
    the Kelly size of the chosen one; each through the public function (the small-row path, for so few
    rows) and through the NumPy path it reproduces bit for bit (``*_numpy_us``, the code before it)."""
    import numpy as np

    from cryptoml.features import opportunity as feat
    from cryptoml.models import scoring

    ts_ms = 1_704_067_200_000 + 37_000_000.0
    entry: dict[str, Any] = {
        "ts_ms": ts_ms, "fund_apr": 54.75, "fund_profit_8h": 0.05, "break_even_hours": 40.0,
        "funding_spread": 5e-4, "funding_spread_avg_24h": 4e-4, "funding_spread_avg_3d": 3e-4,
        "spread_volatility_cv": 1.0, "ret_vol_24h": 1e-3, "volume_24h": 1e7, "orderbook_depth_usd": 999_999.0,
        "bid_ask_spread_pct": 0.05, "depth_is_proxy": 0.0, "next_funding_ts_ms": ts_ms + 8 * 3_600_000,
        "btc_ret_trailing": 0.04,
    }  # fmt: skip
    rng = np.random.default_rng(0)
    figures: dict[str, float] = {}

    def per_call_us(fn: Any, *args: Any) -> float:
        number = max(1, int(0.05 / max(timeit.timeit(lambda: fn(*args), number=20) / 20, 1e-9)))  # ~50 ms a timing
        return round(min(timeit.repeat(lambda: fn(*args), number=number, repeat=repeats)) / number * 1e6, 1)

    for n_holds in (1, len(holds)):
        hold_hours = np.asarray(holds[:n_holds] if n_holds > 1 else (24.0,), dtype=np.float64)
        cols: dict[str, Any] = {c: np.full(n_holds, float(v)) for c, v in entry.items()}  # as ModelSet builds them
        cols.update(hold_hours=hold_hours, strategy=np.asarray(["spot_perp"] * n_holds, dtype=object))
        cols["regime"] = np.asarray(["Bull"] * n_holds, dtype=object)
        profit = rng.normal(0.2, 0.5, n_holds)
        proba = rng.uniform(0.0, 1.0, n_holds).astype(np.float32).astype(np.float64)  # ONNX float32, widened
        for name, fast, reference, args in (
            ("feature_matrix", feat.feature_matrix, feat._numpy_feature_matrix, (cols,)),
            ("composite_score", scoring.composite_score, scoring._numpy_composite_score,
             (profit, proba, hold_hours, 1.0, 1.0)),
            ("kelly_fraction", scoring.kelly_fraction, scoring._numpy_kelly_fraction, (proba[:1], 1.3, 0.9, 0.25, 0.2)),
        ):  # fmt: skip
            if name == "kelly_fraction" and n_holds > 1:
                continue  # one Kelly size per request, whatever the number of holds
            figures[f"{name}_{n_holds}_us"] = per_call_us(fast, *args)
            figures[f"{name}_{n_holds}_numpy_us"] = per_call_us(reference, *args)
    return figures
