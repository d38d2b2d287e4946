"""Prefect tasks of the funding-arbitrage branch: snapshots -> simulate -> opportunity_features -> train_opportunity.

Paths are fixed here and in dvc.yaml (the stage outputs); each task reads its inputs, makes one call
into ``cryptoml.simulate`` / ``cryptoml.features`` / ``cryptoml.models``, writes its outputs atomically
and a small metrics JSON under ``reports/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cryptoml.atomic import atomic_write_text
from cryptoml.config import Params, SimulateParams
from cryptoml.errors import ConfigError
from cryptoml.frames import read_frame, write_frame
from cryptoml.market.store import ParquetStore

if TYPE_CHECKING:
    import pandas as pd

    from cryptoml.simulate.positions import FundingEvents, PricePaths, SimulationResult

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


@dataclass(frozen=True)
class SimulationInputs:
    """What every simulation chunk reads: the opportunities (row order kept) and the market paths."""

    opportunities: pd.DataFrame
    prices: PricePaths
    funding: FundingEvents


def simulation_chunks(n_opportunities: int, n_holds: int, chunk_positions: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` row ranges of the opportunities, in order, each simulating at most ``chunk_positions``
    positions (opportunity x hold; at least one opportunity per chunk). No opportunity -> one empty chunk.

    Every position depends only on its own opportunity and the market paths, so simulating the chunks
    anywhere and concatenating them in this order gives the frame one call over all rows would.
    """
    if n_opportunities <= 0:
        return [(0, 0)]
    per_chunk = max(1, chunk_positions // max(1, n_holds))
    return [(lo, min(lo + per_chunk, n_opportunities)) for lo in range(0, n_opportunities, per_chunk)]


def merge_simulations(parts: Sequence[SimulationResult]) -> SimulationResult:
    """Concatenate chunk results in chunk order and add up their drop counts (at least one part)."""
    import pandas as pd

    from cryptoml.simulate.positions import SimulationResult

    if not parts:
        raise ValueError("merge_simulations needs at least one chunk result")
    # An empty chunk's frame has untyped (object) columns: leave it out so the dtypes stay the data's.
    frames = [part.positions for part in parts if len(part.positions)]
    positions = pd.concat(frames, ignore_index=True) if frames else parts[0].positions
    return SimulationResult(
        positions,
        dropped_past_data=sum(part.dropped_past_data for part in parts),
        dropped_gap=sum(part.dropped_gap for part in parts),
    )


@task(name="simulate-inputs", cache_policy=NO_CACHE)
def load_simulation_inputs_task(params: Params) -> SimulationInputs:
    """Read the opportunities and the stored market once; build the price paths and funding events."""
    from cryptoml.simulate.positions import build_funding_events, build_price_paths
    from cryptoml.simulate.snapshots import load_market_frames

    exchanges, bases, quote = universe(params)
    snaps = read_frame(SNAPSHOTS, "snapshots")
    opps = read_frame(OPPORTUNITIES, "opportunities")
    frames = load_market_frames(
        ParquetStore(params.market.data_dir), exchanges, bases, quote, timeframe=params.market.timeframe
    )
    prices = build_price_paths(frames, snaps)
    return SimulationInputs(opps, prices, build_funding_events(frames, prices))


# NO_CACHE: the inputs are large frames, and hashing them for a cache key would cost more than the chunk.
@task(name="simulate-chunk", cache_policy=NO_CACHE)
def simulate_chunk_task(
    opportunities: pd.DataFrame, prices: PricePaths, funding: FundingEvents, simulate: SimulateParams
) -> SimulationResult:
    """Simulate one chunk of opportunities at every hold duration (runs on any task runner worker)."""
    from cryptoml.simulate.positions import simulate_positions

    return simulate_positions(opportunities, prices, funding, simulate)


@task(name="simulate-write", cache_policy=NO_CACHE)
def write_positions_task(params: Params, parts: Sequence[SimulationResult], elapsed_s: float) -> dict[str, Any]:
    """Write ``data/positions.parquet`` from the chunk results (chunk order) and ``reports/simulate.json``.

    Positions past the data are dropped and counted; ``elapsed_s`` is the fan-out's wall time (logged only,
    so the metrics file stays byte-stable).
    """
    result = merge_simulations(parts)
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
        "simulate: %d positions in %.2f s over %d chunk(s) (%d dropped past the data, %d across gaps)",
        len(positions),
        elapsed_s,
        len(parts),
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
