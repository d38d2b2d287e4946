"""Prefect tasks of the funding-arbitrage branch: snapshots -> simulate -> opportunity_features -> train_opportunity.

Paths are fixed here and in dvc.yaml (the stage outputs); each task reads its inputs, makes one call
into ``cryptoml.simulate`` / ``cryptoml.features`` / ``cryptoml.models``, writes its outputs atomically
and a small metrics JSON under ``reports/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from prefect import task

from cryptoml.atomic import atomic_write_text
from cryptoml.config import Params
from cryptoml.errors import ConfigError
from cryptoml.frames import read_frame, write_frame
from cryptoml.market.store import ParquetStore

log = logging.getLogger("cryptoml")

SNAPSHOTS = Path("data/snapshots.parquet")
OPPORTUNITIES = Path("data/opportunities.parquet")
POSITIONS = Path("data/positions.parquet")
FEATURES = Path("data/opportunity_features.parquet")
MODEL_DIR = Path("models/native/opportunity")  # native boosters; the ONNX bundles are models/<name>/
REPORT_DIR = Path("reports/opportunity")


def universe(params: Params) -> tuple[list[str], list[str], str]:
    """(exchanges, bases, quote) of the stored market, from the source that filled it."""
    if params.market.source == "synthetic":
        s = params.synthetic
        return list(s.exchanges), list(s.bases), s.quote
    bases, quotes = [], set()
    for symbol in params.market.symbols:
        pair = symbol.split(":")[0]
        if "/" not in pair:
            raise ConfigError(f"market.symbols: {symbol!r} is not a unified BASE/QUOTE[:SETTLE] symbol")
        base, quote = pair.split("/")
        bases.append(base)
        quotes.add(quote)
    if len(quotes) != 1:
        raise ConfigError(f"market.symbols: one quote currency is needed for snapshots, got {sorted(quotes)}")
    return list(params.market.exchanges), sorted(set(bases)), quotes.pop()


def _synthetic_tag(params: Params) -> dict[str, str]:
    return {"synthetic": "true"} if params.market.source == "synthetic" else {}


def _write_metrics(name: str, metrics: dict[str, Any]) -> Path:
    path = Path("reports") / f"{name}.json"
    atomic_write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n", path)
    return path


@task(name="snapshots")
def build_snapshots_task(params: Params) -> dict[str, Any]:
    """5-minute market snapshots and the opportunities detected in them."""
    from cryptoml.simulate.opportunities import detect_opportunities
    from cryptoml.simulate.snapshots import build_snapshots

    exchanges, bases, quote = universe(params)
    store = ParquetStore(params.market.data_dir)
    snaps = build_snapshots(store, exchanges, bases, quote, params.snapshots, timeframe=params.market.timeframe)
    opps = detect_opportunities(snaps, params.opportunities, params.simulate)
    tag = _synthetic_tag(params)
    write_frame(snaps, SNAPSHOTS, tag)
    write_frame(opps, OPPORTUNITIES, tag)
    metrics = {
        "snapshots": len(snaps),
        "opportunities": len(opps),
        "by_strategy": {k: int(v) for k, v in opps["strategy"].value_counts().sort_index().items()},
        "synthetic": bool(tag),
    }
    _write_metrics("snapshots", metrics)
    log.info("snapshots: %d rows, %d opportunities %s", len(snaps), len(opps), metrics["by_strategy"])
    return metrics


@task(name="simulate")
def simulate_task(params: Params) -> dict[str, Any]:
    """Simulate every opportunity at every hold duration; positions past the data are dropped and counted."""
    from cryptoml.simulate.positions import build_funding_events, build_price_paths, simulate_positions
    from cryptoml.simulate.snapshots import load_market_frames

    exchanges, bases, quote = universe(params)
    snaps = read_frame(SNAPSHOTS, "snapshots")
    opps = read_frame(OPPORTUNITIES, "opportunities")
    frames = load_market_frames(
        ParquetStore(params.market.data_dir), exchanges, bases, quote, timeframe=params.market.timeframe
    )
    prices = build_price_paths(frames, snaps)
    funding = build_funding_events(frames, prices)
    started = time.perf_counter()
    result = simulate_positions(opps, prices, funding, params.simulate)
    elapsed = time.perf_counter() - started
    positions = result.positions
    write_frame(positions, POSITIONS, _synthetic_tag(params))
    by_hold = positions.groupby("hold_hours")["actual_profit_pct"].agg(["count", "mean"])
    metrics = {
        "positions": len(positions),
        "dropped_past_data": int(result.dropped_past_data),
        "dropped_gap": int(result.dropped_gap),
        "profitable_share": float(positions["was_profitable"].mean()) if len(positions) else 0.0,
        "mean_profit_pct_by_hold": {f"{h:g}h": float(r["mean"]) for h, r in by_hold.iterrows()},
    }
    _write_metrics("simulate", metrics)
    log.info(
        "simulate: %d positions in %.2f s (%d dropped past the data, %d across gaps)",
        len(positions),
        elapsed,
        result.dropped_past_data,
        result.dropped_gap,
    )
    return metrics


@task(name="opportunity_features")
def features_task(params: Params) -> dict[str, Any]:
    """Entry-time features of every simulated position (keys + features + labels)."""
    from cryptoml.features.opportunity import FEATURE_NAMES, opportunity_features

    positions = read_frame(POSITIONS, "simulated positions")
    X = opportunity_features(positions)
    keys = positions[["ts_ms", "opportunity_id", "actual_profit_pct", "was_profitable"]]  # hold_hours is a feature
    table = keys.join(X.reset_index(drop=True).set_axis(keys.index))
    write_frame(table, FEATURES, _synthetic_tag(params))
    metrics = {"rows": len(table), "features": len(FEATURE_NAMES)}
    _write_metrics("opportunity_features", metrics)
    return metrics


@task(name="train_opportunity")
def train_task(params: Params) -> dict[str, Any]:
    """Fit profit / success / hold models, evaluate ML vs rule, save native models, track in MLflow."""
    from cryptoml.features.opportunity import FEATURE_NAMES
    from cryptoml.lineage import data_hash, git_commit
    from cryptoml.models.opportunity import train_opportunity_models
    from tasks import tracking

    positions = read_frame(POSITIONS, "simulated positions")
    features = read_frame(FEATURES, "opportunity features", columns=list(FEATURE_NAMES))
    result = train_opportunity_models(
        positions, params.opportunity_model, params.simulate, REPORT_DIR, features=features
    )
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, model in (
        ("profit", result.profit_model),
        ("success", result.success_model),
        ("hold", result.hold_model),
    ):
        paths[name] = MODEL_DIR / f"{name}.json"
        model.booster_.save_model(str(paths[name]))
    data = data_hash(FEATURES)
    commit = git_commit()
    _write_holdouts(result, positions, features)
    meta = {
        "feature_names": list(result.feature_names),
        "hold_feature_names": list(result.hold_feature_names),
        "holds": list(result.holds),
        "split": {
            "purge_ms": result.split.purge_ms,
            "rows": result.split.rows,
            "first_entry_ms": result.split.first_entry_ms,
            "last_entry_ms": result.split.last_entry_ms,
        },
        "sizing": result.metrics["sizing"],
        "metrics": {  # the bundles' headline metrics (finite numbers only)
            key: tracking.numeric_metrics(result.metrics[key]) for key in ("profit", "success", "hold")
        },
        "synthetic": params.market.source == "synthetic",
        "data": data,
    }
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", MODEL_DIR / "meta.json")
    headline = headline_metrics(result.metrics)
    _write_metrics("train_opportunity", headline)

    tags = {
        "stage": "train_opportunity",
        "git_commit": commit,
        "data_md5": data["md5"],
        "synthetic": str(meta["synthetic"]).lower(),
    }
    run_params = {
        "opportunity_model": vars(params.opportunity_model),
        "simulate.hold_hours": list(params.simulate.hold_hours),
        "features": len(FEATURE_NAMES),
    }
    with tracking.training_run("opportunity", "train_opportunity", run_params, tags) as mlflow:
        mlflow.log_metrics(tracking.numeric_metrics(result.metrics))
        mlflow.log_dict({"feature_names": list(result.feature_names)}, "feature_names.json")
        mlflow.log_artifacts(str(REPORT_DIR), "reports")
        mlflow.log_artifacts(str(MODEL_DIR), "native_models")
        run_id = mlflow.active_run().info.run_id
    log.info("train_opportunity: MLflow run %s", run_id)
    return {**headline, "mlflow_run_id": run_id}


def _write_holdouts(result: Any, positions: Any, features: Any) -> None:
    """The test window of each opportunity model (raw features + label), for export parity and the registry."""
    import numpy as np

    from cryptoml.models.holdout import Holdout, save_holdout
    from tasks.price import holdout_path

    rows = result.test_rows
    ts = positions["ts_ms"].to_numpy(dtype=np.int64)
    X = features[list(result.feature_names)].to_numpy(dtype=np.float32)
    for name, label, column, metric in (
        ("opportunity_profit", "actual_profit_pct", "actual_profit_pct", "rmse"),
        ("opportunity_success", "was_profitable", "was_profitable", "auc"),
    ):
        y = positions[column].to_numpy()[rows].astype(np.float64)
        save_holdout(
            holdout_path("opportunity", name),
            Holdout(
                X=X[rows], y=y, ts_ms=ts[rows], feature_names=tuple(result.feature_names), metric=metric, label=label
            ),
        )
    hold_rows = result.hold_test_rows
    X_entry = features[list(result.hold_feature_names)].to_numpy(dtype=np.float32)
    save_holdout(
        holdout_path("opportunity", "opportunity_hold"),
        Holdout(
            X=X_entry[hold_rows],
            y=result.hold_test_hours,
            ts_ms=ts[hold_rows],
            feature_names=tuple(result.hold_feature_names),
            metric="mae_hours",
            label="best simulated hold (hours) among the entry's simulated holds",
            candidates=result.hold_test_available,  # the prediction picks among the same holds
        ),
    )


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers `make run` prints and `dvc metrics show` tracks."""
    ml_rule = {row["scorer"]: row for row in metrics["ml_vs_rule"]}
    hold = metrics.get("hold", {})
    return {
        "profit_r2": metrics["profit"]["r2"],
        "profit_mae_pct": metrics["profit"]["mae"],
        "success_auc": metrics["success"]["auc"],
        "rule_auc_fund_apr": metrics["success"]["rule_auc_fund_apr"],
        "hold_mae_hours": hold.get("classifier_mae_hours"),
        "hold_baseline_median_mae_hours": hold.get("baseline_median_mae_hours"),
        "ml_precision_at_k": ml_rule["ml_composite"]["precision_at_k"],
        "rule_precision_at_k": ml_rule["rule"]["precision_at_k"],
        "ml_topk_mean_profit_pct": ml_rule["ml_composite"]["mean_profit_pct"],
        "rule_topk_mean_profit_pct": ml_rule["rule"]["mean_profit_pct"],
        "all_entries_mean_profit_pct": ml_rule["all_entries"]["mean_profit_pct"],
    }
