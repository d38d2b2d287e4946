"""MLflow tracking: the only module of the project that imports mlflow.

Default store ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (MLflow 3 refuses
the plain file store); ``MLFLOW_TRACKING_URI`` points it at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
ARTIFACT_ROOT = Path("mlruns/artifacts")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _mlflow() -> Any:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 honours this (DO_NOT_TRACK only as "true")
    # A tracking server that is down should fail in seconds, not after minutes of default retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return mlflow


def set_experiment(name: str) -> Any:
    """Select (creating if needed) an experiment; local stores keep artifacts under mlruns/artifacts."""
    mlflow = _mlflow()
    if mlflow.get_experiment_by_name(name) is None and tracking_uri() == DEFAULT_TRACKING_URI:
        mlflow.create_experiment(name, artifact_location=(ARTIFACT_ROOT.resolve() / name).as_uri())
    return mlflow.set_experiment(name)


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric leaves of a nested metrics dict, flattened."""
    out = {}
    for k, v in flatten("", metrics).items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(float(v)):
            out[k.replace("@", "_at_")] = float(v)
    return out


@contextlib.contextmanager
def training_run(
    experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
) -> Iterator[Any]:
    """An MLflow run with flattened params and tags; yields the mlflow module for logging."""
    mlflow = _mlflow()
    set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {})):
        flat = {k: str(v)[:500] for k, v in flatten("", dict(params)).items()}
        for chunk_start in range(0, len(flat), 90):
            mlflow.log_params(dict(list(flat.items())[chunk_start : chunk_start + 90]))
        yield mlflow
