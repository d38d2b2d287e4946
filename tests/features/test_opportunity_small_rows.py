"""The small-row path of feature_matrix: the same bits as the NumPy path, and the same errors.

``feature_matrix`` computes up to ``SMALL_ROWS`` rows on Python floats (the API and the edge runner score
one entry at the 9 holds of the grid). These tests compare it bit for bit with ``_numpy_feature_matrix``
(the vectorised reference, and the path of the training features) on random rows full of degenerate
values, on the generated positions and on the pipeline's stored positions when present, and check that
every case it cannot reproduce exactly is handed to the NumPy path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import DataValidationError
from cryptoml.features import opportunity as feat
from cryptoml.features.opportunity import FEATURE_NAMES, INPUT_COLUMNS, feature_matrix
from tests.models.conftest import make_positions

# The extreme inputs overflow inside the NumPy reference path, which says so; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
MONDAY_MIDNIGHT_MS = 1_704_067_200_000  # 2024-01-01T00:00Z, a Monday
GRID_HOURS = (1.0, 4.0, 8.0, 12.0, 24.0, 48.0, 72.0, 120.0, 168.0)
STORED_POSITIONS = Path(__file__).resolve().parents[2] / "data" / "positions.parquet"
# Values that hit every branch: NaN/inf fills, negatives, signed zeros, overflow, subnormals, caps.
SPECIAL = (np.nan, np.inf, -np.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, -5e-324, 1.0, 1000.0, 10.0, -1.0)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64).view(np.int64)


def _outcome(fn: Any, cols: dict[str, Any]) -> np.ndarray | str:
    try:
        return fn(cols)  # type: ignore[no-any-return]
    except Exception as e:  # DataValidationError, or NumPy's own error for a shape it cannot broadcast
        return f"{type(e).__name__}: {e}"


def assert_same_as_numpy_path(cols: dict[str, Any]) -> None:
    """feature_matrix(cols) and the NumPy path agree bit for bit, or raise the same error."""
    got, want = _outcome(feature_matrix, cols), _outcome(feat._numpy_feature_matrix, cols)
    if isinstance(want, str) or isinstance(got, str):
        assert got == want
        return
    assert got.shape == want.shape and got.dtype == want.dtype == np.float64
    assert got.flags.c_contiguous
    differ = np.argwhere(_bits(got) != _bits(want))
    assert differ.size == 0, [(int(i), FEATURE_NAMES[j], got[i, j], want[i, j]) for i, j in differ[:5]]


def _row(**overrides: object) -> dict[str, Any]:
    row: dict[str, Any] = {
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
        "depth_is_proxy": 0.0,
        "next_funding_ts_ms": MONDAY_MIDNIGHT_MS + 8 * 3_600_000,
        "btc_ret_trailing": 0.04,
    }
    row.update(overrides)
    return row


def _frame_columns(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Columns as :func:`opportunity_features` converts a table."""
    return {
        c: table[c].astype(str).to_numpy() if c in ("strategy", "regime") else table[c].to_numpy(dtype=np.float64)
        for c in INPUT_COLUMNS
    }


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Columns as the API builds them: float64 arrays, labels as object arrays of str."""
    return {
        c: np.asarray([r[c] for r in rows], dtype=object if c in ("strategy", "regime") else np.float64)
        for c in INPUT_COLUMNS
    }


def _random_columns(rng: np.random.Generator, n: int, special: float) -> dict[str, Any]:
    def noisy(base: float, scale: float) -> np.ndarray:
        x = base + scale * rng.standard_normal(n)
        hit = rng.uniform(size=n) < special
        x[hit] = rng.choice(SPECIAL, int(hit.sum()))
        return x

    ts = (MONDAY_MIDNIGHT_MS + rng.integers(-(10**11), 10**11, n)).astype(np.float64)
    next_f = ts + rng.integers(-3_600_000, 30 * 3_600_000, n)
    next_f = np.where(rng.uniform(size=n) < special, rng.choice(SPECIAL, n), next_f)
    return {
        "ts_ms": ts,
        "hold_hours": rng.choice([*GRID_HOURS, 0.5, 1e-3, 1e300], n),
        "strategy": np.asarray(rng.choice(feat.STRATEGIES, n), dtype=object),
        "regime": np.asarray(rng.choice(feat.REGIMES, n), dtype=object),
        "fund_apr": rng.normal(30.0, 40.0, n),
        "fund_profit_8h": rng.normal(0.03, 0.05, n),
        "break_even_hours": noisy(40.0, 400.0),
        "funding_spread": rng.normal(0.0, 5e-4, n),
        "funding_spread_avg_24h": noisy(0.0, 5e-4),
        "funding_spread_avg_3d": noisy(0.0, 5e-4),
        "spread_volatility_cv": noisy(1.0, 4.0),
        "ret_vol_24h": noisy(1e-3, 1e-3),
        "volume_24h": noisy(1e7, 1e8) * rng.choice([1.0, -1.0, 1e-7], n),
        "orderbook_depth_usd": noisy(1e6, 3e6),
        "bid_ask_spread_pct": noisy(0.05, 0.1),
        "depth_is_proxy": noisy(0.0, 1.0).round(),
        "next_funding_ts_ms": next_f,
        "btc_ret_trailing": noisy(0.0, 0.03),
    }


def _as_grid(cols: dict[str, Any], n: int) -> dict[str, Any]:
    """The first entry of ``cols`` at ``n`` holds (rows repeat, as the API builds the hold grid)."""
    return {c: (v[:n] if c == "hold_hours" else np.repeat(v[:1], n)) for c, v in cols.items()}


@pytest.mark.parametrize("seed", range(4))
def test_random_rows_match_the_numpy_path_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    small_used = 0
    for _ in range(300):
        n = int(rng.integers(1, 20))
        cols = _random_columns(rng, n, special=float(rng.choice([0.0, 0.1, 0.4])))
        if rng.uniform() < 0.5:
            cols = _as_grid(cols, n)
        assert_same_as_numpy_path(cols)
        small_used += feat._small_feature_matrix(cols) is not None
    assert small_used > 150  # the comparison exercised the small path, not only its fallback


def test_generated_positions_match_in_grid_chunks() -> None:
    cols = _frame_columns(make_positions(days=2.0, presence=0.1))
    whole = feat._numpy_feature_matrix(cols)
    for start in range(0, min(len(whole), 2000), 9):  # consecutive rows: a few entries x their holds
        chunk = {c: v[start : start + 9] for c, v in cols.items()}
        small = feat._small_feature_matrix(chunk)
        assert small is not None
        assert (_bits(small) == _bits(whole[start : start + 9])).all()


def test_stored_pipeline_positions_match() -> None:
    if not STORED_POSITIONS.is_file():
        pytest.skip(f"{STORED_POSITIONS} not present (a dvc repro output)")
    positions = pd.read_parquet(STORED_POSITIONS, columns=[*INPUT_COLUMNS, "opportunity_id"])
    ts, opportunity = positions["ts_ms"].to_numpy(), positions["opportunity_id"].to_numpy()
    # one entry snapshot = its consecutive rows (one per simulated hold), as the API scores it
    starts = np.flatnonzero(np.r_[True, (ts[1:] != ts[:-1]) | (opportunity[1:] != opportunity[:-1])])
    ends = np.r_[starts[1:], len(positions)]
    cols = _frame_columns(positions)
    rng = np.random.default_rng(0)
    for b in rng.choice(len(starts), size=min(400, len(starts)), replace=False):
        block = {c: v[starts[b] : ends[b]] for c, v in cols.items()}
        assert feat._small_feature_matrix(block) is not None
        assert_same_as_numpy_path(block)


def test_every_documented_degenerate_value_on_the_small_path() -> None:
    rows = [
        _row(volume_24h=0.0, orderbook_depth_usd=0.0, bid_ask_spread_pct=0.0),
        _row(break_even_hours=np.nan, spread_volatility_cv=np.nan, funding_spread_avg_24h=np.nan,
             funding_spread_avg_3d=np.nan, ret_vol_24h=np.nan, volume_24h=np.nan, orderbook_depth_usd=np.nan,
             bid_ask_spread_pct=np.nan, depth_is_proxy=np.nan, next_funding_ts_ms=np.nan, btc_ret_trailing=np.nan),
        _row(break_even_hours=np.inf, spread_volatility_cv=np.inf, volume_24h=-5.0, orderbook_depth_usd=-1.0,
             ret_vol_24h=-1.0, bid_ask_spread_pct=-0.5, next_funding_ts_ms=MONDAY_MIDNIGHT_MS - 1),
        _row(break_even_hours=-3.0, spread_volatility_cv=-0.5),
        _row(break_even_hours=1e6, spread_volatility_cv=50.0, next_funding_ts_ms=MONDAY_MIDNIGHT_MS + 10**9),
        _row(funding_spread_avg_24h=5e-4),  # momentum 24 h of exactly 0 -> trend 0
        _row(funding_spread_avg_24h=6e-4),  # momenta of opposite signs -> trend 0
        _row(funding_spread=-5e-4, funding_spread_avg_24h=-4e-4, funding_spread_avg_3d=-3e-4),  # both falling
    ]  # fmt: skip
    cols = _columns(rows)
    small = feat._small_feature_matrix(cols)
    assert small is not None
    assert_same_as_numpy_path(cols)
    X = pd.DataFrame(small, columns=list(FEATURE_NAMES))
    zero, nan, inf_neg, negative, capped, flat24, disagree, falling = (X.iloc[i] for i in range(len(rows)))
    for r in (zero, nan, inf_neg):
        assert r["log_depth_usd"] == 0.0 and r["liquidity_score"] == 0.0 and r["profit_x_liquidity"] == 0.0
        assert r["volume_adequacy"] == -6.0
    for r in (nan, inf_neg, negative, capped):
        assert r["break_even_hours"] == feat.BREAK_EVEN_CAP_HOURS
        assert r["spread_volatility_cv"] == feat.CV_CAP and r["rate_stability"] == 1.0 / 11.0
    assert nan["momentum_24h_bps"] == 0.0 and nan["momentum_3d_bps"] == 0.0 and nan["trend_score_bps"] == 0.0
    assert nan["spread_avg_24h_bps"] == nan["funding_spread_bps"] == nan["spread_avg_3d_bps"]
    assert nan["price_vol_daily_pct"] == 0.0 and inf_neg["price_vol_daily_pct"] == 0.0
    assert nan["bid_ask_spread_pct"] == 0.0 and inf_neg["bid_ask_spread_pct"] == 0.0
    assert nan["depth_is_proxy"] == 1.0 and nan["btc_ret_trailing"] == 0.0
    assert nan["hours_to_next_funding"] == 0.0 and inf_neg["hours_to_next_funding"] == 0.0
    assert capped["hours_to_next_funding"] == feat.NEXT_FUNDING_CAP_HOURS
    assert nan["volatility_risk"] == feat.CV_CAP  # 0 price volatility + the capped cv
    assert nan["risk_adjusted_apr"] == 54.75 / (1.0 + feat.CV_CAP)
    assert flat24["momentum_24h_bps"] == 0.0 and flat24["trend_score_bps"] == 0.0
    assert disagree["trend_score_bps"] == 0.0
    assert falling["trend_score_bps"] == falling["momentum_24h_bps"] < 0  # the smaller magnitude, negative


@pytest.mark.parametrize(
    "override",
    [
        {"bid_ask_spread_pct": -0.0},  # np.maximum(-0.0, 0.0) picks the zero
        {"ts_ms": 0.0, "next_funding_ts_ms": -0.0},  # (next - ts) / 3.6e6 = -0.0 before the clip
    ],
)
def test_signed_zero_cases_go_to_the_numpy_path(override: dict[str, float]) -> None:
    cols = _columns([_row(**override)])
    assert feat._small_feature_matrix(cols) is None
    assert_same_as_numpy_path(cols)


def test_rows_that_differ_only_by_a_zero_sign_are_not_merged() -> None:
    rows = [_row(ret_vol_24h=0.0), _row(ret_vol_24h=-0.0), _row(btc_ret_trailing=-0.0), _row(btc_ret_trailing=0.0)]
    cols = _columns(rows + rows)
    small = feat._small_feature_matrix(cols)
    assert small is not None
    assert_same_as_numpy_path(cols)
    j = FEATURE_NAMES.index("price_vol_daily_pct")
    assert np.signbit(small[[0, 1], j]).tolist() == [False, True]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"regime": "Sideways"}, "Sideways"),
        ({"strategy": "triangular"}, "triangular"),
        ({"fund_apr": np.nan}, "fund_apr"),
        ({"fund_profit_8h": -np.inf}, "fund_profit_8h"),
        ({"funding_spread": np.inf}, "funding_spread"),
        ({"ts_ms": np.nan}, "ts_ms"),
        ({"hold_hours": 0.0}, "hold_hours"),
        ({"hold_hours": -1.0}, "hold_hours"),
        ({"hold_hours": np.nan}, "hold_hours"),
        ({"funding_spread_avg_24h": -1e308, "funding_spread": 1e308}, "momentum_24h_bps"),  # overflow to inf
        ({"fund_profit_8h": 1e308, "hold_hours": 168.0}, "projected_funding_pct"),
    ],
)
def test_errors_are_the_numpy_paths(override: dict[str, object], match: str) -> None:
    for rows in ([_row(**override)], [_row(), _row(**override)], [_row(**override)] * 3):
        cols = _columns(rows)
        assert feat._small_feature_matrix(cols) is None
        with pytest.raises(DataValidationError, match=match):
            feature_matrix(cols)
        assert_same_as_numpy_path(cols)


def test_input_forms_match() -> None:
    rows = [_row(hold_hours=h, ts_ms=MONDAY_MIDNIGHT_MS + 3_600_000 * i) for i, h in enumerate(GRID_HOURS)]
    base = _columns(rows)
    forms: list[dict[str, Any]] = [
        {c: list(v) for c, v in base.items()},  # plain lists (floats, str)
        {c: v.tolist() if v.dtype != object else tuple(v) for c, v in base.items()},  # tuples of labels
        {**base, "depth_is_proxy": [False] * 9, "hold_hours": [int(h) if h >= 1 else h for h in GRID_HOURS]},
        {**base, "btc_ret_trailing": [None] * 9, "volume_24h": base["volume_24h"].astype(np.float32)},
        {**base, "depth_is_proxy": [None] * 9},  # None -> NaN -> the documented 1.0
        {**base, "strategy": np.asarray(base["strategy"], dtype=str), "regime": np.asarray(base["regime"], dtype=str)},
        {**base, "fund_apr": [str(x) for x in base["fund_apr"]]},  # numeric strings convert as np.asarray does
    ]
    for cols in forms:
        assert feat._small_feature_matrix(cols) is not None
        assert_same_as_numpy_path(cols)


def test_shapes_the_small_path_leaves_to_numpy() -> None:
    base = _columns([_row(), _row(hold_hours=48.0)])
    broadcast = {**base, "fund_apr": base["fund_apr"][:1]}  # a length-1 column broadcasts in NumPy
    scalar = {**base, "btc_ret_trailing": 0.01}
    two_d = {**base, "volume_24h": base["volume_24h"][:, None]}
    empty = {c: v[:0] for c, v in base.items()}
    missing = {c: v for c, v in base.items() if c != "regime"}
    bad_labels = {**base, "regime": np.asarray([1.0, 2.0])}
    for cols in (broadcast, scalar, two_d, empty, missing, bad_labels):
        assert feat._small_feature_matrix(cols) is None
        assert_same_as_numpy_path(cols)


def test_limits_of_the_small_path() -> None:
    entries = [_row(ts_ms=MONDAY_MIDNIGHT_MS + 60_000 * i) for i in range(feat.SMALL_ENTRIES + 1)]
    assert feat._small_feature_matrix(_columns(entries[:-1])) is not None
    assert feat._small_feature_matrix(_columns(entries)) is None  # one entry too many
    grid = [_row(hold_hours=float(h)) for h in range(1, feat.SMALL_ROWS + 2)]
    assert feat._small_feature_matrix(_columns(grid[:-1])) is not None
    assert feat._small_feature_matrix(_columns(grid)) is None  # one row too many
    for cols in (_columns(entries), _columns(grid)):
        assert_same_as_numpy_path(cols)
