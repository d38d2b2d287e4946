"""Prefect tasks of the price-model branch: price_features -> train_price_lgbm / train_price_keras.

Paths are fixed here and in dvc.yaml. ``price_features`` stores the 1-minute bars of ``price.symbol`` with
their 19 technical features (the batch definitions of :mod:`cryptoml.features.technical`) and the
sentiment table (synthetic, from a file, or empty); each training task reads them, fits, writes the native
model, its metrics and its **holdout** (the test window, :func:`holdout_path`), which the export stage
uses for the parity gate and the registry for comparing versions on the same data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import task

from cryptoml.atomic import atomic_write_text
from cryptoml.config import Params
from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.frames import read_frame, write_frame
from cryptoml.market.store import DatasetKey, ParquetStore

log = logging.getLogger("cryptoml")

PRICE_FEATURES = Path("data/price_features.parquet")
SENTIMENT = Path("data/sentiment.parquet")
NATIVE_DIR = Path("models/native")
REPORT_DIR = Path("reports")


def holdout_path(family: str, model_name: str) -> Path:
    """The test window of one model, beside its native model: ``models/native/<family>/<name>.holdout.npz``."""
    return NATIVE_DIR / family / f"{model_name}.holdout.npz"


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n", path)
    return path


def _bars(params: Params) -> Any:
    """The stored 1-minute bars of price.exchange / price.symbol (clear error naming what is stored)."""
    store = ParquetStore(params.market.data_dir)
    key = DatasetKey(params.price.exchange, params.price.symbol, "ohlcv", params.market.timeframe)
    if not store.exists(key):
        stored = sorted(k.label() for k in store.datasets() if k.kind == "ohlcv")
        raise DataValidationError(
            f"price: no stored {key.label()} under {params.market.data_dir} (set price.exchange / price.symbol "
            f"to one of: {stored[:12]})"
        )
    if params.market.timeframe != "1m":
        raise ConfigError(f"price models learn from 1-minute bars; market.timeframe is {params.market.timeframe!r}")
    return store.read(key)


@task(name="price_features")
def price_features_task(params: Params) -> dict[str, Any]:
    """Bars + 19 technical features of the price symbol, and the sentiment table the Keras variant reads."""
    from cryptoml.features.technical import TECHNICAL_FEATURES, technical_features
    from cryptoml.models.sentiment import empty_sentiment_table, load_sentiment_table, synthetic_sentiment

    bars = _bars(params)
    feats = technical_features(bars)
    table = bars.reset_index(drop=True).join(feats[["is_warmup", *TECHNICAL_FEATURES]].reset_index(drop=True))
    source = params.price_keras.sentiment
    if source == "synthetic":
        sentiment = synthetic_sentiment(bars["ts_ms"], bars["close"], seed=params.synthetic.seed)
    elif source == "none":
        sentiment = empty_sentiment_table()
    else:
        sentiment = load_sentiment_table(source)
    tag = {"synthetic": "true"} if params.market.source == "synthetic" else {}
    write_frame(table, PRICE_FEATURES, tag)
    write_frame(sentiment, SENTIMENT, {"sentiment_source": source if source in ("synthetic", "none") else "file"})
    metrics = {
        "bars": len(table),
        "warmup_bars": int(table["is_warmup"].sum()),
        "features": len(TECHNICAL_FEATURES),
        "sentiment_rows": len(sentiment),
        "sentiment_source": source if source in ("synthetic", "none") else "file",
    }
    _write_json(REPORT_DIR / "price_features.json", metrics)
    log.info(
        "price_features: %d bars of %s %s, %d sentiment readings (%s)",
        len(table),
        params.price.exchange,
        params.price.symbol,
        len(sentiment),
        metrics["sentiment_source"],
    )
    return metrics


def _training_window(ts_first: int, ts_last: int) -> dict[str, int]:
    return {"start_ms": int(ts_first), "end_ms": int(ts_last)}


@task(name="train_price_lgbm")
def train_price_lgbm_task(params: Params) -> dict[str, Any]:
    """LightGBM forward-return model: native booster, metrics vs baselines, holdout, MLflow run."""
    from cryptoml.features.technical import TECHNICAL_FEATURES
    from cryptoml.lineage import data_hash, git_commit
    from cryptoml.models.holdout import Holdout, save_holdout
    from cryptoml.models.price_lgbm import train_price_lgbm
    from tasks import tracking

    table = read_frame(PRICE_FEATURES, "price features")
    ohlcv = table[["ts_ms", "open", "high", "low", "close", "volume"]]
    p = params.price
    report_dir = REPORT_DIR / "price_lgbm"
    result = train_price_lgbm(
        ohlcv,
        p.horizon_minutes,
        train_frac=p.train_frac,
        valid_frac=p.valid_frac,
        threshold_bps=p.threshold_bps,
        out_dir=report_dir,
        features=table[["is_warmup", *TECHNICAL_FEATURES]],
        **vars(params.price_lgbm),
    )
    native = NATIVE_DIR / "price_lgbm"
    native.mkdir(parents=True, exist_ok=True)
    result.model.booster_.save_model(str(native / "model.txt"))
    assert result.test is not None
    save_holdout(
        holdout_path("price_lgbm", "price_lgbm"),
        Holdout(
            X=result.test.X.to_numpy(dtype="float32"),
            y=result.test.y,
            ts_ms=result.test.ts_ms,
            feature_names=tuple(result.feature_names),
            metric="ic",
            label=f"log_return_next_{result.horizon_minutes}m",
        ),
    )
    data = data_hash(PRICE_FEATURES)
    split = result.split
    meta = {
        "feature_names": list(result.feature_names),
        "horizon_minutes": result.horizon_minutes,
        "label": f"ln(close[t+{result.horizon_minutes}m] / close[t]), t = bar open; features known at t's close",
        "training_window": _training_window(split["train"]["first_ts_ms"], split["train"]["last_ts_ms"]),
        "split": split,
        "symbol": f"{p.exchange} {p.symbol}",
        "data": data,
        "metrics": headline_lgbm(result.metrics),
    }
    _write_json(native / "meta.json", meta)
    headline = headline_lgbm(result.metrics)
    _write_json(REPORT_DIR / "train_price_lgbm.json", headline)
    tags = {"stage": "train_price_lgbm", "git_commit": git_commit(), "data_md5": data["md5"]}
    run_params = {
        "price": vars(p),
        "price_lgbm": vars(params.price_lgbm),
        "best_iteration": result.metrics["best_iteration"],
    }
    with tracking.training_run("price_lgbm", "train_price_lgbm", run_params, tags) as mlflow:
        mlflow.log_metrics(tracking.numeric_metrics(result.metrics))
        mlflow.log_metric("fit_seconds", result.fit_seconds)
        mlflow.log_artifacts(str(report_dir), "reports")
        mlflow.log_artifacts(str(native), "native_model")
        run_id = mlflow.active_run().info.run_id
    log.info(
        "train_price_lgbm: IC %.4f (persistence %.4f), MLflow run %s",
        headline["ic"],
        headline["persistence_ic"],
        run_id,
    )
    return {**headline, "mlflow_run_id": run_id}


def headline_lgbm(metrics: dict[str, Any]) -> dict[str, Any]:
    test = metrics["test"]
    return {
        "rmse": test["model"]["rmse"],
        "zero_rmse": test["zero"]["rmse"],
        "ic": test["model"]["ic"],
        "persistence_ic": test["persistence"]["ic"],
        "directional_accuracy": test["model"]["directional_accuracy"],
        "persistence_directional_accuracy": test["persistence"]["directional_accuracy"],
        "rule_sharpe": test["model"]["sharpe"],
        "persistence_rule_sharpe": test["persistence"]["sharpe"],
        "best_iteration": metrics["best_iteration"],
        "horizon_minutes": metrics["horizon_minutes"],
    }


@task(name="train_price_keras")
def train_price_keras_task(params: Params) -> dict[str, Any]:
    """Keras CNN+LSTM (price-only, and with sentiment when the table covers the bars): native models, holdouts."""
    from cryptoml.lineage import data_hash, git_commit
    from cryptoml.models.holdout import Holdout, save_holdout
    from cryptoml.models.price_keras import TARGET_NAME, save_keras_model, train_price_keras
    from tasks import tracking

    table = read_frame(PRICE_FEATURES, "price features")
    ohlcv = table[["ts_ms", "open", "high", "low", "close", "volume"]]
    sentiment = read_frame(SENTIMENT, "sentiment table")
    k = params.price_keras
    report_dir = REPORT_DIR / "price_keras"
    result = train_price_keras(
        ohlcv,
        sentiment=sentiment if len(sentiment) else None,
        window=k.window_bars,
        epochs=k.epochs,
        batch_size=k.batch_size,
        max_windows=k.max_windows,
        max_eval_windows=k.max_eval_windows,
        train_frac=params.price.train_frac,
        valid_frac=params.price.valid_frac,
        learning_rate=k.learning_rate,
        patience=k.patience or None,
        sentiment_max_age_ms=k.sentiment_max_age_minutes * 60_000,
        seed=k.seed,
        out_dir=report_dir,
    )
    log.info("train_price_keras: %s", result.sentiment_reason)
    native = NATIVE_DIR / "price_keras"
    if native.exists():  # a variant trained last time but not now must not linger in the output
        import shutil

        shutil.rmtree(native)
    data = data_hash(PRICE_FEATURES)
    headline: dict[str, Any] = {"sentiment_reason": result.sentiment_reason, "models": sorted(result.models)}
    for name, model in result.models.items():
        out = native / name
        out.mkdir(parents=True, exist_ok=True)
        save_keras_model(model.keras_model, out / "model.keras")
        save_holdout(
            holdout_path("price_keras", name),
            Holdout(
                X=model.test_windows,
                y=model.test_y,
                ts_ms=model.test_ts_ms,
                feature_names=model.feature_names,
                metric="mse",
                label=TARGET_NAME,
            ),
        )
        test = model.metrics["test"]
        headline[name] = {
            "mse": test["model"]["mse"],
            "persistence_mse": test["persistence"]["mse"],
            "zero_mse": test["zero"]["mse"],
            "directional_accuracy": test["model"]["directional_accuracy"],
            "persistence_directional_accuracy": test["persistence"]["directional_accuracy"],
            "r2": test["model"]["r2"],
            "epochs_run": model.metrics["epochs_run"],
        }
        fit = model.split["fit_end_ts_ms"]
        meta = {
            "feature_names": list(model.feature_names),
            "window_bars": model.window_bars,
            "label": f"{TARGET_NAME}: ln(close[t+1] / close[t]) of the window's last bar t",
            "scaler": model.scaling.to_dict(),
            "training_window": _training_window(fit[0], fit[1]),
            "split": model.split,
            "data": data,
            "metrics": headline[name],
        }
        _write_json(out / "meta.json", meta)
    # The missing variant is absent from the index: a stale holdout of it would be ignored by export.
    _write_json(REPORT_DIR / "train_price_keras.json", headline)
    tags = {"stage": "train_price_keras", "git_commit": git_commit(), "data_md5": data["md5"]}
    run_params = {
        "price_keras": vars(k),
        "price.train_frac": params.price.train_frac,
        "price.valid_frac": params.price.valid_frac,
        "variants": ",".join(sorted(result.models)),
    }
    with tracking.training_run("price_keras", "train_price_keras", run_params, tags) as mlflow:
        for name, model in result.models.items():
            mlflow.log_metrics({f"{name}.{key}": v for key, v in tracking.numeric_metrics(model.metrics).items()})
        mlflow.set_tag("sentiment_reason", result.sentiment_reason)
        mlflow.log_artifacts(str(report_dir), "reports")
        run_id = mlflow.active_run().info.run_id
    return {**headline, "mlflow_run_id": run_id}
