"""XGBoost models of a funding-arbitrage opportunity: profit, success and best hold (sklearn-style).

Three estimators share one contract: ``__init__`` stores hyperparameters only; ``fit(X, y, eval_set=...)``
returns ``self``; learned state lives in ``booster_``, ``feature_names_``, ``best_iteration_`` (and
``classes_``). With an ``eval_set`` the last pair drives early stopping, and ``booster_`` is then cut to
the best iteration, so an exported booster predicts exactly what the wrapper predicts.

- :class:`ProfitRegressor`: realised ``actual_profit_pct`` (percent of one leg's notional) of a position.
- :class:`SuccessClassifier`: ``was_profitable``; ``predict_proba`` gives ``[P(loss), P(profit)]``.
- :class:`HoldDurationModel`: the best hold of an entry = the simulated hold with the highest realised
  profit. Trained as a multi-class classification over the hold grid (``multi:softprob``), because the
  best hold is often at either end of the grid (take the longest when the spread persists, the shortest
  when it does not) and a regression on hours would average those modes into a hold that is rarely
  best. ``predict_hours`` therefore always returns one of the simulated holds. Since ``hold_hours`` is
  also a profit-model input, :func:`predict_candidate_holds` scores every candidate hold instead.

:func:`train_opportunity_models` (bottom of this module) builds the features, splits in time with purge
gaps, fits the three models with early stopping, evaluates them on the test window and writes the
artefacts; it is pure (no tracking: the task layer logs what it returns).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import xgboost as xgb

from cryptoml.config import OpportunityModelParams, SimulateParams
from cryptoml.errors import ConfigError, DataValidationError, ModelContractError
from cryptoml.features.opportunity import (
    ENTRY_FEATURE_NAMES,
    FEATURE_NAMES,
    INPUT_COLUMNS,
    opportunity_features,
)
from cryptoml.models.evaluation import (
    evaluate,
    write_calibration_plot,
    write_importance,
    write_shap_summary,
)
from cryptoml.models.scoring import composite_score
from cryptoml.models.split import purged_time_split

EvalSet = Sequence[tuple[Any, Any]]

_HYPERPARAMETERS = (
    "n_estimators",
    "max_depth",
    "learning_rate",
    "subsample",
    "colsample_bytree",
    "min_child_weight",
    "early_stopping_rounds",
    "n_jobs",
    "random_state",
)


class _XGBModel:
    """Shared hyperparameters, input checks and the training loop of the three wrappers."""

    _objective = "reg:squarederror"
    _eval_metric = "rmse"

    def __init__(
        self,
        n_estimators: int = 600,
        max_depth: int = 6,
        learning_rate: float = 0.05,
        subsample: float = 0.8,
        colsample_bytree: float = 0.8,
        min_child_weight: float = 1.0,
        early_stopping_rounds: int = 50,
        n_jobs: int = 2,
        random_state: int = 42,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.early_stopping_rounds = early_stopping_rounds
        self.n_jobs = n_jobs
        self.random_state = random_state

    @classmethod
    def from_params(cls, params: OpportunityModelParams, **extra: Any) -> Self:
        """An unfitted model with the hyperparameters of ``params``; ``extra`` adds or overrides keyword arguments."""
        return cls(**{**{name: getattr(params, name) for name in _HYPERPARAMETERS}, **extra})

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters as passed to ``__init__`` (fit never changes them)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def _param_names(self) -> tuple[str, ...]:
        return _HYPERPARAMETERS

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _booster_params(self) -> dict[str, Any]:
        return {
            "objective": self._objective,
            "eval_metric": self._eval_metric,
            "tree_method": "hist",
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "min_child_weight": self.min_child_weight,
            "nthread": self.n_jobs,
            "seed": self.random_state,
        }

    def _matrix(self, X: Any, y: np.ndarray | None = None, names: list[str] | None = None) -> xgb.DMatrix:
        if isinstance(X, pd.DataFrame):
            cols = [str(c) for c in X.columns]
            if names is not None and cols != names:
                raise ModelContractError(
                    f"{type(self).__name__}: feature columns differ from the fitted ones "
                    f"(missing {sorted(set(names) - set(cols))}, extra {sorted(set(cols) - set(names))}, "
                    "or a different order)"
                )
        try:
            arr = X.to_numpy(dtype=np.float32) if isinstance(X, pd.DataFrame) else np.asarray(X, np.float32)
        except (TypeError, ValueError) as e:
            raise DataValidationError(f"{type(self).__name__}: X is not numeric: {e}") from e
        if not isinstance(X, pd.DataFrame):
            if arr.ndim != 2:
                raise DataValidationError(f"{type(self).__name__}: X must be 2-D, got shape {arr.shape}")
            cols = names if names is not None else [f"f{i}" for i in range(arr.shape[1])]
            if arr.shape[1] != len(cols):
                raise ModelContractError(
                    f"{type(self).__name__}: X has {arr.shape[1]} columns, the model expects {len(cols)}"
                )
        if y is not None and len(y) != arr.shape[0]:
            raise DataValidationError(f"{type(self).__name__}: X has {arr.shape[0]} rows but y has {len(y)}")
        return xgb.DMatrix(arr, label=y, feature_names=cols, nthread=self.n_jobs)

    def _labels(self, y: Any) -> np.ndarray:
        arr = np.asarray(y, dtype=np.float64).ravel()
        if not np.isfinite(arr).all():
            raise DataValidationError(f"{type(self).__name__}: the target has NaN/inf values")
        return arr

    def _train(self, X: Any, y: Any, eval_set: EvalSet | None, extra: dict[str, Any] | None = None) -> None:
        label = self._labels(y)
        if label.size == 0:
            raise DataValidationError(f"{type(self).__name__}: cannot fit on an empty training set")
        dtrain = self._matrix(X, label)
        names = list(dtrain.feature_names or [])
        evals = [(self._matrix(Xe, self._labels(ye), names), f"eval_{i}") for i, (Xe, ye) in enumerate(eval_set or ())]
        params = {**self._booster_params(), **(extra or {})}
        booster = xgb.train(
            params,
            dtrain,
            num_boost_round=self.n_estimators,
            evals=evals,
            early_stopping_rounds=self.early_stopping_rounds if evals else None,
            verbose_eval=False,
        )
        best = int(booster.best_iteration) if evals else self.n_estimators - 1
        self.best_iteration_ = best
        # Cut to the best iteration: every later consumer (ONNX export, SHAP, importance) sees the same trees.
        self.booster_ = booster[: best + 1]
        self.feature_names_ = tuple(names)

    def _raw_predict(self, X: Any) -> np.ndarray:
        if not hasattr(self, "booster_"):
            raise ModelContractError(f"{type(self).__name__} is not fitted yet; call fit first")
        return np.asarray(self.booster_.predict(self._matrix(X, names=list(self.feature_names_))))


class ProfitRegressor(_XGBModel):
    """Realised profit of a position, percent of one leg's notional (``actual_profit_pct``)."""

    def fit(self, X: Any, y: Any, eval_set: EvalSet | None = None) -> ProfitRegressor:
        self._train(X, y, eval_set)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predicted ``actual_profit_pct`` per row, float64 of shape (n,)."""
        return self._raw_predict(X).astype(np.float64)


class SuccessClassifier(_XGBModel):
    """Probability that a position ends profitable (``was_profitable``)."""

    _objective = "binary:logistic"
    _eval_metric = "logloss"

    def _labels(self, y: Any) -> np.ndarray:
        arr = super()._labels(y)
        if not np.isin(arr, (0.0, 1.0)).all():
            raise DataValidationError("SuccessClassifier: the target must be boolean / 0-1")
        return arr

    def fit(self, X: Any, y: Any, eval_set: EvalSet | None = None) -> SuccessClassifier:
        self._train(X, y, eval_set)
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Shape (n, 2): columns P(not profitable), P(profitable)."""
        p = self._raw_predict(X).astype(np.float64)
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        """0/1 at a 0.5 probability threshold."""
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(np.int64)


class HoldDurationModel(_XGBModel):
    """Best hold (hours) of an entry, as a classification over the simulated hold grid.

    ``holds``: the grid (hours); None = the distinct values of the training target. Inputs are the
    entry features (``ENTRY_FEATURE_NAMES``: no hold-dependent column); one row per entry.
    """

    _objective = "multi:softprob"
    _eval_metric = "mlogloss"

    def __init__(self, *args: Any, holds: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holds = holds

    def _param_names(self) -> tuple[str, ...]:
        return (*_HYPERPARAMETERS, "holds")

    def _to_class(self, y: Any) -> np.ndarray:
        hours = super()._labels(y)
        idx = np.searchsorted(self.classes_, hours).clip(0, len(self.classes_) - 1)
        bad = self.classes_[idx] != hours
        if bad.any():
            raise DataValidationError(
                f"HoldDurationModel: holds {sorted(set(hours[bad].tolist()))} are not in the grid "
                f"{self.classes_.tolist()}"
            )
        return idx.astype(np.float64)

    def fit(self, X: Any, y: Any, eval_set: EvalSet | None = None) -> HoldDurationModel:
        grid = self.holds if self.holds is not None else np.unique(super()._labels(y))
        classes = np.unique(np.asarray(grid, dtype=np.float64))
        if classes.size < 2:
            raise DataValidationError("HoldDurationModel: needs at least two candidate holds")
        self.classes_ = classes
        evals = [(Xe, self._to_class(ye)) for Xe, ye in (eval_set or ())]
        self._train(X, self._to_class(y), evals, {"num_class": int(classes.size)})
        return self

    def _labels(self, y: Any) -> np.ndarray:
        return np.asarray(y, dtype=np.float64).ravel()  # already class indices (see _to_class)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Shape (n, len(classes_)): probability that each grid hold is the best one."""
        raw = self._raw_predict(X)  # first: raises a clear error when not fitted
        return raw.reshape(-1, self.classes_.size).astype(np.float64)

    def predict_hours(self, X: Any) -> np.ndarray:
        """The most likely best hold per row, hours, always one of ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def predict(self, X: Any) -> np.ndarray:
        return self.predict_hours(X)


def predict_candidate_holds(
    entries: pd.DataFrame,
    holds: Sequence[float],
    profit_model: ProfitRegressor,
    success_model: SuccessClassifier,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted profit (%) and success probability of every entry at every candidate hold.

    ``entries``: one row per opportunity at entry (the feature input columns; ``hold_hours`` is
    overwritten). Returns two arrays of shape (n_entries, len(holds)).
    """
    profit = np.empty((len(entries), len(holds)))
    proba = np.empty_like(profit)
    for j, h in enumerate(holds):
        X = opportunity_features(entries.assign(hold_hours=float(h)))
        profit[:, j] = profit_model.predict(X)
        proba[:, j] = success_model.predict_proba(X)[:, 1]
    return profit, proba


# --- training entry point ---------------------------------------------------------------------------

LABEL_COLUMNS = ("actual_profit_pct", "was_profitable")
MS_PER_HOUR = 3_600_000


@dataclass(frozen=True)
class SplitInfo:
    """Rows and entry-time windows (epoch ms, inclusive first / last entry) of the purged split."""

    purge_ms: int
    rows: dict[str, int]
    entries: dict[str, int]  # hold-model rows (train/valid: full grid simulated; test: >= 2 holds)
    first_entry_ms: dict[str, int]
    last_entry_ms: dict[str, int]


@dataclass(frozen=True)
class TrainResult:
    """Fitted models, test metrics, split and the paths of the written artefacts."""

    profit_model: ProfitRegressor
    success_model: SuccessClassifier
    hold_model: HoldDurationModel
    feature_names: tuple[str, ...]  # profit and success model inputs, in order
    hold_feature_names: tuple[str, ...]  # hold model inputs, in order
    holds: tuple[float, ...]  # the simulated hold grid, hours
    metrics: dict[str, Any]
    split: SplitInfo
    artifacts: dict[str, Path] = field(default_factory=dict)
    # The test window, for holdout files: rows of ``positions`` (profit / success models) and, for the hold
    # model, the first position row of each test entry with >= 2 simulated holds and its best simulated hold.
    test_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    hold_test_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    hold_test_hours: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    hold_test_available: np.ndarray = field(default_factory=lambda: np.empty((0, 0), bool))  # holds simulated


def _check_positions(positions: pd.DataFrame) -> pd.DataFrame:
    need = [*INPUT_COLUMNS, "opportunity_id", *LABEL_COLUMNS]
    missing = [c for c in need if c not in positions.columns]
    if missing:
        raise DataValidationError(f"train_opportunity_models: positions lack columns {missing}")
    if positions.empty:
        raise DataValidationError("train_opportunity_models: the positions table is empty")
    if positions.duplicated(["ts_ms", "opportunity_id", "hold_hours"]).any():
        raise DataValidationError("train_opportunity_models: duplicate (ts_ms, opportunity_id, hold_hours) positions")
    for c in LABEL_COLUMNS:
        if positions[c].isna().any():
            raise DataValidationError(f"train_opportunity_models: label column {c!r} has missing values")
    return positions.reset_index(drop=True)


def _entry_holds(positions: pd.DataFrame, holds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per entry (ts_ms, opportunity_id): its first row position and its realised profit per grid hold.

    Returns ``first_row`` of shape (E,) and ``realised`` of shape (E, len(holds)), NaN where that hold
    was not simulated (entries near the end of the data lack the holds that would outlast it).
    """
    entry = positions.groupby(["ts_ms", "opportunity_id"], sort=False).ngroup().to_numpy()
    _, first_row = np.unique(entry, return_index=True)
    col = np.searchsorted(np.asarray(holds), positions["hold_hours"].to_numpy(dtype=np.float64))
    realised = np.full((first_row.size, len(holds)), np.nan)
    realised[entry, col] = positions["actual_profit_pct"].to_numpy(dtype=np.float64)
    return first_row.astype(np.int64), realised


def _masked_argmax(holds: tuple[float, ...], score: np.ndarray, available: np.ndarray) -> np.ndarray:
    """The hold (hours) with the highest score among the available ones, per row."""
    return np.asarray(holds)[np.argmax(np.where(available, score, -np.inf), axis=1)]


def _window(ts: np.ndarray) -> tuple[int, int]:
    return int(ts.min()), int(ts.max())


def train_opportunity_models(
    positions: pd.DataFrame,
    params: OpportunityModelParams,
    sim: SimulateParams,
    out_dir: Path,
    features: pd.DataFrame | None = None,
) -> TrainResult:
    """Fit the profit, success and hold models on simulated positions; evaluate on the test window.

    ``positions``: the "Simulated positions" table (one row per opportunity x hold). The purge gap is
    ``params.purge_hours`` or, when 0, the longest hold of ``sim.hold_hours`` and of the table. Writes
    ``importance.csv``, ``shap_summary.png``, ``calibration.png``, ``ml_vs_rule.csv`` and
    ``metrics.json`` into ``out_dir``. ``features``: the precomputed ``opportunity_features(positions)``
    (the ``opportunity_features`` stage's output), checked for column order and length.
    """
    positions = _check_positions(positions)
    longest_h = max(max(sim.hold_hours), float(positions["hold_hours"].max()))
    if params.purge_hours and params.purge_hours < longest_h:
        raise ConfigError(
            f"opportunity_model.purge_hours={params.purge_hours:g} is shorter than the longest hold "
            f"{longest_h:g} h: training labels would overlap validation entries (use 0 for the minimum)"
        )
    purge_ms = math.ceil((params.purge_hours or longest_h) * MS_PER_HOUR)
    if features is None:
        X = opportunity_features(positions)
    else:
        if list(features.columns) != list(FEATURE_NAMES) or len(features) != len(positions):
            raise DataValidationError(
                f"precomputed features do not match the positions: {len(features)} rows x "
                f"{list(features.columns)[:3]}... vs {len(positions)} positions x FEATURE_NAMES"
            )
        X = features.reset_index(drop=True)
    train, valid, test = purged_time_split(positions, params.train_frac, params.valid_frac, purge_ms)
    y_profit = positions["actual_profit_pct"].to_numpy(dtype=np.float64)
    y_won = positions["was_profitable"].to_numpy().astype(np.float64)

    profit_model = ProfitRegressor.from_params(params).fit(
        X.iloc[train], y_profit[train], eval_set=[(X.iloc[valid], y_profit[valid])]
    )
    success_model = SuccessClassifier.from_params(params).fit(
        X.iloc[train], y_won[train], eval_set=[(X.iloc[valid], y_won[valid])]
    )

    holds = tuple(float(h) for h in np.unique(positions["hold_hours"].to_numpy(dtype=np.float64)))
    part = np.full(len(positions), -1)
    for code, idx in enumerate((train, valid, test)):
        part[idx] = code
    # Hold model: one row per entry; trained only on entries whose whole grid was simulated, so the
    # label is not biased towards the short holds that are all an entry near the data's end has.
    first_row, realised = _entry_holds(positions, holds)
    available = np.isfinite(realised)
    complete = available.all(axis=1)
    best_hold = _masked_argmax(holds, realised, available)
    entry_part = part[first_row]
    X_entry = X.iloc[first_row][list(ENTRY_FEATURE_NAMES)]
    tr, va = (np.flatnonzero((entry_part == code) & complete) for code in (0, 1))
    if tr.size == 0:
        raise DataValidationError(
            "train_opportunity_models: no training entry has the whole hold grid simulated "
            f"(longest hold {longest_h:g} h); the data are too short for this grid"
        )
    hold_model = HoldDurationModel.from_params(params, holds=holds).fit(
        X_entry.iloc[tr], best_hold[tr], eval_set=[(X_entry.iloc[va], best_hold[va])] if va.size else None
    )

    test_rows = positions.iloc[test].reset_index(drop=True)
    X_test = X.iloc[test]
    proba_test = success_model.predict_proba(X_test)[:, 1]
    # Test entries often lack the long holds (the test window ends with the data): the hold metrics
    # compare the best *simulated* hold with each predictor's choice among those same holds.
    te = np.flatnonzero((entry_part == 2) & (available.sum(axis=1) >= 2))
    cand_profit, cand_proba = predict_candidate_holds(positions.iloc[first_row[te]], holds, profit_model, success_model)
    cand_composite = np.asarray(
        composite_score(
            cand_profit,
            cand_proba,
            np.asarray(holds)[None, :],
            params.composite_profit_weight,
            params.composite_success_weight,
        )
    )
    avail_te = available[te]
    metrics = evaluate(
        test_rows,
        profit_model.predict(X_test),
        proba_test,
        params.top_k,
        hold_true_hours=best_hold[te],
        hold_pred_hours={
            "classifier": _masked_argmax(holds, hold_model.predict_proba(X_entry.iloc[te]), avail_te),
            "profit_argmax": _masked_argmax(holds, cand_profit, avail_te),
            "composite_argmax": _masked_argmax(holds, cand_composite, avail_te),
        },
        profit_weight=params.composite_profit_weight,
        success_weight=params.composite_success_weight,
        seed=params.random_state,
    )
    metrics["hold"]["test_entries_complete_grid"] = int(complete[te].sum())
    wins = y_profit[train][y_profit[train] > 0]
    losses = -y_profit[train][y_profit[train] <= 0]
    metrics["sizing"] = {  # inputs of kelly_fraction, from the training window (percent of position)
        "mean_win_pct": float(wins.mean()) if wins.size else 0.0,
        "mean_loss_pct": float(losses.mean()) if losses.size else 0.0,
    }
    metrics["best_iteration"] = {
        "profit": profit_model.best_iteration_,
        "success": success_model.best_iteration_,
        "hold": hold_model.best_iteration_,
    }

    ts = positions["ts_ms"].to_numpy(dtype=np.int64)
    names = ("train", "valid", "test")
    split = SplitInfo(
        purge_ms=purge_ms,
        rows={n: int(i.size) for n, i in zip(names, (train, valid, test), strict=True)},
        entries={n: int(i.size) for n, i in zip(names, (tr, va, te), strict=True)},
        first_entry_ms={n: _window(ts[i])[0] for n, i in zip(names, (train, valid, test), strict=True)},
        last_entry_ms={n: _window(ts[i])[1] for n, i in zip(names, (train, valid, test), strict=True)},
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = {
        "importance": write_importance({"profit": profit_model, "success": success_model, "hold": hold_model}, out_dir),
        "shap_summary": write_shap_summary(
            {"profit": profit_model, "success": success_model}, X_test, out_dir, seed=params.random_state
        ),
        "calibration": write_calibration_plot(test_rows["was_profitable"], proba_test, out_dir),
    }
    artifacts["ml_vs_rule"] = out_dir / "ml_vs_rule.csv"
    pd.DataFrame(metrics["ml_vs_rule"]).to_csv(artifacts["ml_vs_rule"], index=False)
    artifacts["metrics"] = out_dir / "metrics.json"
    artifacts["metrics"].write_text(json.dumps({**metrics, "split": asdict(split)}, indent=2, sort_keys=True))
    return TrainResult(
        profit_model=profit_model,
        success_model=success_model,
        hold_model=hold_model,
        feature_names=FEATURE_NAMES,
        hold_feature_names=ENTRY_FEATURE_NAMES,
        holds=holds,
        metrics=metrics,
        split=split,
        artifacts=artifacts,
        test_rows=np.asarray(test, dtype=np.int64),
        hold_test_rows=np.asarray(first_row[te], dtype=np.int64),
        hold_test_hours=np.asarray(best_hold[te], dtype=np.float64),
        hold_test_available=np.asarray(available[te], dtype=bool),
    )
