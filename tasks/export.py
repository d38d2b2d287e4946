"""Prefect tasks ``export`` and ``register``: native models -> ONNX bundles (parity-gated) -> MLflow registry.

One export per model family (``opportunity``, ``price_lgbm``, ``price_keras``), so a change in one branch
re-exports only that branch's bundles. Each bundle is ``models/<name>/model.onnx`` + ``model_meta.json``;
the parity gate runs on the model's holdout (its whole test window). A Keras variant that was not trained
(no sentiment table) leaves ``models/<name>/NOT_TRAINED.json`` naming why, instead of a bundle.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from cryptoml.atomic import atomic_write_text
from cryptoml.config import Params
from cryptoml.errors import ConfigError, ModelContractError
from tasks.price import NATIVE_DIR, REPORT_DIR, holdout_path

log = logging.getLogger("cryptoml")

MODELS_DIR = Path("models")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registered model name = bundle folder under models/
    family: str  # export unit = folder under models/native/
    kind: str  # bundle kind (cryptoml.export.bundle.KINDS)


MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("opportunity_profit", "opportunity", "xgboost_regressor"),
    ModelSpec("opportunity_success", "opportunity", "xgboost_classifier"),
    ModelSpec("opportunity_hold", "opportunity", "xgboost_multiclass"),
    ModelSpec("price_lgbm", "price_lgbm", "lightgbm_regressor"),
    ModelSpec("price_cnn_lstm", "price_keras", "keras_sequence"),
    ModelSpec("price_cnn_lstm_sentiment", "price_keras", "keras_sequence"),
)
FAMILIES = tuple(dict.fromkeys(s.family for s in MODEL_SPECS))
NOT_TRAINED = "NOT_TRAINED.json"


def bundle_dir(name: str) -> Path:
    return MODELS_DIR / name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelContractError(f"{path}: missing; run the training stage first") from e
    except json.JSONDecodeError as e:
        raise ModelContractError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelContractError(f"{path}: expected a JSON object")
    return data


def _native(spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    """The native model of ``spec`` and the meta_extra of its bundle (label, window, data hash, metrics...)."""
    base = NATIVE_DIR / spec.family
    if spec.family == "opportunity":
        import xgboost as xgb

        meta = _read_json(base / "meta.json")
        short = spec.name.removeprefix("opportunity_")
        booster = xgb.Booster()
        booster.load_model(str(base / f"{short}.json"))
        split = meta["split"]
        extra: dict[str, Any] = {
            "label": {
                "profit": {"name": "actual_profit_pct", "definition": "realised profit of the position, % of notional"},
                "success": {"name": "was_profitable", "definition": "P(actual_profit_pct > 0)"},
                "hold": {"name": "best_hold_hours", "definition": "best simulated hold, hours; classes = hold grid"},
            }[short],
            "training_window": {
                "start_ms": split["first_entry_ms"]["train"],
                "end_ms": split["last_entry_ms"]["train"],
            },
            "data_hash": meta["data"],
            "metrics": meta.get("metrics", {}).get(short, {}),
            "feature_names": meta["hold_feature_names"] if short == "hold" else meta["feature_names"],
            "synthetic": bool(meta.get("synthetic", False)),
            # payoff inputs of the Kelly size (training window's mean win / loss, % of notional)
            "sizing": meta["sizing"],
        }
        if short == "hold":
            extra["classes"] = meta["holds"]
        return booster, extra
    if spec.family == "price_lgbm":
        import lightgbm as lgb

        meta = _read_json(base / "meta.json")
        lgb_booster = lgb.Booster(model_file=str(base / "model.txt"))
        extra = {
            "label": {
                "name": f"log_return_{meta['horizon_minutes']}m",
                "definition": meta["label"],
                "horizon_minutes": meta["horizon_minutes"],
            },
            "horizon_minutes": meta["horizon_minutes"],
            "training_window": meta["training_window"],
            "data_hash": meta["data"],
            "metrics": meta["metrics"],
            "feature_names": meta["feature_names"],
            "symbol": meta["symbol"],
        }
        return lgb_booster, extra
    import keras

    meta = _read_json(base / spec.name / "meta.json")
    model = keras.models.load_model(base / spec.name / "model.keras", compile=False)
    extra = {
        "label": {"name": "log_return_next_bar", "definition": meta["label"], "horizon_minutes": 1},
        "horizon_minutes": 1,
        "window_bars": meta["window_bars"],
        "training_window": meta["training_window"],
        "data_hash": meta["data"],
        "metrics": meta["metrics"],
        "feature_names": meta["feature_names"],
        "scaler": meta["scaler"],
    }
    return model, extra


def export_one(spec: ModelSpec) -> dict[str, Any]:
    """Export one model to its bundle folder (parity-gated on its holdout); returns a summary row."""
    from cryptoml.export.convert import export_model
    from cryptoml.models.holdout import load_holdout

    out = bundle_dir(spec.name)
    if spec.family == "price_keras" and not (NATIVE_DIR / spec.family / spec.name).exists():
        reason = _read_json(REPORT_DIR / "train_price_keras.json").get("sentiment_reason", "not trained")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        atomic_write_text(json.dumps({"name": spec.name, "reason": reason}, indent=2) + "\n", out / NOT_TRAINED)
        log.info("export %s: not trained (%s)", spec.name, reason)
        return {"name": spec.name, "exported": False, "reason": reason}
    model, extra = _native(spec)
    holdout = load_holdout(holdout_path(spec.family, spec.name))
    X = holdout.X
    if spec.kind == "keras_sequence":
        from cryptoml.models.price_keras import MinMaxScaling

        X = MinMaxScaling.from_dict(extra["scaler"]).transform(X)  # the network sees scaled windows
    if list(holdout.feature_names) != list(extra["feature_names"]):
        raise ModelContractError(f"export {spec.name}: the holdout's features differ from the model's")
    extra["holdout"] = {"metric": holdout.metric, "rows": len(holdout.y)}
    if out.exists():
        shutil.rmtree(out)  # export_model writes the folder atomically; a stale NOT_TRAINED must go
    export_model(spec.kind, model, X, out, spec.name, extra)
    meta = _read_json(out / "model_meta.json")
    row = {
        "name": spec.name,
        "exported": True,
        "kind": spec.kind,
        "parity_max_abs_diff": meta["parity"]["max_abs_diff"],
        "parity_tolerance": meta["parity"]["tolerance"],
        "holdout_rows": len(holdout.y),
    }
    log.info(
        "export %s: parity %.2e (tolerance %.0e) on %d rows",
        spec.name,
        row["parity_max_abs_diff"],
        row["parity_tolerance"],
        row["holdout_rows"],
    )
    return row


@task(name="export")
def export_task(params: Params, family: str) -> dict[str, Any]:
    """Export every model of one family (``opportunity`` | ``price_lgbm`` | ``price_keras``)."""
    if family not in FAMILIES:
        raise ConfigError(f"export: unknown model family {family!r} (one of {list(FAMILIES)})")
    rows = [export_one(spec) for spec in MODEL_SPECS if spec.family == family]
    path = REPORT_DIR / "export" / f"{family}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({r["name"]: r for r in rows}, indent=2, sort_keys=True) + "\n", path)
    return {"family": family, "models": rows}


@task(name="register")
def register_task(params: Params) -> dict[str, Any]:
    """Register every exported bundle (idempotent by checksum) as `challenger`; write reports/registry.json."""
    from tasks import registry

    rows: dict[str, Any] = {}
    for spec in MODEL_SPECS:
        folder = bundle_dir(spec.name)
        if (folder / NOT_TRAINED).exists():
            rows[spec.name] = {"registered": False, "reason": _read_json(folder / NOT_TRAINED)["reason"]}
            continue
        result = registry.register_bundle(
            folder, holdout_path(spec.family, spec.name), promote_first=params.registry.promote_first
        )
        rows[spec.name] = {
            "registered": True,
            "version": int(result.version),
            "new_version": bool(result.created),
            "metric": result.metric,
            "holdout_value": float(result.holdout_value),
            "aliases": sorted(alias for alias, v in registry.aliases(spec.name).items() if v == str(result.version)),
        }
    atomic_write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n", REPORT_DIR / "registry.json")
    return rows
