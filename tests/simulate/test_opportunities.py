"""Opportunity detection: directions, formulas on hand-made snapshots, thresholds and the rolling CV."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cryptoml.config import OpportunityParams, SimulateParams
from cryptoml.errors import DataValidationError
from cryptoml.simulate.opportunities import (
    BREAK_EVEN_CAP_HOURS,
    CV_CAP,
    OPPORTUNITY_COLUMNS,
    detect_opportunities,
    rolling_cv,
)
from cryptoml.simulate.snapshots import SNAPSHOT_COLUMNS

TS = 1_704_096_000_000
LOOSE = OpportunityParams(min_fund_apr_pct=-1e9, min_volume_24h_usd=0, max_bid_ask_spread_pct=1e9, min_depth_usd=0)


def _snap(exchange: str, base: str = "BTC", **values: object) -> dict:
    row: dict = {
        "ts_ms": TS, "exchange": exchange, "base": base, "spot_symbol": f"{base}/USDT",
        "perp_symbol": f"{base}/USDT:USDT", "spot_price": 100.0, "perp_price": 100.1, "funding_rate": 1e-4,
        "next_funding_ts_ms": TS + 8 * 3_600_000, "funding_avg_24h": 2e-4, "funding_avg_3d": 3e-4,
        "funding_interval_hours": 8.0, "volume_24h_usd": 5e6, "spot_volume_24h_usd": 4e6,
        "bid_ask_spread_pct": 0.02, "spot_bid_ask_spread_pct": 0.03, "orderbook_depth_usd": 300_000.0,
        "spot_orderbook_depth_usd": 200_000.0, "depth_is_proxy": False, "ret_vol_24h": 5e-4,
        "btc_price": 40_000.0, "btc_volume_24h_usd": 1e9, "btc_ret_trailing": 0.01, "regime": "Ranging",
    }  # fmt: skip
    row.update(values)
    return row


def _frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=SNAPSHOT_COLUMNS)


def test_spot_perp_formulas() -> None:
    sim = SimulateParams()
    opps = detect_opportunities(_frame(_snap("binance", funding_rate=1e-4)), LOOSE, sim)
    assert list(opps.columns) == OPPORTUNITY_COLUMNS
    assert len(opps) == 1
    o = opps.iloc[0]
    assert o["opportunity_id"] == "spot_perp:BTC:binance-spot:binance-swap"
    assert (o["long_market"], o["long_symbol"], o["short_market"], o["short_symbol"]) == (
        "spot", "BTC/USDT", "swap", "BTC/USDT:USDT",
    )  # fmt: skip
    assert (o["long_price"], o["short_price"]) == (100.0, 100.1)
    assert (o["funding_rate_long"], o["funding_rate_short"], o["funding_spread"]) == (0.0, 1e-4, 1e-4)
    assert o["fund_profit_8h"] == pytest.approx(0.01)
    assert o["fund_apr"] == pytest.approx(0.01 * 3 * 365)
    assert o["fund_profit_24h_proj"] == pytest.approx(0.03)
    assert o["fund_profit_3d_proj"] == pytest.approx(0.09)
    assert o["funding_spread_avg_24h"] == pytest.approx(2e-4)
    assert o["funding_spread_avg_3d"] == pytest.approx(3e-4)
    assert o["volume_24h"] == 4e6 and o["orderbook_depth_usd"] == 200_000.0
    assert o["bid_ask_spread_pct"] == pytest.approx(0.05)
    assert o["liquidity_status"] == "medium"
    # Costs: 4 fees of 4 bps + slippage (half spread x tier multiplier; 10k / 200k = 0.05 -> 2.5, 10k / 300k -> 1.5).
    cost = 4 * 4e-4 + 2 * (0.03 / 100 / 2 * 2.5) + 2 * (0.02 / 100 / 2 * 1.5)
    assert o["break_even_hours"] == pytest.approx(cost / (1e-4 / 8))
    assert o["spread_volatility_cv"] == 0.0  # a single observation does not vary
    assert o["next_funding_ts_ms"] == TS + 8 * 3_600_000 and o["regime"] == "Ranging"


def test_negative_funding_needs_short_spot() -> None:
    snaps = _frame(_snap("binance", funding_rate=-2e-4, funding_avg_24h=-1e-4))
    assert detect_opportunities(snaps, LOOSE, SimulateParams()).empty
    opps = detect_opportunities(snaps, dataclasses.replace(LOOSE, allow_short_spot=True), SimulateParams())
    o = opps.iloc[0]
    assert o["opportunity_id"] == "spot_perp:BTC:binance-swap:binance-spot"
    assert (o["long_market"], o["short_market"]) == ("swap", "spot")
    assert (o["funding_rate_long"], o["funding_rate_short"]) == (-2e-4, 0.0)
    assert o["funding_spread"] == pytest.approx(2e-4)
    assert o["funding_spread_avg_24h"] == pytest.approx(1e-4)
    assert (o["long_price"], o["short_price"]) == (100.1, 100.0)


def test_cross_exchange_longs_the_lower_rate() -> None:
    params = dataclasses.replace(LOOSE, strategies=("cross_exchange",))
    snaps = _frame(
        _snap("bybit", funding_rate=3e-4, perp_price=101.0, orderbook_depth_usd=1e6, depth_is_proxy=True),
        _snap("binance", funding_rate=-1e-4, ret_vol_24h=9e-4, next_funding_ts_ms=TS + 3_600_000),
        _snap("okx", spot_price=np.nan, funding_rate=3e-4, funding_interval_hours=4.0),  # perp only, 4 h
    )
    opps = detect_opportunities(snaps, params, SimulateParams()).set_index("opportunity_id")
    assert sorted(opps.index) == [
        "cross_exchange:BTC:binance-swap:bybit-swap",
        "cross_exchange:BTC:binance-swap:okx-swap",
        "cross_exchange:BTC:bybit-swap:okx-swap",  # okx pays 6e-4 per 8 h
    ]
    o = opps.loc["cross_exchange:BTC:binance-swap:bybit-swap"]
    assert o["funding_spread"] == pytest.approx(4e-4)
    assert (o["long_price"], o["short_price"]) == (100.1, 101.0)
    assert o["orderbook_depth_usd"] == 300_000.0 and o["liquidity_status"] == "high"
    assert o["depth_is_proxy"] and o["ret_vol_24h"] == 9e-4 and o["next_funding_ts_ms"] == TS + 3_600_000
    assert opps.loc["cross_exchange:BTC:bybit-swap:okx-swap", "funding_rate_short"] == pytest.approx(6e-4)


def test_break_even_is_capped_without_income() -> None:
    params = dataclasses.replace(LOOSE, strategies=("cross_exchange",))
    snaps = _frame(_snap("a", funding_rate=1e-4), _snap("b", funding_rate=1e-4))
    o = detect_opportunities(snaps, params, SimulateParams()).iloc[0]
    assert o["funding_spread"] == 0.0
    assert o["break_even_hours"] == BREAK_EVEN_CAP_HOURS
    assert o["opportunity_id"] == "cross_exchange:BTC:a-swap:b-swap"  # tie: the first name is long


@pytest.mark.parametrize(
    ("field", "value", "kept"),
    [
        ("funding_rate", 4.5e-5, False),  # APR 4.93 % < 5 %
        ("funding_rate", 4.6e-5, True),
        ("spot_volume_24h_usd", 999_999.0, False),
        ("spot_volume_24h_usd", 1_000_000.0, True),
        ("spot_bid_ask_spread_pct", 0.49, False),  # 0.49 + 0.02 > 0.5
        ("spot_bid_ask_spread_pct", 0.48, True),
        ("spot_orderbook_depth_usd", 9_999.0, False),
        ("spot_orderbook_depth_usd", 10_000.0, True),
    ],
)
def test_thresholds(field: str, value: float, kept: bool) -> None:
    params = OpportunityParams(strategies=("spot_perp",))
    opps = detect_opportunities(_frame(_snap("binance", **{field: value})), params, SimulateParams())
    assert len(opps) == int(kept)


@pytest.mark.parametrize(
    ("depth", "status"), [(250_000.0, "high"), (249_999.0, "medium"), (50_000.0, "medium"), (49_999.0, "low")]
)
def test_liquidity_status_boundaries(depth: float, status: str) -> None:
    snaps = _frame(_snap("binance", spot_orderbook_depth_usd=depth, orderbook_depth_usd=1e9))
    assert detect_opportunities(snaps, LOOSE, SimulateParams()).iloc[0]["liquidity_status"] == status


def test_rolling_cv_against_a_plain_loop() -> None:
    rng = np.random.default_rng(5)
    n = 400
    keys = rng.choice(["a", "b", "c"], n)
    ts = np.sort(rng.integers(0, 10 * 86_400_000, n)).astype(np.int64)
    values = rng.normal(1e-4, 5e-5, n)
    got = rolling_cv(keys, ts, values)
    for i in range(n):
        window = values[(keys == keys[i]) & (ts > ts[i] - 3 * 86_400_000) & (ts <= ts[i])]
        assert got[i] == pytest.approx(np.std(window) / abs(np.mean(window)), rel=1e-6)
    flat = rolling_cv(np.array(["x"] * 3), np.array([1, 2, 3]), np.array([2e-4, 2e-4, 2e-4]))
    assert (flat == 0.0).all()
    zero_mean = rolling_cv(np.array(["x"] * 2), np.array([1, 2]), np.array([1e-4, -1e-4]))
    assert zero_mean[1] == CV_CAP


def test_detection_on_the_test_market(snapshots: pd.DataFrame, opportunities: pd.DataFrame) -> None:
    p = OpportunityParams()
    assert list(opportunities.columns) == OPPORTUNITY_COLUMNS
    assert not opportunities.duplicated(["ts_ms", "opportunity_id"]).any()
    assert set(opportunities["strategy"]) == {"spot_perp", "cross_exchange"}
    assert (opportunities["fund_apr"] >= p.min_fund_apr_pct).all()
    assert (opportunities["volume_24h"] >= p.min_volume_24h_usd).all()
    assert (opportunities["bid_ask_spread_pct"] <= p.max_bid_ask_spread_pct).all()
    assert (opportunities["orderbook_depth_usd"] >= p.min_depth_usd).all()
    np.testing.assert_allclose(
        opportunities["funding_spread"], opportunities["funding_rate_short"] - opportunities["funding_rate_long"]
    )
    assert opportunities["ts_ms"].is_monotonic_increasing
    assert set(opportunities["ts_ms"]) <= set(snapshots["ts_ms"])
    cross = opportunities[opportunities["strategy"] == "cross_exchange"]
    assert (cross["funding_rate_long"] <= cross["funding_rate_short"]).all()
    spot_short = opportunities[opportunities["short_market"] == "spot"]
    assert (spot_short["funding_rate_long"] < 0).all()
    assert (
        opportunities[list(OPPORTUNITY_COLUMNS[10:])].drop(columns=["regime", "liquidity_status"]).notna().all().all()
    )


def test_bad_input() -> None:
    with pytest.raises(DataValidationError, match="empty"):
        detect_opportunities(_frame(), LOOSE, SimulateParams())
    with pytest.raises(DataValidationError, match="missing columns"):
        detect_opportunities(_frame(_snap("binance")).drop(columns=["funding_rate"]), LOOSE, SimulateParams())
