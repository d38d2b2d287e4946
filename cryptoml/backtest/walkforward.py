"""Evaluation of a walk-forward: the engine over the out-of-sample (and in-sample) signals, and every report figure.

The engine (:func:`cryptoml.backtest.engine.run_backtest`, the edge runner's strategy and paper broker) runs
once over all test bars with the predictions assembled from the segments of :mod:`cryptoml.backtest.signals`
(strategy state and equity carry across folds), and once over the in-sample stretches;
:mod:`cryptoml.backtest.metrics` gives the per-fold and overall figures, the in-sample vs out-of-sample
Sharpe and the deflated Sharpe ratio. Time alignment as in :mod:`cryptoml.backtest.signals`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cryptoml.backtest.engine import BacktestResult, run_backtest
from cryptoml.backtest.metrics import (
    bar_returns,
    deflated_sharpe_of,
    in_out_sample_sharpe,
    performance_metrics,
    periods_per_year_of,
)
from cryptoml.backtest.signals import SegmentSignals, assemble_predictions, signal_quality
from cryptoml.backtest.windows import Fold
from cryptoml.config import PaperBrokerParams, StrategyParams
from cryptoml.errors import DataValidationError
from cryptoml.features.technical import BAR_MS

__all__ = ["WalkForwardEvaluation", "evaluate_walk_forward"]


@dataclass
class WalkForwardEvaluation:
    """The strategy run on the walk-forward signals, and every report number (JSON-safe dicts).

    ``out_of_sample``: the engine over every test bar (one run: strategy state and equity carry across
    folds); ``in_sample``: the same strategy over the in-sample stretches with the in-sample predictions
    (a fresh account); ``bars``: the test bars (``ts_ms``, OHLC), aligned with ``out_of_sample``'s arrays
    and ``predicted_bps``; ``metrics``: overall; ``folds``: one dict per fold.
    """

    out_of_sample: BacktestResult
    in_sample: BacktestResult | None
    bars: pd.DataFrame
    predicted_bps: np.ndarray
    metrics: dict[str, Any]
    folds: list[dict[str, Any]]


def _bars_between(bars: pd.DataFrame, start_ms: int, end_ms: int) -> pd.DataFrame:
    ts = bars["ts_ms"].to_numpy(dtype=np.int64)
    lo, hi = np.searchsorted(ts, [start_ms, end_ms], side="left")
    return bars.iloc[lo:hi][["ts_ms", "open", "high", "low", "close"]].reset_index(drop=True)


def _curve_slice(result: BacktestResult, start_ms: int, end_ms: int) -> slice:
    """Bars of ``[start_ms, end_ms)`` plus the bar before (its close is the base of the first return)."""
    lo, hi = np.searchsorted(result.ts_ms, [start_ms, end_ms], side="left")
    return slice(max(int(lo) - 1, 0), int(hi))


def _period_metrics(result: BacktestResult, close: np.ndarray, start_ms: int, end_ms: int) -> dict[str, Any]:
    sl = _curve_slice(result, start_ms, end_ms)
    trades = [t for t in result.trades if start_ms <= t.entry_ts_ms < end_ms]
    return performance_metrics(
        result.ts_ms[sl],
        result.equity[sl],
        trade_pnl=[t.net_pnl for t in trades],
        trade_entry_notional=[abs(t.qty) * t.entry_price for t in trades],
        position_qty=result.position_qty[sl],
        benchmark_close=close[sl],
        bar_ms=result.bar_ms,
    )


def _returns(result: BacktestResult | None, start_ms: int, end_ms: int) -> np.ndarray:
    if result is None:
        return np.empty(0)
    return bar_returns(result.equity[_curve_slice(result, start_ms, end_ms)])


def evaluate_walk_forward(
    bars: pd.DataFrame,
    folds: Sequence[Fold],
    segments: Sequence[SegmentSignals],
    *,
    strategy: StrategyParams,
    broker: PaperBrokerParams,
    symbol: str,
    funding: pd.DataFrame | None = None,
    dsr_trials: int = 0,
    bar_ms: int = BAR_MS,
) -> WalkForwardEvaluation:
    """Run the engine on the out-of-sample (and in-sample) signals and compute the overall and per-fold metrics.

    ``bars``: the 1-minute bars (``ts_ms`` + OHLC), covering the folds; ``folds``:
    :class:`cryptoml.backtest.windows.Fold` (``index``, ``test_start_ms``, ``test_end_ms``...); ``segments``:
    every segment's :class:`SegmentSignals`. Per fold: :func:`performance_metrics` of the equity over the
    fold's test bars (measured from the previous fold's last close), the trades *entered* in the fold, and
    in-sample vs out-of-sample Sharpe (:func:`in_out_sample_sharpe`: the in-sample run over the in-sample
    stretches of the fold's segments vs the out-of-sample run over its test bars). Overall: the same over
    all test bars, the PnL components, decision counts, signal quality (:func:`signal_quality`) and the
    deflated Sharpe ratio with ``dsr_trials`` trials (0 = the number of folds) and the folds' per-bar
    Sharpe ratios as the trials' spread.
    """
    if not folds or not segments:
        raise DataValidationError("evaluate_walk_forward: no fold or no segment to evaluate")
    first, last = int(folds[0].test_start_ms), int(folds[-1].test_end_ms)
    test_bars = _bars_between(bars, first, last)
    if len(test_bars) < 2:
        raise DataValidationError(f"evaluate_walk_forward: fewer than 2 bars in the test span [{first}, {last})")
    pred = assemble_predictions(test_bars["ts_ms"].to_numpy(), segments)
    run: dict[str, Any] = {
        "strategy": strategy,
        "broker": broker,
        "symbol": symbol,
        "funding": funding,
        "bar_ms": bar_ms,
    }
    oos = run_backtest(test_bars, pred, **run)

    is_ts = np.concatenate([s.is_ts_ms for s in segments])
    in_sample = None
    if is_ts.size >= 2:
        is_bars = _bars_between(bars, int(is_ts.min()), int(is_ts.max()) + bar_ms)
        is_pred = assemble_predictions(is_bars["ts_ms"].to_numpy(), segments, in_sample=True)
        in_sample = run_backtest(is_bars, is_pred, **run)

    ppy = periods_per_year_of(bar_ms)
    close = test_bars["close"].to_numpy(dtype=np.float64)
    quality = signal_quality(segments, segments[0].horizon_minutes, strategy.entry_bps)
    fold_rows = []
    for fold in folds:
        start, end = int(fold.test_start_ms), int(fold.test_end_ms)
        own = [s for s in segments if s.fold_index == fold.index]
        if own and in_sample is not None and any(s.is_ts_ms.size for s in own):
            is_start = min(int(s.is_ts_ms.min()) for s in own if s.is_ts_ms.size)
            is_end = max(int(s.is_ts_ms.max()) for s in own if s.is_ts_ms.size) + bar_ms
            is_returns = _returns(in_sample, is_start, is_end)
        else:
            is_returns = np.empty(0)
        fold_rows.append(
            {
                "fold": int(fold.index),
                "train_start_ms": int(fold.train_start_ms),
                "train_end_ms": int(fold.train_end_ms),
                "test_start_ms": start,
                "test_end_ms": end,
                "refits": len(own),
                **_period_metrics(oos, close, start, end),
                **in_out_sample_sharpe(is_returns, _returns(oos, start, end), periods_per_year=ppy),
                "signals": quality["folds"].get(str(fold.index), {}),
            }
        )
    overall: dict[str, Any] = {
        **_period_metrics(oos, close, first, last),
        **in_out_sample_sharpe(
            _returns(in_sample, int(in_sample.ts_ms[0]), int(in_sample.ts_ms[-1]) + bar_ms) if in_sample else [],
            bar_returns(oos.equity),
            periods_per_year=ppy,
        ),
    }
    trials = dsr_trials or len(folds)
    overall["deflated_sharpe"] = deflated_sharpe_of(
        overall, n_trials=trials, trial_sharpe_per_bar=[f["sharpe_per_bar"] for f in fold_rows]
    )
    overall.update(
        {
            "dsr_trials": trials,
            "folds": len(folds),
            "refits": len(segments),
            "pnl": oos.totals.to_dict(),
            "decisions": dict(sorted(oos.decision_counts.items())),
            "signals": quality["overall"],
            "test_start_ms": first,
            "test_end_ms": last,
        }
    )
    return WalkForwardEvaluation(oos, in_sample, test_bars, pred, overall, fold_rows)
