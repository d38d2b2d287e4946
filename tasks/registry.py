"""MLflow model registry: register ONNX bundles as `challenger`, promote to `champion`, compare versions.

Consumers follow the aliases, never version numbers, so moving `champion` in the MLflow UI is as valid a
promotion as `cryptoml promote`. Each version carries its bundle (``bundle/model.onnx`` +
``bundle/model_meta.json`` as run artifacts, the same files the edge runner downloads) and tags naming
its holdout metric, so a promotion compares challenger and champion on the same metric.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptoml.errors import ConfigError, ModelContractError
from tasks import tracking

CHAMPION = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "registry"


@dataclass(frozen=True)
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    challenger_value: float
    champion_value: float | None
    metric: str


def _client() -> Any:
    mlflow = tracking._mlflow()
    return mlflow.MlflowClient()


def register_bundle(bundle_dir: Path, name: str, metric: str, value: float, higher_is_better: bool) -> str:
    """Log the bundle as an MLflow model version of ``name``, alias it `challenger`; returns the version."""
    import onnx

    from cryptoml.export.bundle import load_bundle

    bundle = load_bundle(bundle_dir)  # refuses a corrupt or inconsistent bundle before registering it
    tracking.set_experiment(EXPERIMENT)
    mlflow = tracking._mlflow()
    with mlflow.start_run(run_name=f"register-{name}") as run:
        info = mlflow.onnx.log_model(
            onnx.load_from_string((bundle_dir / "model.onnx").read_bytes()),
            name="model",
            registered_model_name=name,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
        mlflow.log_artifacts(str(bundle_dir), artifact_path="bundle")
        mlflow.log_metric(f"holdout.{metric}", float(value))
        mlflow.set_tags({"model_name": name, "git_commit": str(bundle.meta.get("git_commit", ""))})
        run_id = run.info.run_id
    version = str(info.registered_model_version)
    client = _client()
    for key, tag in (
        ("holdout_metric", metric),
        ("holdout_value", repr(float(value))),
        ("higher_is_better", str(bool(higher_is_better)).lower()),
        ("bundle_run_id", run_id),
        ("feature_names", json.dumps(bundle.meta["feature_names"])),
    ):
        client.set_model_version_tag(name, version, key, tag)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def _score(client: Any, name: str, version: str) -> tuple[str, float, bool]:
    tags = client.get_model_version(name, version).tags
    try:
        return tags["holdout_metric"], float(tags["holdout_value"]), tags["higher_is_better"] == "true"
    except KeyError as e:
        raise ModelContractError(f"{name} v{version} has no holdout tags ({e}); was it registered by cryptoml?") from e


def verify_version(name: str, version: str) -> dict[str, Any]:
    """Download a version's bundle and load it (checksum, meta, onnxruntime); returns its meta."""
    from cryptoml.export.bundle import load_bundle

    client = _client()
    run_id = client.get_model_version(name, version).tags.get("bundle_run_id")
    if not run_id:
        raise ModelContractError(f"{name} v{version} has no bundle_run_id tag: no bundle to verify")
    expected = json.loads(client.get_model_version(name, version).tags.get("feature_names", "null"))
    mlflow = tracking._mlflow()
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="bundle", dst_path=tmp)
        bundle = load_bundle(Path(local), expected_features=expected)
        return dict(bundle.meta)


def promote(
    name: str, version: str | None = None, *, margin: float = 0.0, force: bool = False, reason: str | None = None
) -> Decision:
    """Move `champion` to ``version`` (default: the `challenger`) if it beats the champion by ``margin``."""
    if force and not reason:
        raise ConfigError("--force needs --reason explaining why the metric check is overridden")
    client = _client()
    if version is None:
        try:
            version = str(client.get_model_version_by_alias(name, CHALLENGER).version)
        except Exception as e:
            raise ModelContractError(f"{name} has no '{CHALLENGER}' alias to promote") from e
    verify_version(name, version)
    metric, value, higher = _score(client, name, version)
    champion_value: float | None = None
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:
        champion = None
    if champion is not None and str(champion.version) == version:
        return Decision(name, version, False, "already champion", value, value, metric)
    if champion is None:
        better, why = True, "no champion yet"
    else:
        champ_metric, champion_value, _ = _score(client, name, str(champion.version))
        if champ_metric != metric:
            raise ModelContractError(f"{name}: champion is scored by {champ_metric}, challenger by {metric}")
        gain = (value - champion_value) if higher else (champion_value - value)
        better = gain > margin
        sign = "+" if gain >= 0 else ""
        why = f"{metric} {value:.6g} vs champion {champion_value:.6g} ({sign}{gain:.6g}, margin {margin:g})"
    promoted = better or force
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "promotion", "forced" if (force and not better) else "metric")
        if force and not better:
            client.set_model_version_tag(name, version, "promotion_reason", str(reason))
    else:
        client.set_model_version_tag(name, version, "promotion_refused", why)
    return Decision(name, version, promoted, why, value, champion_value, metric)


def version_summary(name: str, version: str) -> dict[str, Any]:
    """Tags, holdout metric and run metrics of one version, for `cryptoml compare`."""
    client = _client()
    mv = client.get_model_version(name, version)
    all_aliases = client.get_registered_model(name).aliases
    aliases = [alias for alias, v in all_aliases.items() if str(v) == version]
    run_metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return {"version": version, "aliases": aliases, "tags": dict(mv.tags), "metrics": dict(run_metrics)}
