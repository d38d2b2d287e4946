"""LightGBM model of the forward log return of a 1-minute price series, its metrics and its training entry point.

Time alignment (bars in the store schema: ``ts_ms`` = bar **open** time, epoch ms UTC):

- features of bar ``t``: :func:`cryptoml.features.technical.technical_features`, known at ``t``'s close
  (``ts_ms[t] + 60_000``); warm-up rows are dropped, never filled;
- target of bar ``t``: ``ln(close[t + h] / close[t])`` with ``t + h`` the bar that opened ``h`` minutes after
  ``t`` (looked up by ``ts_ms``, not by row, so a gap never pairs the wrong bars). It starts where the
  features end (``t``'s close) and is realised at the close of bar ``t + h``. Rows whose future bar is
  missing (the last ``h`` rows, or a gap) have no target and are dropped, never filled.

Split: time-ordered train / validation / test windows of bar-open time separated by purge gaps of
``h`` minutes (:func:`cryptoml.models.split.purged_time_split`). The last training label then ends at
the close of the bar just before the first validation bar, so no training label overlaps a validation
(or test) label, which is the minimum that avoids leakage for an ``h``-minute label.

Metrics (:func:`price_metrics`, all on the test window, returns as log returns): RMSE, directional
accuracy, information coefficient and the Sharpe ratio of a threshold rule, for the model and two
baselines: ``zero`` (predict no move) and ``persistence`` (predict that the last ``h`` minutes repeat:
``ln(close[t] / close[t - h])``, known at ``t``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import lightgbm as lgb
import numpy as np
import pandas as pd

from cryptoml.errors import DataValidationError, ModelContractError
from cryptoml.features.technical import BAR_MS, TECHNICAL_FEATURES, technical_features
from cryptoml.models.split import purged_time_split

__all__ = [
    "ForwardReturnModel",
    "PriceDataset",
    "PriceLgbmResult",
    "PriceSplit",
    "directional_accuracy",
    "forward_return_target",
    "information_coefficient",
    "make_price_dataset",
    "non_overlapping_rows",
    "price_metrics",
    "purged_price_split",
    "threshold_rule_sharpe",
    "trailing_return",
    "train_price_lgbm",
]

MINUTES_PER_YEAR = 365 * 24 * 60  # crypto trades 24/7: a year is 525,600 one-minute bars
EvalSet = Sequence[tuple[Any, Any]]


# --- target and dataset ------------------------------------------------------------------------------


def _checked_horizon(horizon_minutes: int) -> int:
    if isinstance(horizon_minutes, bool) or not isinstance(horizon_minutes, int | np.integer) or horizon_minutes <= 0:
        raise DataValidationError(f"horizon_minutes must be a positive integer, got {horizon_minutes!r}")
    return int(horizon_minutes)


def _log_return_by_ts(ohlcv: pd.DataFrame, offset_bars: int) -> np.ndarray:
    """``ln(close[bar at ts + offset] / close[bar at ts])`` per row (``offset < 0`` looks back); NaN where absent."""
    for col in ("ts_ms", "close"):
        if col not in ohlcv.columns:
            raise DataValidationError(f"price target: OHLCV frame is missing column {col!r}")
    ts = ohlcv["ts_ms"].to_numpy(dtype=np.int64)
    close = ohlcv["close"].to_numpy(dtype=np.float64)
    if ts.size > 1 and (np.diff(ts) <= 0).any():
        raise DataValidationError("price target: ts_ms must be strictly increasing (sort and deduplicate the bars)")
    want = ts + offset_bars * BAR_MS
    idx = np.searchsorted(ts, want).clip(0, max(ts.size - 1, 0))
    found = ts[idx] == want if ts.size else np.zeros(0, dtype=bool)
    out = np.full(ts.size, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        # sign: ln(later / earlier) whichever direction we look
        ratio = close[idx] / close if offset_bars > 0 else close / close[idx]
        out[found] = np.log(ratio[found])
    return out


def forward_return_target(ohlcv: pd.DataFrame, horizon_minutes: int) -> pd.Series:
    """``ln(close[t + h] / close[t])`` aligned to bar ``t`` (float64, the input's index, name ``fwd_ret_{h}m``).

    ``t + h`` is the bar whose ``ts_ms`` is ``h`` minutes later; NaN when that bar is absent (the last
    ``h`` rows, or across a gap). The NaN rows are meant to be dropped, never filled.
    """
    h = _checked_horizon(horizon_minutes)
    return pd.Series(_log_return_by_ts(ohlcv, h), index=ohlcv.index, name=f"fwd_ret_{h}m")


def trailing_return(ohlcv: pd.DataFrame, horizon_minutes: int) -> pd.Series:
    """``ln(close[t] / close[t - h])`` aligned to bar ``t`` (known at ``t``'s close): the persistence forecast."""
    h = _checked_horizon(horizon_minutes)
    return pd.Series(_log_return_by_ts(ohlcv, -h), index=ohlcv.index, name=f"trail_ret_{h}m")


class PriceDataset(NamedTuple):
    """Model rows of :func:`make_price_dataset`: features, target and bar-open times, row-aligned."""

    X: pd.DataFrame  # TECHNICAL_FEATURES columns, float64, RangeIndex
    y: np.ndarray  # forward log return over horizon_minutes, float64
    ts_ms: np.ndarray  # bar-open time of each row, int64


def make_price_dataset(ohlcv: pd.DataFrame, horizon_minutes: int, features: pd.DataFrame | None = None) -> PriceDataset:
    """Features of every non-warm-up bar that has a target, the target and the bar times.

    ``features``: the output of :func:`technical_features` for these bars, when already computed (the
    ``price_features`` stage stores it); None computes it here. Rows dropped: warm-up rows (features NaN)
    and rows without a forward bar ``h`` minutes later. Raises :class:`DataValidationError` on invalid bars
    (see ``technical_features``), on precomputed features that do not match the bars, or when no row is left.
    """
    h = _checked_horizon(horizon_minutes)
    if features is None:
        feats = technical_features(ohlcv)
    else:
        missing = [c for c in ("is_warmup", *TECHNICAL_FEATURES) if c not in features.columns]
        if missing or len(features) != len(ohlcv):
            raise DataValidationError(
                f"make_price_dataset: precomputed features do not match the bars ({len(features)} rows for "
                f"{len(ohlcv)} bars; missing columns {missing})"
            )
        feats = features.reset_index(drop=True)
    y = forward_return_target(ohlcv, h).to_numpy()
    keep = ~feats["is_warmup"].to_numpy(dtype=bool) & np.isfinite(y)
    if not keep.any():
        raise DataValidationError(
            f"make_price_dataset: no usable row in {len(ohlcv)} bars (needs more than the 60 warm-up bars "
            f"plus the {h}-minute horizon in one gap-free stretch)"
        )
    X = feats.loc[keep, list(TECHNICAL_FEATURES)].reset_index(drop=True)
    ts = ohlcv["ts_ms"].to_numpy(dtype=np.int64)[keep]
    return PriceDataset(X=X, y=y[keep].astype(np.float64), ts_ms=ts)


class PriceSplit(NamedTuple):
    """Positional indices (int64, ascending) of the train / validation / test rows."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def purged_price_split(
    ts_ms: np.ndarray, horizon_minutes: int, train_frac: float = 0.7, valid_frac: float = 0.15
) -> PriceSplit:
    """Time-ordered split of rows by bar-open time with two purge gaps of ``horizon_minutes``.

    Fractions are of the time span (see :func:`purged_time_split`); test = the rest. Every training
    label (``t -> t + h``) is realised before the first validation bar opens, and likewise for
    validation vs test.
    """
    h = _checked_horizon(horizon_minutes)
    table = pd.DataFrame({"ts_ms": np.asarray(ts_ms, dtype=np.int64)})
    train, valid, test = purged_time_split(table, train_frac, valid_frac, h * BAR_MS, hold_col=None)
    return PriceSplit(train, valid, test)


# --- the estimator -----------------------------------------------------------------------------------

_HYPERPARAMETERS = (
    "num_leaves",
    "max_depth",
    "n_estimators",
    "learning_rate",
    "subsample",
    "subsample_freq",
    "early_stopping_rounds",
    "random_state",
    "n_jobs",
    "deterministic",
)


class ForwardReturnModel:
    """LightGBM regressor of the forward log return (sklearn-style; L2 objective).

    ``__init__`` stores hyperparameters only. ``fit(X, y, eval_set)`` returns ``self``; with an
    ``eval_set`` its last pair drives early stopping (stop after ``early_stopping_rounds`` rounds without
    a better validation L2). Learned state: ``booster_`` (a :class:`lightgbm.Booster` holding only the
    trees up to the best round, so an exported booster predicts exactly what :meth:`predict` does;
    ``model_`` is the same object, under the name other model families use), ``feature_names_``,
    ``best_iteration_`` (0-based index of the best round: the booster holds ``best_iteration_ + 1``
    trees), ``evals_result_``. ``subsample`` is LightGBM's bagging fraction; it only takes effect with
    ``subsample_freq`` > 0 (bagging every that many rounds). ``deterministic=True`` (with row-wise
    histograms) makes two fits with the same ``random_state`` produce identical trees.
    """

    def __init__(
        self,
        num_leaves: int = 64,
        max_depth: int = 8,
        n_estimators: int = 1000,
        learning_rate: float = 0.03,
        subsample: float = 0.8,
        subsample_freq: int = 1,
        early_stopping_rounds: int = 50,
        random_state: int = 42,
        n_jobs: int = 2,
        deterministic: bool = True,
    ) -> None:
        self.num_leaves = num_leaves
        self.max_depth = max_depth
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.subsample_freq = subsample_freq
        self.early_stopping_rounds = early_stopping_rounds
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.deterministic = deterministic

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyperparameters as passed to ``__init__`` (fit never changes them)."""
        return {name: getattr(self, name) for name in _HYPERPARAMETERS}

    def set_params(self, **params: Any) -> ForwardReturnModel:
        for name, value in params.items():
            if name not in _HYPERPARAMETERS:
                raise ModelContractError(f"ForwardReturnModel: unknown hyperparameter {name!r}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ForwardReturnModel({args})"

    def _lgb_params(self) -> dict[str, Any]:
        return {
            "objective": "regression",
            "metric": "l2",
            "num_leaves": self.num_leaves,
            "max_depth": self.max_depth,
            "learning_rate": self.learning_rate,
            "bagging_fraction": self.subsample,
            "bagging_freq": self.subsample_freq,
            "seed": self.random_state,
            "num_threads": self.n_jobs,
            "deterministic": self.deterministic,
            # deterministic=True is documented to need a fixed histogram layout: pin it (and stop
            # LightGBM from timing both layouts and printing which one it picked)
            "force_row_wise": True,
            "verbosity": -1,
        }

    def _check_hyperparameters(self) -> None:
        for name in ("num_leaves", "n_estimators", "n_jobs"):
            if getattr(self, name) <= 0:
                raise ModelContractError(f"ForwardReturnModel: {name} must be > 0, got {getattr(self, name)}")
        if self.early_stopping_rounds <= 0 or self.subsample_freq < 0:
            raise ModelContractError("ForwardReturnModel: early_stopping_rounds must be > 0, subsample_freq >= 0")
        if not (0 < self.learning_rate <= 1 and 0 < self.subsample <= 1):
            raise ModelContractError("ForwardReturnModel: learning_rate and subsample must be in (0, 1]")

    def _matrix(self, X: Any, names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
        if isinstance(X, pd.DataFrame):
            cols = [str(c) for c in X.columns]
            if names is not None and cols != list(names):
                raise ModelContractError(
                    f"ForwardReturnModel: feature columns differ from the fitted ones (missing "
                    f"{sorted(set(names) - set(cols))}, extra {sorted(set(cols) - set(names))}, or a different order)"
                )
        try:
            arr = X.to_numpy(dtype=np.float64) if isinstance(X, pd.DataFrame) else np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataValidationError(f"ForwardReturnModel: X is not numeric: {e}") from e
        if arr.ndim != 2:
            raise DataValidationError(f"ForwardReturnModel: X must be 2-D, got shape {arr.shape}")
        if not isinstance(X, pd.DataFrame):
            cols = list(names) if names is not None else [f"f{i}" for i in range(arr.shape[1])]
            if arr.shape[1] != len(cols):
                raise ModelContractError(
                    f"ForwardReturnModel: X has {arr.shape[1]} columns, the model expects {len(cols)}"
                )
        return arr, cols

    @staticmethod
    def _labels(y: Any, rows: int) -> np.ndarray:
        arr = np.asarray(y, dtype=np.float64).ravel()
        if arr.size != rows:
            raise DataValidationError(f"ForwardReturnModel: X has {rows} rows but y has {arr.size}")
        if not np.isfinite(arr).all():
            raise DataValidationError("ForwardReturnModel: the target has NaN/inf values (drop rows without a target)")
        return arr

    def fit(self, X: Any, y: Any, eval_set: EvalSet | None = None) -> ForwardReturnModel:
        self._check_hyperparameters()
        arr, names = self._matrix(X)
        if arr.shape[0] == 0:
            raise DataValidationError("ForwardReturnModel: cannot fit on an empty training set")
        label = self._labels(y, arr.shape[0])
        params = self._lgb_params()
        dtrain = lgb.Dataset(arr, label=label, feature_name=names, params={"verbosity": -1}, free_raw_data=True)
        valid_sets, valid_names = [], []
        if eval_set:
            Xe, ye = eval_set[-1]
            earr, _ = self._matrix(Xe, names)
            valid_sets.append(lgb.Dataset(earr, label=self._labels(ye, earr.shape[0]), reference=dtrain))
            valid_names.append("valid")
        evals: dict[str, Any] = {}
        callbacks: list[Any] = [lgb.record_evaluation(evals)]
        if valid_sets:
            callbacks.append(lgb.early_stopping(self.early_stopping_rounds, verbose=False))
        booster = lgb.train(
            params,
            dtrain,
            num_boost_round=self.n_estimators,
            valid_sets=valid_sets,
            valid_names=valid_names,
            callbacks=callbacks,
        )
        n_trees = (
            int(booster.best_iteration) if valid_sets and booster.best_iteration > 0 else booster.current_iteration()
        )
        # Re-load only the kept trees: every later consumer (ONNX export, importance) sees the same model.
        self.booster_ = lgb.Booster(model_str=booster.model_to_string(num_iteration=n_trees))
        self.model_ = self.booster_
        self.best_iteration_ = n_trees - 1
        self.feature_names_ = tuple(names)
        self.evals_result_ = {k: {m: list(v) for m, v in d.items()} for k, d in evals.items()}
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted forward log return per row, float64 of shape (n,)."""
        if not hasattr(self, "booster_"):
            raise ModelContractError("ForwardReturnModel is not fitted yet; call fit first")
        arr, _ = self._matrix(X, self.feature_names_)
        return np.asarray(self.booster_.predict(arr), dtype=np.float64)

    def feature_importance(self) -> pd.DataFrame:
        """Gain and split importance per feature, sorted by gain (desc)."""
        if not hasattr(self, "booster_"):
            raise ModelContractError("ForwardReturnModel is not fitted yet; call fit first")
        frame = pd.DataFrame(
            {
                "feature": list(self.feature_names_),
                "gain": self.booster_.feature_importance("gain"),
                "split": self.booster_.feature_importance("split"),
            }
        )
        return frame.sort_values(["gain", "feature"], ascending=[False, True], kind="stable").reset_index(drop=True)


# --- metrics -----------------------------------------------------------------------------------------


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    yt = np.asarray(y_true, dtype=np.float64).ravel()
    yp = np.asarray(y_pred, dtype=np.float64).ravel()
    if yt.size != yp.size:
        raise DataValidationError(f"price metrics: y_true has {yt.size} values but y_pred has {yp.size}")
    if not (np.isfinite(yt).all() and np.isfinite(yp).all()):
        raise DataValidationError("price metrics: y_true and y_pred must be finite")
    return yt, yp


def directional_accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of rows with a non-zero true move whose predicted sign matches it (a zero prediction misses).

    NaN when no true move is non-zero.
    """
    yt, yp = _pair(y_true, y_pred)
    moved = yt != 0
    if not moved.any():
        return float("nan")
    return float(np.mean(np.sign(yp[moved]) == np.sign(yt[moved])))


def information_coefficient(y_true: Any, y_pred: Any) -> float:
    """Spearman rank correlation of prediction and outcome (ties get average ranks); NaN if either is constant."""
    yt, yp = _pair(y_true, y_pred)
    if yt.size < 2:
        return float("nan")
    rt = pd.Series(yt).rank().to_numpy()
    rp = pd.Series(yp).rank().to_numpy()
    if rt.std() == 0 or rp.std() == 0:
        return float("nan")
    return float(np.corrcoef(rt, rp)[0, 1])


def non_overlapping_rows(ts_ms: np.ndarray, step_ms: int) -> np.ndarray:
    """Positional indices of rows at least ``step_ms`` apart, greedily from the first (``ts_ms`` increasing)."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    picked: list[int] = []
    i = 0
    while i < ts.size:
        picked.append(i)
        i = int(np.searchsorted(ts, ts[i] + step_ms, side="left"))
    return np.asarray(picked, dtype=np.int64)


def threshold_rule_sharpe(
    y_true: Any,
    y_pred: Any,
    horizon_minutes: int,
    threshold_bps: float = 8.0,
    ts_ms: np.ndarray | None = None,
) -> dict[str, float]:
    """Annualised Sharpe of the rule "long when pred > +threshold, short when pred < -threshold, else flat".

    Each row is one decision at a bar's close, held for ``horizon_minutes``; its PnL = position (+1, -1,
    0) x the realised forward log return (gross: no fees). Only non-overlapping decisions are kept, so
    the PnL series has no overlap: rows at least ``horizon_minutes`` apart by ``ts_ms`` (or every
    ``horizon``-th row when ``ts_ms`` is None, i.e. consecutive 1-minute bars). Flat periods count as
    PnL 0. Sharpe = mean / std (ddof = 1) x sqrt(periods per year), a year being 365 x 24 x 60 / h
    periods (the market trades 24/7). 0 when the PnL has no variance (e.g. never in the market).
    Returns ``sharpe``, ``mean_pnl_bps`` (per period), ``exposure`` (share of periods in the market),
    ``hit_rate`` (share of in-market periods with a positive PnL, NaN if none) and ``periods``.
    """
    h = _checked_horizon(horizon_minutes)
    yt, yp = _pair(y_true, y_pred)
    if ts_ms is None:
        rows = np.arange(0, yt.size, h, dtype=np.int64)
    else:
        ts = np.asarray(ts_ms, dtype=np.int64)
        if ts.size != yt.size:
            raise DataValidationError(f"price metrics: ts_ms has {ts.size} values but y has {yt.size}")
        rows = non_overlapping_rows(ts, h * BAR_MS)
    thr = threshold_bps / 1e4
    position = np.where(yp[rows] > thr, 1.0, np.where(yp[rows] < -thr, -1.0, 0.0))
    pnl = position * yt[rows]
    std = float(pnl.std(ddof=1)) if pnl.size > 1 else 0.0
    sharpe = float(pnl.mean() / std * math.sqrt(MINUTES_PER_YEAR / h)) if std > 0 else 0.0
    active = position != 0
    return {
        "sharpe": sharpe,
        "mean_pnl_bps": float(pnl.mean() * 1e4) if pnl.size else 0.0,
        "exposure": float(active.mean()) if pnl.size else 0.0,
        "hit_rate": float(np.mean(pnl[active] > 0)) if active.any() else float("nan"),
        "periods": float(pnl.size),
    }


def price_metrics(
    y_true: Any,
    y_pred: Any,
    threshold_bps: float = 8.0,
    horizon_minutes: int = 1,
    ts_ms: np.ndarray | None = None,
) -> dict[str, float]:
    """RMSE (log-return units), directional accuracy, IC and the threshold rule's Sharpe of one forecast.

    See :func:`directional_accuracy`, :func:`information_coefficient` and :func:`threshold_rule_sharpe`
    (which uses ``horizon_minutes`` and ``ts_ms`` to keep non-overlapping periods). Keys: ``rmse``,
    ``rmse_bps``, ``directional_accuracy``, ``ic``, ``sharpe``, ``mean_pnl_bps``, ``exposure``,
    ``hit_rate``, ``periods``, ``rows``.
    """
    yt, yp = _pair(y_true, y_pred)
    if yt.size == 0:
        raise DataValidationError("price metrics: no rows to evaluate")
    rmse = float(np.sqrt(np.mean((yt - yp) ** 2)))
    return {
        "rmse": rmse,
        "rmse_bps": rmse * 1e4,
        "directional_accuracy": directional_accuracy(yt, yp),
        "ic": information_coefficient(yt, yp),
        **threshold_rule_sharpe(yt, yp, horizon_minutes, threshold_bps, ts_ms),
        "rows": float(yt.size),
    }


# --- training entry point ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PriceLgbmResult:
    """Fitted model, test metrics (model and baselines), split windows, timing and written artefacts."""

    model: ForwardReturnModel
    feature_names: tuple[str, ...]
    horizon_minutes: int
    metrics: dict[str, Any]
    split: dict[str, Any]
    fit_seconds: float
    artifacts: dict[str, Path] = field(default_factory=dict)
    test: PriceDataset | None = None  # the test window's rows (features, target, bar times), for holdout files


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None, recursively, so metrics.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def train_price_lgbm(
    ohlcv: pd.DataFrame,
    horizon_minutes: int = 10,
    *,
    train_frac: float = 0.7,
    valid_frac: float = 0.15,
    threshold_bps: float = 8.0,
    out_dir: Path | None = None,
    features: pd.DataFrame | None = None,
    **model_params: Any,
) -> PriceLgbmResult:
    """Fit :class:`ForwardReturnModel` on one symbol's 1-minute bars and evaluate it on the test window.

    ``ohlcv``: store schema, sorted. ``model_params``: :class:`ForwardReturnModel` hyperparameters
    (``num_leaves``, ``n_estimators``, ...); omitted ones take its defaults. The split is
    :func:`purged_price_split`; early stopping on the
    validation window. ``metrics``: ``{"test": {"model", "zero", "persistence"}, "valid": {"model"},
    "best_iteration", "horizon_minutes", "threshold_bps"}`` (see the module docstring for the baselines).
    With ``out_dir``, writes ``metrics.json`` (NaN as null, plus the split) and ``importance.csv``.
    ``fit_seconds`` (wall clock of the fit) is returned but not written, so the files are reproducible.
    ``features``: precomputed :func:`technical_features` of ``ohlcv`` (see :func:`make_price_dataset`).
    """
    h = _checked_horizon(horizon_minutes)
    data = make_price_dataset(ohlcv, h, features)
    split = purged_price_split(data.ts_ms, h, train_frac, valid_frac)
    bar_ts = ohlcv["ts_ms"].to_numpy(dtype=np.int64)
    persistence = trailing_return(ohlcv, h).to_numpy()[np.searchsorted(bar_ts, data.ts_ms)]
    # a row that has features also has 60 bars of history in its segment, so ln(c_t / c_{t-h}) exists
    # for h <= 60; beyond that fall back to 0 (no information) where the history is missing
    persistence = np.where(np.isfinite(persistence), persistence, 0.0)

    model = ForwardReturnModel(**model_params)  # hyperparameters and their defaults live in the model
    X, y, ts = data
    started = time.perf_counter()
    model.fit(X.iloc[split.train], y[split.train], eval_set=[(X.iloc[split.valid], y[split.valid])])
    fit_seconds = time.perf_counter() - started

    te, va = split.test, split.valid

    def _metrics(pred: np.ndarray, rows: np.ndarray) -> dict[str, float]:
        return price_metrics(y[rows], pred, threshold_bps, h, ts[rows])

    metrics: dict[str, Any] = {
        "test": {
            "model": _metrics(model.predict(X.iloc[te]), te),
            "zero": _metrics(np.zeros(te.size), te),
            "persistence": _metrics(persistence[te], te),
        },
        "valid": {"model": _metrics(model.predict(X.iloc[va]), va)},
        "best_iteration": model.best_iteration_,
        "horizon_minutes": h,
        "threshold_bps": threshold_bps,
    }
    split_info = {
        "purge_ms": h * BAR_MS,
        **{
            name: {"rows": int(idx.size), "first_ts_ms": int(ts[idx[0]]), "last_ts_ms": int(ts[idx[-1]])}
            for name, idx in zip(("train", "valid", "test"), split, strict=True)
        },
    }
    artifacts: dict[str, Path] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        artifacts["importance"] = out / "importance.csv"
        model.feature_importance().to_csv(artifacts["importance"], index=False)
        artifacts["metrics"] = out / "metrics.json"
        payload = _json_safe({**metrics, "split": split_info, "params": model.get_params()})
        artifacts["metrics"].write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return PriceLgbmResult(
        model=model,
        feature_names=model.feature_names_,
        horizon_minutes=h,
        metrics=metrics,
        split=split_info,
        fit_seconds=fit_seconds,
        artifacts=artifacts,
        test=PriceDataset(X=X.iloc[te].reset_index(drop=True), y=y[te], ts_ms=ts[te]),
    )
