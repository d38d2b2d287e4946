"""Prefect tasks of the ``backtest`` stage: walk-forward signals, the engine and its report, the opportunity scorer.

Paths are fixed here and in dvc.yaml. Inputs: the bars with their features (``data/price_features.parquet``,
the ``price_features`` stage), the funding of ``price.exchange`` / ``price.symbol`` from the store when
stored (and ``backtest.funding``), and for the opportunity scorer the simulated positions and their
features. Outputs, all under ``reports/backtest/``: ``metrics.json``, ``trades.csv``, ``equity.png``,
``drawdown.png`` (the contract files), ``refits.csv`` (one row per refit) and, with ``backtest.opportunity``,
``opportunity_backtest.json`` / ``.png``. The fanned-out tasks (one fold each) take small picklable inputs
and skip Prefect's input hashing (``NO_CACHE``): their inputs are arrays, and nothing is cached anyway.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from cryptoml.atomic import atomic_path
from cryptoml.backtest.engine import Trade
from cryptoml.backtest.opportunity import (
    OpportunityBacktestSettings,
    OpportunityFoldData,
    OpportunityFoldResult,
    opportunity_fold_data,
    opportunity_folds,
    purge_ms_for,
    run_opportunity_fold,
    summarize_opportunity_folds,
    write_opportunity_report,
)
from cryptoml.backtest.report import write_backtest_report
from cryptoml.backtest.signals import (
    LgbmSettings,
    SegmentSignals,
    SignalInputs,
    fold_signals,
    fold_span_ms,
    segment_table,
    signal_inputs,
)
from cryptoml.backtest.walkforward import evaluate_walk_forward
from cryptoml.backtest.windows import Fold, windows_from_hours
from cryptoml.config import Params
from cryptoml.errors import DataValidationError
from cryptoml.features.technical import BAR_MS
from cryptoml.frames import read_frame
from cryptoml.market.store import DatasetKey, ParquetStore, market_of
from tasks.opportunity import FEATURES, POSITIONS
from tasks.price import PRICE_FEATURES

log = logging.getLogger("cryptoml")

REPORT_DIR = Path("reports/backtest")
REFITS_CSV = REPORT_DIR / "refits.csv"
MS_PER_DAY = 86_400_000
TRADE_COLUMNS = [f.name for f in dataclasses.fields(Trade)]


def load_bars(params: Params) -> pd.DataFrame:
    """The stored bars + features of the price symbol, cut to the newest ``backtest.max_days`` (0 = all)."""
    table = read_frame(PRICE_FEATURES, "price features")
    if params.backtest.max_days:
        last = int(table["ts_ms"].iloc[-1]) + BAR_MS
        table = table[table["ts_ms"] >= last - round(params.backtest.max_days * MS_PER_DAY)].reset_index(drop=True)
    if table.empty:
        raise DataValidationError(f"backtest: {PRICE_FEATURES} holds no bar")
    return table


def load_funding(params: Params, start_ms: int, end_ms: int) -> pd.DataFrame | None:
    """Funding settlements of ``price.exchange`` / ``price.symbol`` in ``[start_ms, end_ms)``, when they apply.

    None when ``backtest.funding`` is off, the symbol is not a perpetual swap, or no funding is stored.
    """
    p = params.price
    if not params.backtest.funding or market_of(p.symbol) != "swap":
        return None
    key = DatasetKey(p.exchange, p.symbol, "funding")
    store = ParquetStore(params.market.data_dir)
    if not store.exists(key):
        log.info("backtest: no stored funding for %s; funding is not charged", key.label())
        return None
    return store.read(key, start_ms, end_ms)[["ts_ms", "funding_rate"]].reset_index(drop=True)


def lgbm_settings(params: Params) -> LgbmSettings:
    """``price_lgbm`` trees with ``backtest.lgbm_rounds`` rounds, one thread per refit (refits run in parallel)."""
    return LgbmSettings.from_params(params.price_lgbm, params.backtest.lgbm_rounds, num_threads=1)


@task(name="backtest_inputs", cache_policy=NO_CACHE)
def backtest_inputs_task(params: Params) -> dict[str, Any]:
    """Bars, signal inputs, walk-forward folds and funding of the price walk-forward."""
    bars = load_bars(params)
    ts = bars["ts_ms"].to_numpy()
    b = params.backtest
    folds = windows_from_hours(
        int(ts[0]),
        int(ts[-1]) + BAR_MS,
        train_hours=b.train_hours,
        test_hours=b.test_hours,
        retrain_minutes=b.retrain_minutes,
        horizon_minutes=params.price.horizon_minutes,
    )
    inputs = signal_inputs(bars, params.price.horizon_minutes)
    funding = load_funding(params, int(ts[0]), int(ts[-1]) + BAR_MS)
    refits = sum(len(f.segments) for f in folds)
    log.info("backtest: %d bars, %d folds, %d refits", len(bars), len(folds), refits)
    return {"bars": bars, "inputs": inputs, "folds": folds, "funding": funding}


def fold_inputs(inputs: SignalInputs, fold: Fold) -> SignalInputs:
    """The slice of ``inputs`` one fold needs (what a fanned-out task is shipped)."""
    return inputs.window(*fold_span_ms(fold))


@task(name="backtest_fold_signals", cache_policy=NO_CACHE)
def fold_signals_task(inputs: SignalInputs, fold: Fold, settings: LgbmSettings) -> list[SegmentSignals]:
    """Every refit of one fold (:func:`cryptoml.backtest.signals.fold_signals`)."""
    return fold_signals(inputs, fold, settings)


@task(name="backtest_report", cache_policy=NO_CACHE)
def backtest_report_task(
    params: Params,
    bars: pd.DataFrame,
    folds: list[Fold],
    segments: list[SegmentSignals],
    funding: pd.DataFrame | None,
) -> dict[str, Any]:
    """Engine over the test bars, metrics per fold and overall, and the four report files."""
    ev = evaluate_walk_forward(
        bars,
        folds,
        segments,
        strategy=params.strategy,
        broker=params.broker,
        symbol=params.price.symbol,
        funding=funding,
        dsr_trials=params.backtest.dsr_trials,
    )
    metrics = {**ev.metrics, "symbol": f"{params.price.exchange} {params.price.symbol}"}
    # A DataFrame with the engine's columns: trades.csv keeps its header even without a trade.
    trades = pd.DataFrame(ev.out_of_sample.trade_rows(), columns=TRADE_COLUMNS)
    paths = write_backtest_report(
        REPORT_DIR,
        metrics=metrics,
        folds=ev.folds,
        trades=trades,
        ts_ms=ev.out_of_sample.ts_ms,
        equity=ev.out_of_sample.equity,
        benchmark_close=ev.bars["close"].to_numpy(),
        title=f"Walk-forward {params.price.exchange} {params.price.symbol}",
    )
    with atomic_path(REFITS_CSV) as tmp:
        pd.DataFrame(segment_table(segments)).to_csv(tmp, index=False, lineterminator="\n")
    log.info(
        "backtest: %d folds, total return %.4f, Sharpe %s (in-sample %s), deflated Sharpe %s, %d trades",
        len(folds),
        metrics["total_return"],
        metrics["sharpe"],
        metrics["sharpe_in_sample"],
        metrics["deflated_sharpe"],
        metrics["n_trades"],
    )
    return {"metrics": metrics, "paths": {k: str(v) for k, v in paths.items()}}


def opportunity_settings(params: Params) -> OpportunityBacktestSettings:
    """The opportunity walk-forward's budget: ``backtest.opportunity_top_k``, one XGBoost thread per fit."""
    return OpportunityBacktestSettings.from_params(params.backtest, n_jobs=1)


@task(name="backtest_opportunity_inputs", cache_policy=NO_CACHE)
def opportunity_inputs_task(params: Params) -> list[OpportunityFoldData]:
    """One :class:`OpportunityFoldData` per test day, from the simulated positions and their features."""
    from cryptoml.features.opportunity import FEATURE_NAMES

    positions = read_frame(POSITIONS, "simulated positions")
    features = read_frame(FEATURES, "opportunity features", columns=list(FEATURE_NAMES))
    if positions.empty:
        raise DataValidationError(f"backtest: {POSITIONS} holds no simulated position")
    settings = opportunity_settings(params)
    settings.validate()
    folds = opportunity_folds(
        positions["ts_ms"].to_numpy(),
        purge_ms=purge_ms_for(params.opportunity_model, positions["hold_hours"].unique().tolist()),
        min_train_ms=round(settings.min_train_days * MS_PER_DAY),
    )
    return [opportunity_fold_data(positions, features, f, settings) for f in folds]


@task(name="backtest_opportunity_fold", cache_policy=NO_CACHE)
def opportunity_fold_task(data: OpportunityFoldData, params: Params) -> OpportunityFoldResult:
    """Fit and score one test day of the opportunity walk-forward."""
    return run_opportunity_fold(data, params.opportunity_model, opportunity_settings(params))


@task(name="backtest_opportunity_report", cache_policy=NO_CACHE)
def opportunity_report_task(params: Params, results: list[OpportunityFoldResult]) -> dict[str, Any]:
    """Combine the days, write ``opportunity_backtest.json`` / ``.png``; returns the overall comparison."""
    result = summarize_opportunity_folds(results)
    settings = opportunity_settings(params)
    paths = write_opportunity_report(
        result, REPORT_DIR, settings={**vars(settings), "position_usd": params.simulate.position_usd}
    )
    o = result.overall
    log.info(
        "backtest: opportunity scorer over %d days: ML %.0f USD (hit %.2f) vs rule %.0f USD (hit %.2f)",
        o["folds"],
        o["ml"]["pnl_usd"],
        o["ml"]["hit_rate"] or 0.0,
        o["rule"]["pnl_usd"],
        o["rule"]["hit_rate"] or 0.0,
    )
    return {"overall": o, "paths": {k: str(v) for k, v in paths.items()}}


@task(name="backtest_track", cache_policy=NO_CACHE)
def track_backtest_task(params: Params, metrics: dict[str, Any], opportunity: dict[str, Any] | None) -> str:
    """One MLflow run (experiment ``backtest``): params, overall metrics, the report folder as artifacts."""
    from cryptoml.lineage import data_hash, git_commit
    from tasks import tracking

    data = data_hash(PRICE_FEATURES)
    tags = {"stage": "backtest", "git_commit": git_commit(), "data_md5": data["md5"]}
    run_params = {
        "backtest": vars(params.backtest),
        "strategy": vars(params.strategy),
        "broker": vars(params.broker),
        "price": vars(params.price),
        "lgbm": vars(lgbm_settings(params)),
    }
    with tracking.training_run("backtest", "backtest", run_params, tags) as mlflow:
        mlflow.log_metrics(tracking.numeric_metrics(metrics))
        if opportunity is not None:
            mlflow.log_metrics(tracking.numeric_metrics({"opportunity": opportunity}))
        mlflow.log_artifacts(str(REPORT_DIR), "backtest")
        run_id: str = mlflow.active_run().info.run_id
    log.info("backtest: MLflow run %s", run_id)
    return run_id
