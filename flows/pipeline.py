"""Prefect flow ``pipeline``: the whole DAG as one flow of sub-flows (the same stages as dvc.yaml)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.backfill import backfill_flow
from flows.backtest import backtest_flow
from flows.opportunity import opportunity_features_flow, simulate_flow, snapshots_flow, train_opportunity_flow
from flows.price import export_flow, price_features_flow, register_flow, train_price_keras_flow, train_price_lgbm_flow
from flows.validate import validate_flow
from tasks.export import FAMILIES


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """backfill -> validate -> snapshots -> simulate -> features -> train (3) -> export -> register -> backtest."""
    out: dict[str, Any] = {}
    out["backfill"] = backfill_flow(params_path=params_path)
    out["validate"] = validate_flow(params_path=params_path)
    out["snapshots"] = snapshots_flow(params_path=params_path)
    out["simulate"] = simulate_flow(params_path=params_path)
    out["opportunity_features"] = opportunity_features_flow(params_path=params_path)
    out["price_features"] = price_features_flow(params_path=params_path)
    out["train_opportunity"] = train_opportunity_flow(params_path=params_path)
    out["train_price_lgbm"] = train_price_lgbm_flow(params_path=params_path)
    out["train_price_keras"] = train_price_keras_flow(params_path=params_path)
    out["export"] = {family: export_flow(family, params_path=params_path) for family in FAMILIES}
    out["register"] = register_flow(params_path=params_path)
    out["backtest"] = backtest_flow(params_path=params_path)
    return out


if __name__ == "__main__":
    pipeline_flow()
