"""Position simulator: a hand-computed case, vectorised == reference loop, boundaries, slippage tiers, real data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cryptoml.config import OpportunityParams, SimulateParams, SnapshotParams
from cryptoml.errors import DataValidationError
from cryptoml.market.store import DatasetKey, ParquetStore
from cryptoml.simulate.opportunities import detect_opportunities
from cryptoml.simulate.positions import (
    OUTPUT_COLUMNS,
    FundingEvents,
    FundingSeries,
    PricePaths,
    PriceSeries,
    SimulationResult,
    build_funding_events,
    build_price_paths,
    simulate_positions,
)
from cryptoml.simulate.reference import simulate_one
from cryptoml.simulate.slippage import slippage_frac, slippage_frac_one
from cryptoml.simulate.snapshots import MarketFrames, build_snapshots, load_market_frames
from tests.simulate.conftest import DATA_DIR, GAP_START_MS, HOUR_MS, MINUTE_MS, START_MS

VALUE_COLUMNS = [c for c in OUTPUT_COLUMNS if c not in ("hold_hours", "was_profitable")]
Paths = tuple[PricePaths, FundingEvents]


def _legs(ts_ms: int, long: tuple[str, str], short: tuple[str, str]) -> dict:
    return {
        "ts_ms": ts_ms, "opportunity_id": f"test:{long[0]}-{long[1]}:{short[0]}-{short[1]}",
        "long_exchange": long[0], "long_symbol": long[1], "short_exchange": short[0], "short_symbol": short[1],
    }  # fmt: skip


def _check_against_reference(
    opps: pd.DataFrame, result: SimulationResult, paths: Paths, params: SimulateParams, pairs
) -> dict[str, int]:
    """Every (opportunity index, hold) in pairs: same status, outputs equal to 1e-9. Returns status counts."""
    prices, funding = paths
    got = result.positions.set_index(["ts_ms", "opportunity_id", "hold_hours"])
    statuses: dict[str, int] = {}
    for i, hold in pairs:
        row = opps.iloc[i]
        ref = simulate_one(row.to_dict(), hold, prices, funding, params)
        statuses[ref["status"]] = statuses.get(ref["status"], 0) + 1
        key = (row["ts_ms"], row["opportunity_id"], hold)
        if ref["status"] != "ok":
            assert key not in got.index, (key, ref["status"])
            continue
        out = got.loc[key]
        for col in VALUE_COLUMNS:
            assert abs(float(out[col]) - float(ref[col])) <= 1e-9, (key, col, out[col], ref[col])
        assert bool(out["was_profitable"]) == ref["was_profitable"]
    return statuses


# ---------------------------------------------------------------- slippage tiers


@pytest.mark.parametrize(
    ("depth_usd", "multiplier"),
    [
        (1_000_001.0, 1.0),  # 10k / depth just below 0.01
        (1_000_000.0, 1.5),  # exactly 0.01 -> the upper tier
        (200_000.0, 2.5),  # exactly 0.05
        (200_001.0, 1.5),
        (100_000.0, 5.0),  # exactly 0.10
        (100_001.0, 2.5),
        (0.0, 5.0),  # no depth: worst tier
        (float("nan"), 5.0),
    ],
)
def test_slippage_tiers_at_boundaries(depth_usd: float, multiplier: float) -> None:
    params = SimulateParams()
    expected = 0.04 / 100 / 2 * multiplier
    assert slippage_frac_one(0.04, depth_usd, 10_000.0, params) == expected
    assert slippage_frac(np.array([0.04]), np.array([depth_usd]), 10_000.0, params)[0] == expected


# ---------------------------------------------------------------- a case computed by hand

T0 = START_MS + 10 * HOUR_MS


def _hand_paths() -> Paths:
    open_ts = T0 - HOUR_MS + MINUTE_MS * np.arange(180, dtype=np.int64)
    close_ts = open_ts + MINUTE_MS
    perp = np.where(close_ts <= T0 + 20 * MINUTE_MS, 200.0, np.where(close_ts <= T0 + 40 * MINUTE_MS, 190.0, 195.0))
    liq_ts = np.array([T0 - 5 * MINUTE_MS], dtype=np.int64)
    prices = PricePaths(
        {
            ("x", "BTC/USDT"): PriceSeries(close_ts, np.full(180, 100.0), liq_ts, np.array([0.02]), np.array([1e9])),
            ("x", "BTC/USDT:USDT"): PriceSeries(close_ts, perp, liq_ts, np.array([0.04]), np.array([1e9])),
        }
    )
    funding = FundingEvents(
        {
            ("x", "BTC/USDT:USDT"): FundingSeries(
                ts_ms=np.array([T0, T0 + HOUR_MS], dtype=np.int64),
                rate=np.array([5e-3, 1e-3]),  # the first is exactly at entry: not received
                mark_price=np.array([150.0, 195.0]),
                interval_ms=8 * HOUR_MS,
            )
        }
    )
    return prices, funding


def test_hand_computed_cash_and_carry() -> None:
    params = SimulateParams(hold_hours=(1,))
    paths = _hand_paths()
    opps = pd.DataFrame([_legs(T0, ("x", "BTC/USDT"), ("x", "BTC/USDT:USDT"))])
    result = simulate_positions(opps, *paths, params)
    assert (result.dropped_past_data, result.dropped_gap) == (0, 0)
    got = result.positions.iloc[0]
    # qty: 100 spot, 50 perp; slippage 1 bp (spot) and 2 bp (perp); fee 5 bps (the default exchange).
    long_pnl = 100 * (100 * 0.9999 - 100 * 1.0001)
    short_pnl = 50 * (200 * 0.9998 - 195 * 1.0002)
    fees = 5e-4 * (100 * 100.01 + 100 * 99.99 + 50 * 199.96 + 50 * 195.039)
    funding = 1e-3 * 50 * 195.0
    profit = long_pnl + short_pnl - fees + funding
    entry_costs = 5e-4 * (100 * 100.01 + 50 * 199.96) + (100 * 100 * 1e-4 + 50 * 200 * 2e-4)
    expected = {
        "actual_hold_hours": 1.0,
        "actual_profit_usd": profit,
        "actual_profit_pct": profit / 100,
        "fees_usd": fees,
        "total_funding_usd": funding,
        "funding_payments_count": 1,
        "slippage_pct": (100 * (0.01 + 0.01) + 50 * (0.04 + 0.039)) / 100,
        "peak_profit_pct": (50 * 10 - entry_costs) / 100,  # the perp at 190, before the funding
        "max_drawdown_pct": 50 * 5 / 100,  # 190 -> 195 on the short leg
    }
    ref = simulate_one(opps.iloc[0].to_dict(), 1, *paths, params)
    for col, value in expected.items():
        assert got[col] == pytest.approx(value, abs=1e-9), col
        assert ref[col] == pytest.approx(value, abs=1e-9), col
    assert got["was_profitable"] and got["hold_hours"] == 1

    reverse = pd.DataFrame([_legs(T0, ("x", "BTC/USDT:USDT"), ("x", "BTC/USDT"))])  # the long perp pays
    rev = simulate_positions(reverse, *paths, params).positions.iloc[0]
    assert rev["total_funding_usd"] == pytest.approx(-1e-3 * 100 * 195.0 * 0.5)  # qty of the perp is 50
    assert rev["funding_payments_count"] == 1


def test_no_liquidity_before_a_fill_is_a_gap() -> None:
    prices, funding = _hand_paths()
    late = {
        k: dataclasses.replace(v, liq_ts_ms=np.array([T0 + 30 * MINUTE_MS], dtype=np.int64))
        for k, v in prices.series.items()
    }
    params = SimulateParams(hold_hours=(1,))
    opps = pd.DataFrame([_legs(T0, ("x", "BTC/USDT"), ("x", "BTC/USDT:USDT"))])
    result = simulate_positions(opps, PricePaths(late), funding, params)
    assert result.positions.empty and result.dropped_gap == 1
    assert simulate_one(opps.iloc[0].to_dict(), 1, PricePaths(late), funding, params)["status"] == "dropped_gap"


# ---------------------------------------------------------------- vectorised == reference


def test_vectorised_matches_reference_on_a_random_sample(
    opportunities: pd.DataFrame, paths: Paths, sim_params: SimulateParams
) -> None:
    result = simulate_positions(opportunities, *paths, sim_params)
    assert list(result.positions.columns) == [*opportunities.columns, *OUTPUT_COLUMNS]
    n_total = len(opportunities) * len(sim_params.hold_hours)
    assert len(result.positions) + result.dropped_past_data + result.dropped_gap == n_total
    rng = np.random.default_rng(42)
    flat = rng.choice(n_total, 260, replace=False)
    pairs = [
        (int(i) // len(sim_params.hold_hours), sim_params.hold_hours[int(i) % len(sim_params.hold_hours)]) for i in flat
    ]
    statuses = _check_against_reference(opportunities, result, paths, sim_params, pairs)
    assert statuses["ok"] >= 150
    assert statuses.get("dropped_past_data", 0) > 0
    assert result.positions["was_profitable"].any() and not result.positions["was_profitable"].all()
    assert (result.positions["max_drawdown_pct"] >= 0).all()
    assert np.isfinite(result.positions[VALUE_COLUMNS].to_numpy(np.float64)).all()


def test_chunking_does_not_change_results(
    opportunities: pd.DataFrame, paths: Paths, sim_params: SimulateParams
) -> None:
    sample = opportunities.iloc[::7].reset_index(drop=True)
    whole = simulate_positions(sample, *paths, sim_params)
    chunked = simulate_positions(sample, *paths, dataclasses.replace(sim_params, chunk_positions=7))
    pd.testing.assert_frame_equal(whole.positions, chunked.positions)
    assert (whole.dropped_past_data, whole.dropped_gap) == (chunked.dropped_past_data, chunked.dropped_gap)


# ---------------------------------------------------------------- boundaries

SPOT_PERP_BINANCE = (("binance", "BTC/USDT"), ("binance", "BTC/USDT:USDT"))
SPOT_PERP_BYBIT_ETH = (("bybit", "ETH/USDT"), ("bybit", "ETH/USDT:USDT"))
SETTLE = START_MS + 24 * HOUR_MS  # a binance settlement (stamped 17 ms later, rounded to the minute)


@pytest.mark.parametrize(
    ("entry_ms", "hold", "count"),
    [
        (SETTLE, 1, 0),  # a payment exactly at entry is not received
        (SETTLE, 8, 1),  # ... one exactly at exit is
        (SETTLE - 5 * MINUTE_MS, 1, 1),
        (SETTLE + 5 * MINUTE_MS, 8, 1),
        (SETTLE + 5 * MINUTE_MS, 7, 0),
        (SETTLE, 24, 3),
    ],
)
def test_funding_boundaries(paths: Paths, entry_ms: int, hold: int, count: int) -> None:
    params = SimulateParams(hold_hours=(hold,))
    opps = pd.DataFrame([_legs(entry_ms, *SPOT_PERP_BINANCE)])
    result = simulate_positions(opps, *paths, params)
    assert result.positions["funding_payments_count"].tolist() == [count]
    statuses = _check_against_reference(opps, result, paths, params, [(0, hold)])
    assert statuses == {"ok": 1}
    if count == 0:
        assert result.positions["total_funding_usd"].iloc[0] == 0.0


def test_gap_rules(paths: Paths) -> None:
    params = SimulateParams(hold_hours=(2, 4))
    opps = pd.DataFrame(
        [
            _legs(GAP_START_MS - HOUR_MS, *SPOT_PERP_BYBIT_ETH),  # 2 h: exit inside the hole; 4 h: crosses it
            _legs(GAP_START_MS + HOUR_MS, *SPOT_PERP_BYBIT_ETH),  # entry inside the hole
        ]
    )
    result = simulate_positions(opps, *paths, params)
    assert result.dropped_gap == 3 and result.dropped_past_data == 0
    kept = result.positions
    assert kept[["ts_ms", "hold_hours"]].values.tolist() == [[GAP_START_MS - HOUR_MS, 4]]
    statuses = _check_against_reference(opps, result, paths, params, [(0, 2), (0, 4), (1, 2), (1, 4)])
    assert statuses == {"ok": 1, "dropped_gap": 3}


def test_exit_past_the_data_is_dropped_not_truncated(frames: MarketFrames, paths: Paths) -> None:
    last_close = START_MS + 4 * 86_400_000
    params = SimulateParams(hold_hours=(1, 24))
    opps = pd.DataFrame(
        [_legs(last_close - 2 * HOUR_MS, *SPOT_PERP_BINANCE), _legs(last_close - HOUR_MS, *SPOT_PERP_BINANCE)]
    )
    result = simulate_positions(opps, *paths, params)
    assert result.dropped_past_data == 2 and result.dropped_gap == 0
    assert result.positions["hold_hours"].tolist() == [1, 1]  # exit exactly at the last close is fine
    _check_against_reference(opps, result, paths, params, [(0, 1), (0, 24), (1, 1), (1, 24)])
    # Funding history ending early (last settlement at 48 h) is past the data after 48 h + one interval.
    cut = {k: (v[v["ts_ms"] < START_MS + 56 * HOUR_MS] if k[0] == "binance" else v) for k, v in frames.funding.items()}
    prices = paths[0]
    short_funding = build_funding_events(MarketFrames(frames.ohlcv, cut, frames.books), prices)
    late = pd.DataFrame([_legs(START_MS + 50 * HOUR_MS, *SPOT_PERP_BINANCE)])
    params = SimulateParams(hold_hours=(4, 8))
    res = simulate_positions(late, prices, short_funding, params)
    assert res.dropped_past_data == 1 and res.positions["hold_hours"].tolist() == [4]
    _check_against_reference(late, res, (prices, short_funding), params, [(0, 4), (0, 8)])


def test_bad_input(paths: Paths, opportunities: pd.DataFrame) -> None:
    params = SimulateParams()
    empty = simulate_positions(opportunities.iloc[:0], *paths, params)
    assert empty.positions.empty and list(empty.positions.columns) == [*opportunities.columns, *OUTPUT_COLUMNS]
    with pytest.raises(DataValidationError, match="not on the 5-minute grid"):
        simulate_positions(pd.DataFrame([_legs(START_MS + 60_000, *SPOT_PERP_BINANCE)]), *paths, params)
    with pytest.raises(DataValidationError, match="missing columns"):
        simulate_positions(opportunities.drop(columns=["long_symbol"]), *paths, params)
    with pytest.raises(DataValidationError, match="no price path for okx"):
        simulate_positions(pd.DataFrame([_legs(START_MS, ("okx", "BTC/USDT"), SPOT_PERP_BINANCE[1])]), *paths, params)


# ---------------------------------------------------------------- real data: Binance XRP perpetual


def _real_xrp_store(root) -> ParquetStore:
    """binanceusdm XRP perp (real 5m candles, real funding + 8h mark) and a derived perp-only venue.

    The derived venue ("derived") trades the same candles 5 bps higher and pays a quarter of the real
    funding rate, so the cross-exchange spread is 0.75 x the real rate. Neither venue has spot.
    """
    paths = [
        DATA_DIR / "binance_usdm_xrpusdt_5m_20211115-20211121.feather",
        DATA_DIR / "binance_usdm_xrpusdt_markprice_8h_20211118-20211218.feather",
        DATA_DIR / "funding_rates_binance_8h.csv",
    ]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"real data not found in {DATA_DIR}: {missing}")
    candles = pd.read_feather(paths[0])
    bars = pd.DataFrame({"ts_ms": candles["date"].astype("datetime64[ms, UTC]").astype(np.int64)})
    for col in ("open", "high", "low", "close", "volume"):
        bars[col] = candles[col].astype(np.float64)
    marks = pd.read_feather(paths[1])
    mark_by_ms = dict(
        zip(marks["date"].astype("datetime64[ms, UTC]").astype(np.int64), marks["open"].astype(float), strict=True)
    )
    rates = pd.read_csv(paths[2])
    rates = rates[(rates["exchange"] == "binance_usdm") & (rates["symbol"] == "XRPUSDT")]
    ts = rates["funding_time_ms"].astype(np.int64).to_numpy()
    mark = np.array([mark_by_ms.get(int(t) // HOUR_MS * HOUR_MS, np.nan) for t in ts])
    funding = pd.DataFrame({"ts_ms": ts, "funding_rate": rates["funding_rate"].to_numpy(float), "mark_price": mark})
    store = ParquetStore(root)
    sym = "XRP/USDT:USDT"
    store.write(DatasetKey("binanceusdm", sym, "ohlcv", "5m"), bars)
    store.write(DatasetKey("binanceusdm", sym, "funding"), funding)
    shifted = bars.copy()
    shifted[["open", "high", "low", "close"]] *= 1.0005
    store.write(DatasetKey("derived", sym, "ohlcv", "5m"), shifted)
    store.write(
        DatasetKey("derived", sym, "funding"),
        funding.assign(funding_rate=funding["funding_rate"] * 0.25, mark_price=funding["mark_price"] * 1.0005),
    )
    return store


def test_real_binance_xrp_perpetual(tmp_path) -> None:
    store = _real_xrp_store(tmp_path)
    venues, bases = ("binanceusdm", "derived"), ("XRP",)
    snap_params = SnapshotParams(btc_base="XRP")  # no BTC in this data set: XRP is the regime reference
    snaps = build_snapshots(store, venues, bases, "USDT", snap_params, timeframe="5m")
    first_settlement = 1_637_193_600_000  # 2021-11-18 00:00 UTC
    assert snaps["ts_ms"].min() == first_settlement
    assert snaps["spot_price"].isna().all() and snaps["depth_is_proxy"].all()
    numeric = snaps.drop(
        columns=[
            "spot_symbol",
            "spot_price",
            "spot_volume_24h_usd",
            "spot_bid_ask_spread_pct",
            "spot_orderbook_depth_usd",
        ]
    )
    assert np.isfinite(numeric.select_dtypes("number").to_numpy(np.float64)).all()

    sim = SimulateParams(hold_hours=(1, 8, 24))
    opps = detect_opportunities(snaps, OpportunityParams(), sim)
    assert set(opps["strategy"]) == {"cross_exchange"}  # perps only
    assert (opps["long_exchange"] == "derived").all()  # it pays a quarter of the (mostly positive) rate
    frames = load_market_frames(store, venues, bases, "USDT", timeframe="5m")
    prices = build_price_paths(frames, snaps)
    funding = build_funding_events(frames, prices)
    result = simulate_positions(opps, prices, funding, sim)
    pos = result.positions
    assert len(pos) > 1000 and result.dropped_past_data > 0 and result.dropped_gap == 0
    assert np.isfinite(pos[VALUE_COLUMNS].to_numpy(np.float64)).all()
    counts = pos.groupby("hold_hours")["funding_payments_count"].agg(["min", "max"])
    assert counts.loc[24].tolist() == [3, 3] and counts.loc[8].tolist() == [1, 1]
    assert counts.loc[1, "max"] == 1 and counts.loc[1, "min"] == 0
    last_close = int(frames.ohlcv[("binanceusdm", "XRP/USDT:USDT")]["ts_ms"].max()) + 5 * MINUTE_MS
    assert (pos["ts_ms"] + pos["hold_hours"] * HOUR_MS <= last_close).all()
    rng = np.random.default_rng(1)
    pairs = [(int(i), int(h)) for i, h in zip(rng.choice(len(opps), 40), rng.choice([1, 8, 24], 40), strict=True)]
    statuses = _check_against_reference(opps, result, (prices, funding), sim, pairs)
    assert statuses.get("ok", 0) > 20
