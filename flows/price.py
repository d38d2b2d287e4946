"""Prefect flows of the price-model branch and of export / register, one per DVC stage (same names)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import params_with
from tasks.export import export_task, register_task
from tasks.price import price_features_task, train_price_keras_task, train_price_lgbm_task


@flow(name="price_features", log_prints=True)
def price_features_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return price_features_task(params_with(params_path))


@flow(name="train_price_lgbm", log_prints=True)
def train_price_lgbm_flow(params_path: str = "params.yaml", horizon_minutes: int | None = None) -> dict[str, Any]:
    return train_price_lgbm_task(params_with(params_path, price={"horizon_minutes": horizon_minutes}))


@flow(name="train_price_keras", log_prints=True)
def train_price_keras_flow(params_path: str = "params.yaml", epochs: int | None = None) -> dict[str, Any]:
    return train_price_keras_task(params_with(params_path, price_keras={"epochs": epochs}))


@flow(name="export", log_prints=True)
def export_flow(family: str, params_path: str = "params.yaml") -> dict[str, Any]:
    return export_task(params_with(params_path), family)


@flow(name="register", log_prints=True)
def register_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return register_task(params_with(params_path))
