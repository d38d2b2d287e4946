"""Opportunity features: documented order, no NaN/inf on degenerate rows, no look-ahead."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import DataValidationError
from cryptoml.features import opportunity as feat
from cryptoml.features.opportunity import (
    ENTRY_FEATURE_NAMES,
    FEATURE_NAMES,
    HOLD_FEATURES,
    INPUT_COLUMNS,
    feature_matrix,
    opportunity_features,
)
from tests.models.conftest import OUTCOME_COLUMNS, make_positions

MONDAY_MIDNIGHT_MS = 1_704_067_200_000  # 2024-01-01T00:00Z, a Monday


@pytest.fixture(scope="module")
def positions() -> pd.DataFrame:
    return make_positions(days=4.0, presence=0.05)


def _row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "ts_ms": MONDAY_MIDNIGHT_MS,
        "hold_hours": 24.0,
        "strategy": "spot_perp",
        "regime": "Bull",
        "fund_apr": 54.75,
        "fund_profit_8h": 0.05,
        "break_even_hours": 40.0,
        "funding_spread": 5e-4,
        "funding_spread_avg_24h": 4e-4,
        "funding_spread_avg_3d": 3e-4,
        "spread_volatility_cv": 1.0,
        "ret_vol_24h": 1e-3,
        "volume_24h": 1e7,
        "orderbook_depth_usd": 999_999.0,
        "bid_ask_spread_pct": 0.05,
        "depth_is_proxy": False,
        "next_funding_ts_ms": MONDAY_MIDNIGHT_MS + 8 * 3_600_000,
        "btc_ret_trailing": 0.04,
    }
    row.update(overrides)
    return row


def _features(*rows: dict[str, object]) -> pd.DataFrame:
    return opportunity_features(pd.DataFrame(list(rows)))


def test_columns_follow_feature_names_and_are_finite(positions: pd.DataFrame) -> None:
    X = opportunity_features(positions)
    assert tuple(X.columns) == FEATURE_NAMES
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert X.index.equals(positions.index)
    assert np.isfinite(X.to_numpy()).all()
    assert X.dtypes.eq(np.float64).all()


def test_module_doc_table_documents_every_feature() -> None:
    doc = feat.__doc__ or ""
    for name in FEATURE_NAMES:
        assert name in doc, name


def test_hand_computed_values() -> None:
    X = _features(_row()).iloc[0]
    assert X["momentum_24h_bps"] == pytest.approx(1.0)
    assert X["momentum_3d_bps"] == pytest.approx(2.0)
    assert X["trend_score_bps"] == pytest.approx(1.0)  # both rising: the smaller momentum
    assert X["rate_stability"] == pytest.approx(0.5)
    assert X["hold_minus_break_even_hours"] == pytest.approx(-16.0)
    assert X["projected_funding_pct"] == pytest.approx(0.15)
    assert X["volume_adequacy"] == pytest.approx(1.0)
    assert X["log_depth_usd"] == pytest.approx(6.0)
    assert X["liquidity_score"] == pytest.approx(0.5)  # depth at reference, spread at reference
    assert X["price_vol_daily_pct"] == pytest.approx(np.sqrt(1440) * 0.1)
    assert X["hours_to_next_funding"] == pytest.approx(8.0)
    assert (X["hour_sin"], X["hour_cos"]) == pytest.approx((0.0, 1.0))
    assert (X["weekday_sin"], X["weekday_cos"]) == pytest.approx((0.0, 1.0))  # Monday
    assert (X["strategy_spot_perp"], X["strategy_cross_exchange"]) == (1.0, 0.0)
    assert (X["regime_bull"], X["regime_bear"], X["regime_ranging"]) == (1.0, 0.0, 0.0)
    assert X["risk_adjusted_apr"] == pytest.approx(54.75 / (1 + X["volatility_risk"]))
    six_hours_later = _features(_row(ts_ms=MONDAY_MIDNIGHT_MS + 6 * 3_600_000)).iloc[0]
    assert (six_hours_later["hour_sin"], six_hours_later["hour_cos"]) == pytest.approx((1.0, 0.0), abs=1e-12)
    opposite = _features(_row(funding_spread_avg_24h=6e-4)).iloc[0]
    assert opposite["trend_score_bps"] == 0.0  # momenta disagree


def test_degenerate_rows_get_documented_values() -> None:
    rows = [
        _row(volume_24h=0.0, orderbook_depth_usd=0.0, bid_ask_spread_pct=0.0),
        _row(
            funding_spread=0.0,
            funding_spread_avg_24h=0.0,
            funding_spread_avg_3d=0.0,
            spread_volatility_cv=np.inf,
            break_even_hours=1e6,
            fund_apr=0.0,
            fund_profit_8h=0.0,
        ),
        _row(
            spread_volatility_cv=np.nan,
            break_even_hours=np.nan,
            funding_spread_avg_24h=np.nan,
            funding_spread_avg_3d=np.nan,
            ret_vol_24h=np.nan,
            volume_24h=np.nan,
            orderbook_depth_usd=np.nan,
            bid_ask_spread_pct=np.nan,
            next_funding_ts_ms=np.nan,
            btc_ret_trailing=np.nan,
            depth_is_proxy=None,
        ),
        _row(
            volume_24h=-5.0,
            orderbook_depth_usd=-1.0,
            spread_volatility_cv=-0.5,
            ret_vol_24h=-1.0,
            next_funding_ts_ms=MONDAY_MIDNIGHT_MS - 1,
        ),
    ]
    X = _features(*rows)
    assert np.isfinite(X.to_numpy()).all()
    zero_liq, zero_spread, all_nan, negative = (X.iloc[i] for i in range(4))
    assert zero_liq["volume_adequacy"] == -6.0
    assert zero_liq["log_depth_usd"] == 0.0
    assert zero_liq["liquidity_score"] == 0.0
    assert zero_liq["profit_x_liquidity"] == 0.0
    assert zero_spread["spread_volatility_cv"] == feat.CV_CAP
    assert zero_spread["rate_stability"] == pytest.approx(1 / 11)
    assert zero_spread["break_even_hours"] == feat.BREAK_EVEN_CAP_HOURS
    assert zero_spread["momentum_3d_bps"] == 0.0
    assert all_nan["momentum_24h_bps"] == 0.0 and all_nan["momentum_3d_bps"] == 0.0
    assert all_nan["break_even_hours"] == feat.BREAK_EVEN_CAP_HOURS
    assert all_nan["spread_volatility_cv"] == feat.CV_CAP
    assert all_nan["volume_adequacy"] == -6.0
    assert all_nan["depth_is_proxy"] == 1.0
    assert all_nan["hours_to_next_funding"] == 0.0
    assert all_nan["price_vol_daily_pct"] == 0.0
    assert negative["hours_to_next_funding"] == 0.0
    assert negative["spread_volatility_cv"] == feat.CV_CAP
    assert negative["log_depth_usd"] == 0.0


def test_no_look_ahead_outputs_and_unlisted_columns_are_never_read(positions: pd.DataFrame) -> None:
    base = opportunity_features(positions)
    changed = positions.copy()
    rng = np.random.default_rng(3)
    for col in OUTCOME_COLUMNS:
        changed[col] = rng.permutation(changed[col].to_numpy())
    for col in set(changed.columns) - set(INPUT_COLUMNS) - set(OUTCOME_COLUMNS):
        changed[col] = changed[col].to_numpy()[::-1]  # every column not on the whitelist scrambled
    pd.testing.assert_frame_equal(opportunity_features(changed), base)
    # ...and the whitelist alone is enough.
    pd.testing.assert_frame_equal(opportunity_features(positions[list(INPUT_COLUMNS)]), base)


@pytest.mark.parametrize("column", INPUT_COLUMNS)
def test_missing_whitelisted_column_is_named(column: str) -> None:
    frame = pd.DataFrame([_row()]).drop(columns=[column])
    with pytest.raises(DataValidationError, match=column):
        opportunity_features(frame)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"regime": "Sideways"}, "Sideways"),
        ({"strategy": "triangular"}, "triangular"),
        ({"fund_apr": np.nan}, "fund_apr"),
        ({"funding_spread": np.inf}, "funding_spread"),
        ({"hold_hours": 0.0}, "hold_hours"),
        ({"volume_24h": "lots"}, "volume_24h"),
    ],
)
def test_bad_values_raise_clear_errors(override: dict[str, object], match: str) -> None:
    with pytest.raises(DataValidationError, match=match):
        _features(_row(**override))


def test_feature_matrix_on_plain_arrays_matches_dataframe(positions: pd.DataFrame) -> None:
    cols = {c: positions[c].tolist() for c in INPUT_COLUMNS}
    np.testing.assert_array_equal(feature_matrix(cols), opportunity_features(positions).to_numpy())


def test_entry_features_do_not_depend_on_the_hold(positions: pd.DataFrame) -> None:
    assert set(HOLD_FEATURES) | set(ENTRY_FEATURE_NAMES) == set(FEATURE_NAMES)
    a = opportunity_features(positions.assign(hold_hours=1.0))
    b = opportunity_features(positions.assign(hold_hours=72.0))
    pd.testing.assert_frame_equal(a[list(ENTRY_FEATURE_NAMES)], b[list(ENTRY_FEATURE_NAMES)])
    assert not a["hold_hours"].equals(b["hold_hours"])


def test_feature_module_imports_without_pandas() -> None:
    code = (
        "import sys; import cryptoml.features.opportunity as f; "
        "assert 'pandas' not in sys.modules, 'pandas imported'; print(len(f.FEATURE_NAMES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(FEATURE_NAMES))
