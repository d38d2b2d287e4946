"""The funding-arbitrage stages on the default synthetic market: seconds per stage (target: all <= 3 min).

Library calls only (no Prefect start-up), in a temporary folder: snapshots + detection, simulation,
features, training of the three XGBoost models with evaluation and plots.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

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
    for k, v in figures.items():
        print(f"  {k:14s} {v:>12}")
    return figures
