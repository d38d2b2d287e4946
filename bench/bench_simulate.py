"""Funding-arbitrage simulation throughput: snapshots, detection, and the vectorised position simulator.

On the default synthetic market (30 days, 2 exchanges x 3 bases, 1m candles) it builds the snapshots,
detects opportunities with the thresholds opened up (so there are enough of them), then simulates
~500k positions (opportunities x the 9 default holds) and times the plain-loop reference on a random
sample of the same positions, checking that both agree. ``python -m bench.bench_simulate`` also writes
``bench/simulate.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from cryptoml.config import OpportunityParams, SimulateParams, SnapshotParams, SyntheticParams

TARGET_POSITIONS = 500_000
REFERENCE_SAMPLE = 200


def run() -> dict[str, float]:
    from cryptoml.market.synthetic import generate_market
    from cryptoml.simulate.opportunities import detect_opportunities
    from cryptoml.simulate.positions import (
        OUTPUT_COLUMNS,
        build_funding_events,
        build_price_paths,
        simulate_positions,
    )
    from cryptoml.simulate.reference import simulate_one
    from cryptoml.simulate.snapshots import MarketFrames, snapshots_from_frames

    market = SyntheticParams()
    datasets = generate_market(market)
    by_kind: dict[str, dict] = {"ohlcv": {}, "funding": {}, "book": {}}
    for d in datasets:
        by_kind[d.key.kind][(d.key.exchange, d.key.symbol)] = d.frame
    frames = MarketFrames(by_kind["ohlcv"], by_kind["funding"], by_kind["book"])

    t = time.perf_counter()
    snaps = snapshots_from_frames(frames, market.exchanges, market.bases, market.quote, SnapshotParams())
    snapshots_s = time.perf_counter() - t
    sim = SimulateParams()
    loose = OpportunityParams(
        min_fund_apr_pct=-math.inf, allow_short_spot=True, min_volume_24h_usd=0.0, max_bid_ask_spread_pct=math.inf,
        min_depth_usd=0.0,
    )  # fmt: skip
    t = time.perf_counter()
    opps = detect_opportunities(snaps, loose, sim)
    detect_s = time.perf_counter() - t
    opps = opps.iloc[: math.ceil(TARGET_POSITIONS / len(sim.hold_hours))].reset_index(drop=True)
    prices = build_price_paths(frames, snaps)
    funding = build_funding_events(frames, prices)

    wall, cpu = [], []
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        result = simulate_positions(opps, prices, funding, sim)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    n_positions = len(opps) * len(sim.hold_hours)

    rng = np.random.default_rng(0)
    flat = rng.choice(n_positions, REFERENCE_SAMPLE, replace=False)
    got = result.positions.set_index(["ts_ms", "opportunity_id", "hold_hours"])
    values = [c for c in OUTPUT_COLUMNS if c not in ("hold_hours", "was_profitable")]
    max_abs_diff = 0.0
    t = time.perf_counter()
    refs = []
    for i in flat:
        row = opps.iloc[int(i) // len(sim.hold_hours)]
        hold = sim.hold_hours[int(i) % len(sim.hold_hours)]
        refs.append((row, hold, simulate_one(row.to_dict(), hold, prices, funding, sim)))
    reference_s = time.perf_counter() - t
    for row, hold, ref in refs:
        if ref["status"] == "ok":
            out = got.loc[(row["ts_ms"], row["opportunity_id"], hold)]
            max_abs_diff = max(max_abs_diff, max(abs(float(out[c]) - float(ref[c])) for c in values))

    best = min(wall)
    reference_per_position_s = reference_s / REFERENCE_SAMPLE
    figures = {
        "snapshot_rows": len(snaps),
        "snapshots_s": round(snapshots_s, 3),
        "opportunities_detected_s": round(detect_s, 3),
        "positions": n_positions,
        "positions_kept": len(result.positions),
        "simulate_best_s": round(best, 3),
        "simulate_median_s": round(float(np.median(wall)), 3),
        "simulate_cpu_best_s": round(min(cpu), 3),
        "positions_per_s": round(n_positions / best),
        "reference_positions_per_s": round(1 / reference_per_position_s, 1),
        "speedup_vs_reference": round(reference_per_position_s / (best / n_positions)),
        "reference_sample": REFERENCE_SAMPLE,
        "reference_max_abs_diff": float(f"{max_abs_diff:.3g}"),
    }
    for k, v in figures.items():
        print(f"  {k:28s} {v:>14,}" if isinstance(v, int) else f"  {k:28s} {v:>14}")
    return figures


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "simulate.json"
    out.write_text(json.dumps(run(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
