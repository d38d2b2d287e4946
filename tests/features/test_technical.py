"""Technical features: batch == streaming on the real BTC month, warm-up, no look-ahead, hand values, state, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import DataValidationError
from cryptoml.features.streaming import StreamingFeatures
from cryptoml.features.technical import (
    MAX_STEP_MS,
    PRIMING_BARS,
    TECHNICAL_FEATURES,
    WARMUP_BARS,
    ema,
    rsi_wilder,
    technical_features,
)
from tests.conftest import ROOT, shared_file
from tests.support.stub_exchange import load_candles

BTC_1M_MONTH = "binance_spot_btcusdt_1m_20230417-20230517.parquet"
T0_MS = 1_700_000_040_000  # a minute boundary
MIN_MS = 60_000
PARITY_TOL = 1e-9


def random_walk(n: int, seed: int = 7, start_ms: int = T0_MS) -> pd.DataFrame:
    """Seeded 1m candles in the store schema: 0.01 ticks (so flat closes occur), some zero volumes."""
    rng = np.random.default_rng(seed)
    close = np.round(100 * np.exp(np.cumsum(rng.normal(0, 0.002, n))), 2)
    open_ = np.concatenate([[close[0]], close[:-1]])
    wick = np.round(np.abs(rng.normal(0, 0.1, n)), 2)
    volume = np.round(rng.gamma(2.0, 5.0, n), 3)
    volume[rng.random(n) < 0.05] = 0.0
    return pd.DataFrame(
        {
            "ts_ms": start_ms + MIN_MS * np.arange(n, dtype="int64"),
            "open": open_,
            "high": np.maximum(open_, close) + wick,
            "low": np.minimum(open_, close) - wick,
            "close": close,
            "volume": volume,
        }
    )


def stream(frame: pd.DataFrame) -> list[np.ndarray | None]:
    sf = StreamingFeatures()
    return [sf.update(r.ts_ms, r.open, r.high, r.low, r.close, r.volume) for r in frame.itertuples(index=False)]


def assert_parity(batch: pd.DataFrame, streamed: list[np.ndarray | None]) -> None:
    """Same warm-up rows; max |streaming - batch| over every feature and row <= 1e-9; finite once warm."""
    warm_streamed = np.array([row is None for row in streamed])
    np.testing.assert_array_equal(warm_streamed, batch["is_warmup"].to_numpy())
    assert batch.loc[batch["is_warmup"], list(TECHNICAL_FEATURES)].isna().all().all()
    values = batch.loc[~batch["is_warmup"], list(TECHNICAL_FEATURES)].to_numpy()
    assert np.isfinite(values).all()
    if len(values):
        worst = np.abs(np.vstack([row for row in streamed if row is not None]) - values).max()
        assert worst <= PARITY_TOL, worst


@pytest.fixture(scope="module")
def btc_month() -> pd.DataFrame:
    return load_candles(shared_file(BTC_1M_MONTH))


@pytest.fixture(scope="module")
def btc_batch(btc_month: pd.DataFrame) -> pd.DataFrame:
    return technical_features(btc_month)


def test_contract_names_and_columns() -> None:
    assert len(TECHNICAL_FEATURES) == 19 == len(set(TECHNICAL_FEATURES))
    assert isinstance(TECHNICAL_FEATURES, tuple) and WARMUP_BARS == 60
    out = technical_features(random_walk(100))
    assert list(out.columns) == [*TECHNICAL_FEATURES, "is_warmup"]
    assert out["is_warmup"].dtype == bool and (out[list(TECHNICAL_FEATURES)].dtypes == np.float64).all()


def test_streaming_equals_batch_on_real_btc_month(btc_month: pd.DataFrame, btc_batch: pd.DataFrame) -> None:
    assert len(btc_month) == 43_199
    pd.testing.assert_index_equal(btc_batch.index, btc_month.index)
    assert int(btc_batch["is_warmup"].sum()) == WARMUP_BARS and btc_batch["is_warmup"].iloc[:WARMUP_BARS].all()
    assert_parity(btc_batch, stream(btc_month))


def test_no_look_ahead(btc_month: pd.DataFrame, btc_batch: pd.DataFrame) -> None:
    """Changing every bar after t leaves the rows <= t bit-identical (and a prefix gives the same rows)."""
    t = 5_000
    changed = btc_month.copy()
    rng = np.random.default_rng(3)
    tail = changed.index > t
    scale = np.exp(rng.normal(0, 0.05, int(tail.sum())))
    for col in ("open", "high", "low", "close"):
        changed.loc[tail, col] *= scale
    changed.loc[tail, "volume"] = rng.gamma(2.0, 50.0, int(tail.sum()))
    after = technical_features(changed)
    pd.testing.assert_frame_equal(after.loc[:t], btc_batch.loc[:t])
    assert not after.loc[t + 1 :].equals(btc_batch.loc[t + 1 :])
    pd.testing.assert_frame_equal(technical_features(btc_month.loc[:t]), btc_batch.loc[:t])


def test_priming_bars_make_a_late_start_match_the_long_history(
    btc_month: pd.DataFrame, btc_batch: pd.DataFrame
) -> None:
    """The EMA / Wilder seeds fade: PRIMING_BARS after a start, rows match the long history to 1e-5."""
    features = list(TECHNICAL_FEATURES)
    for start in (1_000, 12_345, 30_000, 42_000):
        primed = start + PRIMING_BARS
        late = technical_features(btc_month.iloc[start : primed + 300])[features].loc[primed:]
        gap = (late - btc_batch.loc[primed : primed + 299, features]).abs()
        assert gap.max().max() <= 1e-5, (start, gap.max().idxmax())


def test_parity_with_gaps_flat_prices_and_zero_volume() -> None:
    frame = random_walk(900, seed=11)
    frame.loc[200:290, "volume"] = 0.0  # a whole 60-bar window without volume
    frame.loc[400:480, ["open", "high", "low", "close"]] = 100.0  # flat: RSI 50, zero volatility
    short_gap, long_gap = 550, 700
    frame.loc[short_gap:, "ts_ms"] += 3 * MIN_MS  # step of 4 min: bridged
    frame.loc[long_gap:, "ts_ms"] += MAX_STEP_MS  # step of 6 min: new warm-up
    batch = technical_features(frame)
    assert_parity(batch, stream(frame))

    warm = batch["is_warmup"].to_numpy()
    expected = np.zeros(len(frame), dtype=bool)
    expected[:WARMUP_BARS] = expected[long_gap : long_gap + WARMUP_BARS] = True
    np.testing.assert_array_equal(warm, expected)
    zero_volume = batch.loc[260:290]
    assert (zero_volume["volume_ratio"] == 1.0).all() and (zero_volume["vwap_premium_60"] == 0.0).all()
    flat = batch.loc[460:480]  # Wilder's averages both decay by 13/14 a bar: the RSI freezes, not 50
    assert (flat["vol_15"] == 0.0).all() and (flat["ret_15"] == 0.0).all()
    np.testing.assert_allclose(flat["rsi_14"], flat["rsi_14"].iloc[0], rtol=1e-12)

    # windows count rows, not minutes: the bridged gap gives the same rows as consecutive time stamps
    consecutive = frame.iloc[:long_gap].assign(ts_ms=T0_MS + MIN_MS * np.arange(long_gap, dtype="int64"))
    pd.testing.assert_frame_equal(technical_features(consecutive), batch.iloc[:long_gap])
    # and after the long gap the features restart as on a fresh frame
    restarted = technical_features(frame.iloc[long_gap:].reset_index(drop=True))
    pd.testing.assert_frame_equal(restarted, batch.iloc[long_gap:].reset_index(drop=True))


def test_hand_computed_values_on_a_ramp() -> None:
    """close = 100 + i, high/low = close +- 1, volume 10: every feature has a closed form.

    With an SMA seed, an EMA of a ramp of slope 1 lags it by exactly (n - 1) / 2 from the seed on (a
    first-value seed would not), so close / EMA_n - 1 = c / (c - (n - 1) / 2) - 1 and MACD is 7 forever.
    """
    n = 80
    close = 100.0 + np.arange(n)
    frame = pd.DataFrame(
        {
            "ts_ms": T0_MS + MIN_MS * np.arange(n, dtype="int64"),
            "open": close - 0.5,
            "high": close + 1,
            "low": close - 1,
            "close": close,
            "volume": 10.0,
        }
    )
    out = technical_features(frame)
    assert out["is_warmup"].tolist() == [True] * 60 + [False] * 20
    t = 70
    c = close[t]
    row = out.loc[t]
    log_r = np.log(close[1:] / close[:-1])
    expected = {
        "close_vs_ema_12": c / (c - 5.5) - 1,
        "close_vs_ema_26": c / (c - 12.5) - 1,
        "close_vs_ema_60": c / (c - 29.5) - 1,
        "macd_hist": 0.0,
        "close_vs_vwap_60": c / (c - 29.5) - 1,  # typical price = close, equal volumes
        "vwap_premium_60": 0.0,
        "momentum_20": c / (c - 9.5) - 1,
        "ret_1": math.log(c / (c - 1)),
        "ret_5": math.log(c / (c - 5)),
        "ret_15": math.log(c / (c - 15)),
        "ret_60": math.log(c / (c - 60)),
        "rsi_14": 100.0,
        "acceleration": math.log(c / (c - 5)) - math.log((c - 5) / (c - 10)),
        "vol_15": float(np.std(log_r[t - 15 : t], ddof=1)),
        "vol_60": float(np.std(log_r[t - 60 : t], ddof=1)),
        "hl_spread": 2 / c,
        "hl_spread_ma_15": float(np.mean(2 / close[t - 14 : t + 1])),
        "volume_ratio": 1.0,
        "volume_price_divergence": 0.0,  # volume never changes
    }
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert_parity(out, stream(frame))


def test_divergence_counts_sign_disagreements() -> None:
    n = 75
    close = 100.0 + np.arange(n)  # always up
    volume = 10.0 + (np.arange(n) % 2)  # even bars: volume falls (disagree, +1); odd bars: rises (agree, -1)
    frame = pd.DataFrame(
        {"ts_ms": T0_MS + MIN_MS * np.arange(n), "open": close, "high": close, "low": close, "close": close}
    ).assign(volume=volume)
    out = technical_features(frame)
    assert out.loc[70, "volume_price_divergence"] == pytest.approx(1 / 15)  # bars 56..70: 8 even, 7 odd
    assert out.loc[71, "volume_price_divergence"] == pytest.approx(-1 / 15)
    assert out.loc[70, "hl_spread"] == 0.0


def test_ema_seed_and_recursion_by_hand() -> None:
    out = ema(np.array([2.0, 4.0, 6.0, 8.0, 10.0]), 3)  # seed mean(2, 4, 6) = 4 at row 2, alpha 0.5
    np.testing.assert_array_equal(out, [np.nan, np.nan, 4.0, 6.0, 8.0])


def test_rsi_on_a_known_sequence() -> None:
    """The StockCharts ChartSchool RSI worksheet closes; its table rounds the averages, hence <= 0.1 off."""
    closes = [44.34, 44.09, 44.15, 43.61, 44.33, 44.83, 45.10, 45.42, 45.84, 46.08, 45.89, 46.03, 45.61, 46.28]
    closes += [46.28, 46.00, 46.03, 46.41, 46.22, 45.64, 46.21, 46.25, 45.71, 46.45, 45.78, 45.35, 44.03, 44.18]
    published = [70.53, 66.32, 66.55, 69.41, 66.36, 57.97, 62.93, 63.26, 56.06, 62.38, 54.71, 50.42, 39.99, 41.46]
    rsi = rsi_wilder(np.array(closes))
    assert np.isnan(rsi[:14]).all()
    # by hand: first 14 changes have gains summing to 3.34 and losses to 1.40
    avg_gain, avg_loss = 3.34 / 14, 1.40 / 14
    assert rsi[14] == pytest.approx(100 * avg_gain / (avg_gain + avg_loss), abs=1e-9)
    avg_gain, avg_loss = avg_gain * 13 / 14, (avg_loss * 13 + 0.28) / 14  # 46.28 -> 46.00
    assert rsi[15] == pytest.approx(100 * avg_gain / (avg_gain + avg_loss), abs=1e-9)
    np.testing.assert_allclose(rsi[14:], published, atol=0.1)
    assert rsi_wilder(np.arange(1.0, 30.0))[-1] == 100.0
    assert rsi_wilder(np.full(30, 5.0))[-1] == 50.0  # no gain and no loss yet: neutral
    assert rsi_wilder(np.array([1.0, 2.0] * 15))[-1] == pytest.approx(50.0, abs=3.0)


def test_streaming_imports_without_pandas() -> None:
    code = (
        "import sys; import cryptoml.features.streaming as s; s.StreamingFeatures()\n"
        "assert 'pandas' not in sys.modules, 'pandas was imported'\nprint('OK')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("cut", [30, 61, 2_500])
def test_snapshot_restore_continues_identically(cut: int) -> None:
    frame = random_walk(3_000, seed=5)
    bars = list(frame.itertuples(index=False))
    live = StreamingFeatures()
    for bar in bars[:cut]:
        live.update(bar.ts_ms, bar.open, bar.high, bar.low, bar.close, bar.volume)
    state = json.loads(json.dumps(live.snapshot(), allow_nan=False))  # plain JSON, as written to disk
    resumed = StreamingFeatures.from_snapshot(state)
    assert resumed.warm == live.warm and resumed.last_ts_ms == live.last_ts_ms
    for bar in bars[cut:]:
        a = live.update(bar.ts_ms, bar.open, bar.high, bar.low, bar.close, bar.volume)
        b = resumed.update(bar.ts_ms, bar.open, bar.high, bar.low, bar.close, bar.volume)
        assert (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
    assert resumed.snapshot() == live.snapshot()


def test_restore_rejects_foreign_or_corrupt_state() -> None:
    state = StreamingFeatures().snapshot()
    with pytest.raises(DataValidationError, match="version"):
        StreamingFeatures().restore({**state, "version": 99})
    with pytest.raises(DataValidationError, match="feature list"):
        StreamingFeatures().restore({**state, "features": list(reversed(TECHNICAL_FEATURES))})
    with pytest.raises(DataValidationError, match="corrupt"):
        StreamingFeatures().restore({k: v for k, v in state.items() if k != "emas"})
    with pytest.raises(DataValidationError, match="corrupt"):
        StreamingFeatures().restore({**state, "volumes": [1.0] * 61})


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: f.drop(columns=["volume"]), "missing columns"),
        (lambda f: f.assign(close=f["close"].where(f.index != 10)), "close must be finite"),
        (lambda f: f.assign(low=f["low"].where(f.index != 3, -1.0)), "low must be finite and > 0"),
        (lambda f: f.assign(volume=f["volume"].where(f.index != 4, -1.0)), "volume must be finite and >= 0"),
        (lambda f: f.assign(high=f["low"] - 0.01), "high < low"),
        (lambda f: f.iloc[::-1], "not strictly increasing"),
        (lambda f: pd.concat([f.iloc[:5], f.iloc[4:]]), "not strictly increasing"),
        (lambda f: f.assign(ts_ms=f["ts_ms"] // 1000), "not 1-minute bars"),
        (lambda f: f.assign(ts_ms=f["ts_ms"].astype(float)), "ts_ms must be integer"),
    ],
)
def test_batch_rejects_bad_input(mutate: Callable[[pd.DataFrame], pd.DataFrame], match: str) -> None:
    with pytest.raises(DataValidationError, match=match):
        technical_features(mutate(random_walk(50)))


def test_empty_input_gives_empty_output() -> None:
    out = technical_features(random_walk(10).iloc[:0])
    assert out.empty and list(out.columns) == [*TECHNICAL_FEATURES, "is_warmup"]


def test_streaming_rejects_bad_bars_and_keeps_its_state() -> None:
    frame = random_walk(120, seed=2)
    bars = list(frame.itertuples(index=False))
    sf = StreamingFeatures()
    for bar in bars[:100]:
        sf.update(bar.ts_ms, bar.open, bar.high, bar.low, bar.close, bar.volume)
    before = sf.snapshot()
    last = bars[99]
    with pytest.raises(DataValidationError, match="out-of-order"):
        sf.update(last.ts_ms, last.open, last.high, last.low, last.close, last.volume)
    with pytest.raises(DataValidationError, match="out-of-order"):
        sf.update(last.ts_ms - MIN_MS, 1.0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(DataValidationError, match="multiples of 60000"):
        sf.update(last.ts_ms + 90_000, 1.0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(DataValidationError, match="close must be finite"):
        sf.update(last.ts_ms + MIN_MS, 1.0, 1.0, 1.0, float("nan"), 1.0)
    with pytest.raises(DataValidationError, match="volume"):
        sf.update(last.ts_ms + MIN_MS, 1.0, 1.0, 1.0, 1.0, -2.0)
    with pytest.raises(DataValidationError, match="high"):
        sf.update(last.ts_ms + MIN_MS, 1.0, 1.0, 2.0, 1.0, 1.0)
    with pytest.raises(DataValidationError, match="integer"):
        sf.update(float(last.ts_ms + MIN_MS), 1.0, 1.0, 1.0, 1.0, 1.0)  # type: ignore[arg-type]
    assert sf.snapshot() == before
    rest = [sf.update(b.ts_ms, b.open, b.high, b.low, b.close, b.volume) for b in bars[100:]]
    assert_parity(technical_features(frame).iloc[100:], rest)


def test_streaming_gap_resets_warm_up() -> None:
    frame = random_walk(70)
    sf = StreamingFeatures()
    for bar in frame.itertuples(index=False):
        sf.update(bar.ts_ms, bar.open, bar.high, bar.low, bar.close, bar.volume)
    assert sf.warm and sf.bars_in_segment == 70
    bar = frame.iloc[-1]
    assert sf.update(int(bar.ts_ms) + MAX_STEP_MS, 100.0, 100.0, 100.0, 100.0, 1.0) is not None  # bridged
    assert sf.update(int(bar.ts_ms) + 2 * MAX_STEP_MS + MIN_MS, 100.0, 100.0, 100.0, 100.0, 1.0) is None
    assert not sf.warm and sf.bars_in_segment == 1
