"""Walk-forward signals: no label of the future reaches a refit, determinism, order independence."""

from __future__ import annotations

import dataclasses
import json
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from cryptoml.backtest.signals import (
    LgbmSettings,
    SegmentSignals,
    assemble_predictions,
    fold_signals,
    segment_signals,
    signal_inputs,
    signal_quality,
    walk_forward_signals,
)
from cryptoml.backtest.walkforward import evaluate_walk_forward
from cryptoml.backtest.windows import Segment, windows_from_hours
from cryptoml.errors import DataValidationError

BAR_MS = 60_000
HOUR_MS = 3_600_000
H = 10  # label horizon, minutes
START_MS = 1_704_067_200_000  # 2024-01-01T00:00Z
SETTINGS = LgbmSettings(rounds=15, num_leaves=8, max_depth=4)


def make_bars(n: int = 600, seed: int = 3, start_ms: int = START_MS) -> pd.DataFrame:
    """A seeded 1-minute random walk in the store schema (open = previous close)."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.002, n)))
    open_ = np.r_[100.0, close[:-1]]
    wiggle = np.abs(rng.normal(0.0, 0.001, n))
    return pd.DataFrame(
        {
            "ts_ms": start_ms + BAR_MS * np.arange(n, dtype=np.int64),
            "open": open_,
            "high": np.maximum(open_, close) * (1 + wiggle),
            "low": np.minimum(open_, close) * (1 - wiggle),
            "close": close,
            "volume": rng.uniform(5.0, 50.0, n),
        }
    )


def folds_of(bars: pd.DataFrame) -> list:
    ts = bars["ts_ms"].to_numpy()
    return windows_from_hours(
        int(ts[0]), int(ts[-1]) + BAR_MS, train_hours=3, test_hours=2, retrain_minutes=30, horizon_minutes=H
    )


def _same(a: list[SegmentSignals], b: list[SegmentSignals]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for f in dataclasses.fields(SegmentSignals):
            u, v = getattr(x, f.name), getattr(y, f.name)
            if isinstance(u, np.ndarray):
                assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), f.name  # byte-identical
            else:
                assert u == v, f.name


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return make_bars()


@pytest.fixture(scope="module")
def baseline(bars: pd.DataFrame) -> list[SegmentSignals]:
    return walk_forward_signals(signal_inputs(bars, H), folds_of(bars), SETTINGS)


def test_every_refit_only_sees_labels_realised_before_its_segment(baseline: list[SegmentSignals]) -> None:
    assert len(baseline) > 10
    for s in baseline:
        assert s.last_label_ms <= s.start_ms  # the last training label closes by the first bar's open
        assert s.fit_end_ms + H * BAR_MS <= s.start_ms
        assert s.is_ts_ms.max() < s.fit_end_ms and s.ts_ms.min() >= s.start_ms
        assert s.train_rows > 0 and s.ts_ms.size == (s.end_ms - s.start_ms) // BAR_MS


def test_a_detectable_future_does_not_change_the_model(bars: pd.DataFrame) -> None:
    """A 20 % jump at the segment start: a model that saw one label across it would learn huge returns."""
    seg = folds_of(bars)[1].segments[2]
    clean = segment_signals(signal_inputs(bars, H), seg, SETTINGS)

    jumped = bars.copy()
    future = jumped["ts_ms"] >= seg.start_ms
    for col in ("open", "high", "low", "close"):
        jumped.loc[future, col] *= 1.2
    seen = segment_signals(signal_inputs(jumped, H), seg, SETTINGS)
    assert seen.train_rows == clean.train_rows
    np.testing.assert_array_equal(seen.is_predicted_bps, clean.is_predicted_bps)  # the same trees
    assert np.nanmax(np.abs(seen.is_predicted_bps)) < 100.0

    # Positive control: the same jump one bar earlier falls inside a training label and changes the model.
    early = bars.copy()
    before = early["ts_ms"] >= seg.start_ms - BAR_MS
    for col in ("open", "high", "low", "close"):
        early.loc[before, col] *= 1.2
    leaked = segment_signals(signal_inputs(early, H), seg, SETTINGS)
    assert not np.array_equal(leaked.is_predicted_bps, clean.is_predicted_bps)


def test_a_segment_not_purged_by_the_horizon_is_refused(bars: pd.DataFrame) -> None:
    start = START_MS + 4 * HOUR_MS
    short = Segment(start - 3 * HOUR_MS, start - (H - 1) * BAR_MS, start, start + HOUR_MS // 2)
    with pytest.raises(DataValidationError, match="label horizon"):
        segment_signals(signal_inputs(bars, H), short, SETTINGS)


def test_signals_are_deterministic_and_independent_of_order_and_workers(
    bars: pd.DataFrame, baseline: list[SegmentSignals]
) -> None:
    inputs = signal_inputs(bars, H)
    folds = folds_of(bars)
    _same(walk_forward_signals(inputs, folds, SETTINGS), baseline)

    # Folds in reverse, segments shuffled, each refit on the whole series instead of the fold's slice.
    jobs = [(f.index, i, seg) for f in folds for i, seg in enumerate(f.segments)]
    order = np.random.default_rng(0).permutation(len(jobs))
    shuffled = {
        (jobs[k][0], jobs[k][1]): segment_signals(
            inputs, jobs[k][2], SETTINGS, fold_index=jobs[k][0], segment_index=jobs[k][1]
        )
        for k in order
    }
    _same([shuffled[(f, i)] for f, i, _ in jobs], baseline)

    # Two threads at once, each fold's inputs shipped through pickle as a process pool would.
    shipped = pickle.loads(pickle.dumps(inputs))
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(lambda f: fold_signals(shipped, f, SETTINGS), reversed(folds)))
    _same([s for part in reversed(parts) for s in part], baseline)


def test_warmup_bars_after_a_gap_have_no_prediction() -> None:
    bars = make_bars(620)
    gap_at = 400  # 20 bars missing from here: the features restart with a 60-bar warm-up
    bars = pd.concat([bars.iloc[:gap_at], bars.iloc[gap_at + 20 :]], ignore_index=True)
    out = walk_forward_signals(signal_inputs(bars, H), folds_of(bars), SETTINGS)
    pred = assemble_predictions(bars["ts_ms"].to_numpy(), out)
    resume = gap_at  # first bar after the gap, as a row of the gapped frame
    covered = np.isin(bars["ts_ms"].to_numpy(), np.concatenate([s.ts_ms for s in out]))
    assert covered[resume : resume + 60].all()
    assert np.isnan(pred[resume : resume + 60]).all()
    assert np.isfinite(pred[resume + 60 : resume + 70]).all()


def test_assemble_aligns_predictions_and_refuses_overlaps(bars: pd.DataFrame, baseline: list[SegmentSignals]) -> None:
    ts = bars["ts_ms"].to_numpy()
    pred = assemble_predictions(ts, baseline)
    first, last = baseline[0].start_ms, baseline[-1].end_ms
    inside = (ts >= first) & (ts < last)
    assert np.isfinite(pred[inside]).all() and np.isnan(pred[~inside]).all()
    np.testing.assert_array_equal(pred[np.searchsorted(ts, baseline[3].ts_ms)], baseline[3].predicted_bps)
    with pytest.raises(DataValidationError, match="overlap"):
        assemble_predictions(ts, [baseline[0], baseline[0]])


def test_signal_quality_reports_in_and_out_of_sample_without_nan(baseline: list[SegmentSignals]) -> None:
    q = signal_quality(baseline, H, threshold_bps=2.0)
    json.dumps(q, allow_nan=False)
    overall = q["overall"]
    assert overall["segments"] == len(baseline)
    assert overall["in_sample"]["rows"] > 0 and overall["out_of_sample"]["rows"] > 0
    # Fitted on its own rows, a model's in-sample IC beats its out-of-sample IC on a random walk.
    assert overall["in_sample"]["ic"] > overall["out_of_sample"]["ic"]
    assert set(q["folds"]) == {str(s.fold_index) for s in baseline}


def test_evaluation_runs_the_strategy_on_the_test_bars_only(bars: pd.DataFrame, baseline: list[SegmentSignals]) -> None:
    from cryptoml.backtest.report import json_safe
    from cryptoml.config import PaperBrokerParams, StrategyParams

    folds = folds_of(bars)
    strategy = StrategyParams(entry_bps=1.0, exit_reversal_bps=0.5, cooldown_minutes=0.0)
    ev = evaluate_walk_forward(bars, folds, baseline, strategy=strategy, broker=PaperBrokerParams(), symbol="X/USDT")
    ts = ev.out_of_sample.ts_ms
    assert ts[0] == folds[0].test_start_ms and ts[-1] == folds[-1].test_end_ms - BAR_MS
    assert ev.in_sample is not None and ev.in_sample.ts_ms[-1] < folds[-1].test_end_ms - H * BAR_MS
    assert [f["fold"] for f in ev.folds] == [f.index for f in folds]
    assert sum(f["refits"] for f in ev.folds) == ev.metrics["refits"] == len(baseline)
    assert ev.metrics["n_trades"] == len(ev.out_of_sample.trades) > 0
    assert sum(f["n_trades"] for f in ev.folds) == ev.metrics["n_trades"]  # each trade in the fold it entered
    assert ev.metrics["dsr_trials"] == len(folds) and ev.metrics["deflated_sharpe"] is not None
    assert ev.metrics["sharpe_in_sample"] is not None and ev.metrics["sharpe_out_of_sample"] is not None
    json.dumps(json_safe({"overall": ev.metrics, "folds": ev.folds}), allow_nan=False)
