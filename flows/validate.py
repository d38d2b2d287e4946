"""Prefect flow ``validate``: the great-expectations gate over the raw store (or one file); stops the DAG on failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import params_with
from tasks.market import validate_data


@flow(name="validate", log_prints=True)
def validate_flow(params_path: str = "params.yaml", target: str | None = None) -> dict[str, Any]:
    params = params_with(params_path)
    report = str(Path(params.market.reports_dir) / "validation.json")
    return validate_data(target or params.market.data_dir, params.validation, report)


if __name__ == "__main__":
    validate_flow()
