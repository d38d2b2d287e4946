"""Keras CNN+LSTM models of the next 1-minute log return from 120-bar windows (price-only and with sentiment).

Network (both variants, :func:`build_price_model`): ``Conv1D(64, 3, relu) -> Conv1D(64, 3, relu) ->
MaxPooling1D(2) -> LSTM(100, return_sequences=True) -> LSTM(100) -> Dense(50, relu) -> Dense(1)``, input
``(batch, 120, n_features)`` float32, trained with Adam on the MSE of the scaled target.

Inputs: ``price_cnn_lstm`` sees the 5 raw bar values ``open high low close volume``;
``price_cnn_lstm_sentiment`` sees those plus the 8 sentiment columns of
:mod:`cryptoml.models.sentiment` (as-of aligned to each bar's close), 13 features in
:data:`~cryptoml.models.sentiment.SENTIMENT_PRICE_FEATURES` order.

Time alignment (bars in the store schema, ``ts_ms`` = bar open): the window ending at bar ``t`` holds bars
``t - 119 .. t`` (known at ``t``'s close); its target is ``ln(close[t + 1] / close[t])``, realised at the
close of bar ``t + 1``. Windows must be gap-free (121 consecutive minutes with the target bar); windows
of the sentiment model must also have a sentiment reading on every bar. Split: time-ordered train /
validation / test windows of window-end time with purge gaps of one bar, so no training label overlaps
a validation label (:func:`cryptoml.models.split.purged_time_split`).

Scaling (:class:`MinMaxScaling`, learn-only): per-feature min and max over the bars of the training span
(first training window's first bar .. last training window's last bar); ``x' = (x - min) / (max - min)``
(range 1 when max == min). Later prices outside the training range map outside [0, 1]: the raw-level
inputs are the issue's choice, and this is their known weakness on trending data. The target is
standardised with the mean and std of the training targets; predictions are mapped back to log returns.

Metrics (test window, log returns): mse, mae, r2 and directional accuracy (sign agreement on non-zero
truths) of the model and of two baselines: ``persistence`` = the last observed 1-bar return
``ln(close[t] / close[t - 1])`` and ``zero`` (no move).

CPU budget: ``max_windows`` keeps only the last N training windows (deterministic), ``max_eval_windows``
N evenly spaced validation / test windows; ``keras.utils.set_random_seed(seed)`` before each model is
built makes two runs give identical weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before importing keras: TensorFlow reads this at import; its C++ start-up chatter is not our log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cryptoml.errors import DataValidationError, ModelContractError
from cryptoml.models.price_lgbm import directional_accuracy
from cryptoml.models.sentiment import (
    PRICE_FEATURES,
    PRICE_ONLY_MODEL,
    SENTIMENT_MODEL,
    SENTIMENT_PRICE_FEATURES,
    align_sentiment,
    choose_price_model,
    validate_sentiment_table,
)
from cryptoml.models.split import purged_time_split

__all__ = [
    "WINDOW_BARS",
    "MinMaxScaling",
    "PriceKerasModel",
    "PriceKerasResult",
    "build_price_model",
    "choose_price_model",
    "fit_scaling",
    "make_windows",
    "regression_report",
    "train_price_keras",
    "window_ends",
]

WINDOW_BARS = 120
BAR_MS = 60_000
TARGET_NAME = "log_return_next_bar"  # ln(close[t + 1] / close[t])


def build_price_model(n_features: int, window: int = WINDOW_BARS, learning_rate: float = 1e-3) -> keras.Model:
    """The CNN+LSTM regressor, compiled (Adam, MSE); call ``keras.utils.set_random_seed`` first for repeatability."""
    if n_features <= 0 or window < 8:
        raise ModelContractError(f"build_price_model: need n_features > 0 and window >= 8, got {n_features}, {window}")
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=(window, n_features), dtype="float32", name="window"),
            layers.Conv1D(64, 3, activation="relu", name="conv1"),
            layers.Conv1D(64, 3, activation="relu", name="conv2"),
            layers.MaxPooling1D(2, name="pool"),
            layers.LSTM(100, return_sequences=True, name="lstm1"),
            layers.LSTM(100, name="lstm2"),
            layers.Dense(50, activation="relu", name="dense"),
            layers.Dense(1, name="next_return"),
        ],
        name="price_cnn_lstm",
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss="mse")
    return model


@dataclass(frozen=True)
class MinMaxScaling:
    """Per-feature min-max scaling of the inputs and standardisation of the target (fitted on train only)."""

    feature_names: tuple[str, ...]
    feature_min: tuple[float, ...]
    feature_max: tuple[float, ...]
    target_mean: float
    target_std: float
    fit_first_ts_ms: int  # bar-open times of the first and last bar the scaler saw
    fit_last_ts_ms: int

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scale a ``(..., n_features)`` array of raw values (feature order as ``feature_names``) -> float32."""
        lo = np.asarray(self.feature_min)
        span = np.asarray(self.feature_max) - lo
        span = np.where(span > 0, span, 1.0)
        return ((np.asarray(values, dtype=np.float64) - lo) / span).astype(np.float32)

    def target_to_scaled(self, y: np.ndarray) -> np.ndarray:
        return ((np.asarray(y, dtype=np.float64) - self.target_mean) / self.target_std).astype(np.float32)

    def target_from_scaled(self, z: np.ndarray) -> np.ndarray:
        """Model output -> log return (float64)."""
        return np.asarray(z, dtype=np.float64).ravel() * self.target_std + self.target_mean

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters (the model bundle's ``scaler`` entry)."""
        return {
            "kind": "minmax",
            "feature_names": list(self.feature_names),
            "feature_min": list(self.feature_min),
            "feature_max": list(self.feature_max),
            "formula": "x_scaled = (x - min) / (max - min), with max - min := 1 where max == min",
            "fit_first_ts_ms": self.fit_first_ts_ms,
            "fit_last_ts_ms": self.fit_last_ts_ms,
            "target": {
                "name": TARGET_NAME,
                "kind": "standard",
                "mean": self.target_mean,
                "std": self.target_std,
                "formula": "log_return = model_output * std + mean",
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MinMaxScaling:
        try:
            target = data["target"]
            return cls(
                feature_names=tuple(data["feature_names"]),
                feature_min=tuple(float(v) for v in data["feature_min"]),
                feature_max=tuple(float(v) for v in data["feature_max"]),
                target_mean=float(target["mean"]),
                target_std=float(target["std"]),
                fit_first_ts_ms=int(data["fit_first_ts_ms"]),
                fit_last_ts_ms=int(data["fit_last_ts_ms"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelContractError(f"MinMaxScaling.from_dict: malformed scaler parameters ({e!r})") from e


def window_ends(ts_ms: np.ndarray, window: int = WINDOW_BARS) -> np.ndarray:
    """Row indices ``t`` whose window ``t - window + 1 .. t`` and target bar ``t + 1`` are consecutive minutes."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    if ts.size < window + 1:
        return np.empty(0, dtype=np.int64)
    t = np.arange(window - 1, ts.size - 1)
    span_ok = ts[t + 1] - ts[t - window + 1] == window * BAR_MS  # window + 1 bars in window + 1 minutes
    return t[span_ok].astype(np.int64)


def make_windows(values: np.ndarray, ends: np.ndarray, window: int = WINDOW_BARS) -> np.ndarray:
    """Windows ``values[t - window + 1 .. t]`` for each ``t`` in ``ends``: shape ``(len(ends), window, F)`` float32."""
    arr = np.asarray(values, dtype=np.float32)
    view = np.lib.stride_tricks.sliding_window_view(arr, window, axis=0)  # (n - window + 1, F, window)
    return np.ascontiguousarray(view[np.asarray(ends) - window + 1].transpose(0, 2, 1))


def fit_scaling(
    values: np.ndarray,
    feature_names: tuple[str, ...],
    ts_ms: np.ndarray,
    train_ends: np.ndarray,
    train_targets: np.ndarray,
    window: int = WINDOW_BARS,
) -> MinMaxScaling:
    """Min / max of each feature over the training span's bars, mean / std of the training targets."""
    first, last = int(train_ends.min()) - window + 1, int(train_ends.max())
    span = np.asarray(values[first : last + 1], dtype=np.float64)
    if not np.isfinite(span).any(axis=0).all():
        raise DataValidationError("fit_scaling: a feature has no finite value in the training span")
    std = float(np.std(train_targets))
    if not (np.isfinite(std) and std > 0):
        raise DataValidationError("fit_scaling: the training targets are constant; nothing to learn")
    return MinMaxScaling(
        feature_names=tuple(feature_names),
        feature_min=tuple(float(v) for v in np.nanmin(span, axis=0)),
        feature_max=tuple(float(v) for v in np.nanmax(span, axis=0)),
        target_mean=float(np.mean(train_targets)),
        target_std=std,
        fit_first_ts_ms=int(ts_ms[first]),
        fit_last_ts_ms=int(ts_ms[last]),
    )


def regression_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """mse, mae (log-return units), r2 (vs the test mean; NaN for < 2 rows) and directional accuracy."""
    yt = np.asarray(y_true, dtype=np.float64).ravel()
    yp = np.asarray(y_pred, dtype=np.float64).ravel()
    err = yt - yp
    sst = float(np.sum((yt - yt.mean()) ** 2)) if yt.size else 0.0
    return {
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
        "r2": 1.0 - float(np.sum(err**2)) / sst if yt.size > 1 and sst > 0 else float("nan"),
        "directional_accuracy": directional_accuracy(yt, yp),
        "rows": float(yt.size),
    }


@dataclass(frozen=True)
class PriceKerasModel:
    """One trained variant: the Keras model, its inputs and scaling, test metrics and training history."""

    name: str
    keras_model: keras.Model  # call as model(x, training=False), x float32 (None, window_bars, n_features), scaled
    feature_names: tuple[str, ...]
    window_bars: int
    scaling: MinMaxScaling
    metrics: dict[str, Any]
    history: dict[str, list[float]]
    split: dict[str, Any]
    fit_seconds: float
    artifacts: dict[str, Path] = field(default_factory=dict)
    # The test windows (raw, unscaled: (n, window_bars, n_features) float32), their targets and window-end
    # bar-open times, for holdout files.
    test_windows: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0), np.float32))
    test_y: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    test_ts_ms: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def predict(self, raw_windows: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Next-bar log return for raw (unscaled) windows of shape ``(n, window_bars, n_features)``."""
        x = np.asarray(raw_windows)
        if x.ndim != 3 or x.shape[1:] != (self.window_bars, len(self.feature_names)):
            raise ModelContractError(
                f"{self.name}: windows must have shape (n, {self.window_bars}, {len(self.feature_names)}), "
                f"got {x.shape}"
            )
        out = self.keras_model.predict(self.scaling.transform(x), batch_size=batch_size, verbose=0)
        return self.scaling.target_from_scaled(out)


@dataclass(frozen=True)
class PriceKerasResult:
    """The trained variants by name (:data:`PRICE_ONLY_MODEL`, maybe :data:`SENTIMENT_MODEL`) and why."""

    models: dict[str, PriceKerasModel]
    sentiment_reason: str  # whether the sentiment variant was trained, and why (not)


def _evenly_spaced(idx: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None or idx.size <= limit:
        return idx
    return idx[np.linspace(0, idx.size - 1, limit).round().astype(np.int64)]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_curve(history: dict[str, list[float]], title: str, path: Path) -> Path:
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for key in ("loss", "val_loss"):
        if history.get(key):
            ax.plot(range(1, len(history[key]) + 1), history[key], marker="o", label=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE of the standardised target")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _train_variant(
    name: str,
    ts: np.ndarray,
    values: np.ndarray,
    close: np.ndarray,
    feature_names: tuple[str, ...],
    *,
    window: int,
    epochs: int,
    batch_size: int,
    max_windows: int | None,
    max_eval_windows: int | None,
    train_frac: float,
    valid_frac: float,
    learning_rate: float,
    patience: int | None,
    seed: int,
    out_dir: Path | None,
) -> PriceKerasModel:
    ends = window_ends(ts, window)
    if ends.size:  # the sentiment variant needs a reading on every bar of the window
        finite = np.isfinite(values).all(axis=1)
        bad_before = np.concatenate(([0], np.cumsum(~finite)))
        ends = ends[bad_before[ends + 1] - bad_before[ends - window + 1] == 0]
    if ends.size < 3:
        raise DataValidationError(f"{name}: only {ends.size} complete {window}-bar windows; need far more bars")
    log_close = np.log(close)
    target = log_close[ends + 1] - log_close[ends]
    last_return = log_close[ends] - log_close[ends - 1]
    tr, va, te = purged_time_split(pd.DataFrame({"ts_ms": ts[ends]}), train_frac, valid_frac, BAR_MS, hold_col=None)
    scaling = fit_scaling(values, feature_names, ts, ends[tr], target[tr], window)
    fit_rows = tr if max_windows is None else tr[-max_windows:]
    va = _evenly_spaced(va, max_eval_windows)
    te = _evenly_spaced(te, max_eval_windows)
    scaled = scaling.transform(np.nan_to_num(values, nan=0.0))  # NaN rows are never inside a kept window

    keras.utils.set_random_seed(seed)
    model = build_price_model(len(feature_names), window, learning_rate)
    callbacks: list[Any] = []
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True))
    started = time.perf_counter()
    fitted = model.fit(
        make_windows(scaled, ends[fit_rows], window),
        scaling.target_to_scaled(target[fit_rows]),
        validation_data=(make_windows(scaled, ends[va], window), scaling.target_to_scaled(target[va])),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        callbacks=callbacks,
        verbose=0,
    )
    fit_seconds = time.perf_counter() - started
    history = {k: [float(v) for v in vals] for k, vals in fitted.history.items()}
    pred = scaling.target_from_scaled(model.predict(make_windows(scaled, ends[te], window), batch_size=1024, verbose=0))
    y_test = target[te]
    metrics: dict[str, Any] = {
        "test": {
            "model": regression_report(y_test, pred),
            "persistence": regression_report(y_test, last_return[te]),
            "zero": regression_report(y_test, np.zeros(te.size)),
        },
        "epochs_run": len(history.get("loss", [])),
        "best_val_loss": min(history["val_loss"]) if history.get("val_loss") else None,
    }
    split = {
        "purge_ms": BAR_MS,
        "train_windows": int(tr.size),
        "fit_windows": int(fit_rows.size),
        "valid_windows": int(va.size),
        "test_windows": int(te.size),
        **{
            f"{part}_end_ts_ms": [int(ts[ends[idx[0]]]), int(ts[ends[idx[-1]]])]
            for part, idx in (("train", tr), ("fit", fit_rows), ("valid", va), ("test", te))
        },
    }
    artifacts: dict[str, Path] = {}
    if out_dir is not None:
        out = Path(out_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        artifacts["training_curve"] = _write_curve(history, f"{name}: loss per epoch", out / "training_curve.png")
        artifacts["scaling"] = out / "scaling.json"
        artifacts["scaling"].write_text(json.dumps(scaling.to_dict(), indent=2, sort_keys=True) + "\n")
        artifacts["metrics"] = out / "metrics.json"
        payload = _json_safe({**metrics, "split": split, "history": history, "features": list(feature_names)})
        artifacts["metrics"].write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return PriceKerasModel(
        name=name,
        keras_model=model,
        feature_names=tuple(feature_names),
        window_bars=window,
        scaling=scaling,
        metrics=metrics,
        history=history,
        split=split,
        fit_seconds=fit_seconds,
        artifacts=artifacts,
        test_windows=make_windows(values, ends[te], window).astype(np.float32),
        test_y=y_test.astype(np.float64),
        test_ts_ms=ts[ends[te]].astype(np.int64),
    )


def _bar_values(ohlcv: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in ("ts_ms", *PRICE_FEATURES) if c not in ohlcv.columns]
    if missing:
        raise DataValidationError(f"train_price_keras: OHLCV frame is missing columns {missing}")
    ts = ohlcv["ts_ms"].to_numpy(dtype=np.int64)
    if ts.size > 1 and (np.diff(ts) <= 0).any():
        raise DataValidationError("train_price_keras: ts_ms must be strictly increasing (sort and deduplicate bars)")
    values = ohlcv[list(PRICE_FEATURES)].to_numpy(dtype=np.float64)
    close = values[:, PRICE_FEATURES.index("close")]
    if not np.isfinite(values).all() or (close <= 0).any():
        raise DataValidationError("train_price_keras: OHLCV values must be finite and closes > 0")
    return ts, values


def train_price_keras(
    ohlcv: pd.DataFrame,
    *,
    sentiment: pd.DataFrame | None = None,
    window: int = WINDOW_BARS,
    epochs: int = 5,
    batch_size: int = 128,
    max_windows: int | None = 5000,
    max_eval_windows: int | None = 2000,
    train_frac: float = 0.7,
    valid_frac: float = 0.15,
    learning_rate: float = 1e-3,
    patience: int | None = 3,
    sentiment_max_age_ms: int | None = None,
    seed: int = 42,
    out_dir: Path | None = None,
) -> PriceKerasResult:
    """Train the price-only CNN+LSTM and, when a sentiment table is given, the 13-feature variant.

    ``ohlcv``: one symbol's 1-minute bars (store schema, sorted). ``sentiment``: a table in the schema
    of :mod:`cryptoml.models.sentiment` (validated here; invalid -> :class:`DataValidationError`) or
    None. If the table covers too few complete windows the sentiment variant is skipped and
    ``sentiment_reason`` says so. With ``out_dir``, each variant writes ``<out_dir>/<name>/``
    ``training_curve.png``, ``scaling.json`` and ``metrics.json``.
    """
    if epochs <= 0 or batch_size <= 0 or (max_windows is not None and max_windows <= 0):
        raise DataValidationError("train_price_keras: epochs, batch_size and max_windows must be > 0")
    ts, price_values = _bar_values(ohlcv)
    close = price_values[:, PRICE_FEATURES.index("close")]
    table = None if sentiment is None else validate_sentiment_table(sentiment)  # fail before any training
    common: dict[str, Any] = {
        "window": window,
        "epochs": epochs,
        "batch_size": batch_size,
        "max_windows": max_windows,
        "max_eval_windows": max_eval_windows,
        "train_frac": train_frac,
        "valid_frac": valid_frac,
        "learning_rate": learning_rate,
        "patience": patience,
        "seed": seed,
        "out_dir": out_dir,
    }
    models = {PRICE_ONLY_MODEL: _train_variant(PRICE_ONLY_MODEL, ts, price_values, close, PRICE_FEATURES, **common)}
    if table is None:
        return PriceKerasResult(models, "no sentiment table: trained only the price-only model")
    values = np.hstack([price_values, align_sentiment(ts, table, sentiment_max_age_ms)])
    try:
        models[SENTIMENT_MODEL] = _train_variant(SENTIMENT_MODEL, ts, values, close, SENTIMENT_PRICE_FEATURES, **common)
    except DataValidationError as e:
        return PriceKerasResult(models, f"sentiment table covers too few bars, trained only the price-only model: {e}")
    return PriceKerasResult(models, "sentiment table given: trained the price-only and the sentiment models")


def save_keras_model(model: keras.Model, path: Path) -> Path:
    """Save ``model`` as a ``.keras`` archive, atomically and byte-stable (same weights -> same bytes).

    Keras stamps ``metadata.json`` with the save time, the weights entry with the zip's clock and
    ``config.json`` with ``shared_object_id`` values that are Python object addresses; all are normalised
    (``date_saved`` dropped, every entry dated 1980-01-01, ids renumbered 1, 2, ... in order of first
    appearance, which keeps which objects are shared) so a DVC output does not change when the model
    does not.
    """
    import tempfile
    import zipfile

    from cryptoml.atomic import atomic_path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        raw = Path(tmp) / "raw.keras"
        model.save(raw)
        with zipfile.ZipFile(raw) as src, atomic_path(target) as out, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                elif info.filename == "config.json":
                    data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
                entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type = info.compress_type
                entry.external_attr = info.external_attr
                dst.writestr(entry, data)
    return target


def _renumber_shared_objects(config: Any) -> Any:
    """``config`` with every ``shared_object_id`` replaced by its rank of first appearance (1, 2, ...)."""
    ranks: dict[Any, int] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "shared_object_id":
                    out[key] = ranks.setdefault(value, len(ranks) + 1)
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(config)
