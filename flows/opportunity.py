"""Prefect flows of the funding-arbitrage branch, one per DVC stage (same names)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import params_with
from tasks.opportunity import build_snapshots_task, features_task, simulate_task, train_task


@flow(name="snapshots", log_prints=True)
def snapshots_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return build_snapshots_task(params_with(params_path))


@flow(name="simulate", log_prints=True)
def simulate_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return simulate_task(params_with(params_path))


@flow(name="opportunity_features", log_prints=True)
def opportunity_features_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return features_task(params_with(params_path))


@flow(name="train_opportunity", log_prints=True)
def train_opportunity_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return train_task(params_with(params_path))
