"""Prefect flow ``pipeline``: the whole DAG as one flow of sub-flows (the same stages as dvc.yaml)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.backfill import backfill_flow
from flows.opportunity import opportunity_features_flow, simulate_flow, snapshots_flow, train_opportunity_flow
from flows.validate import validate_flow


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    backfill = backfill_flow(params_path=params_path)
    validation = validate_flow(params_path=params_path)
    snapshots = snapshots_flow(params_path=params_path)
    simulate = simulate_flow(params_path=params_path)
    features = opportunity_features_flow(params_path=params_path)
    train = train_opportunity_flow(params_path=params_path)
    return {
        "backfill": backfill,
        "validate": validation,
        "snapshots": snapshots,
        "simulate": simulate,
        "opportunity_features": features,
        "train_opportunity": train,
    }


if __name__ == "__main__":
    pipeline_flow()
