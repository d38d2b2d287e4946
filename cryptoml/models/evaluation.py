"""Metrics of the opportunity models, ML vs the rule scorer, and the written artefacts (CSV and PNGs).

ML vs rule (same test rows, same periods): the test positions are grouped into periods of
``period_ms`` (default one UTC day: a 5-minute snapshot holds too few candidates for a top-k to
differ). An *entry* is one opportunity at one snapshot ``(ts_ms, opportunity_id)``; each scorer takes at
most one position (one hold) per entry and the ``top_k`` best entries per period:

- ``rule``: ranks by ``fund_apr`` (desc) then ``break_even_hours`` (asc). It has no notion of a hold, so
  the holds of one entry tie; ties are broken by a seeded random order, i.e. the rule's hold is a
  uniform draw from the simulated grid.
- ``ml_profit``: predicted ``actual_profit_pct``; ``ml_composite``: the composite score of
  :mod:`cryptoml.models.scoring`; ``ml_success``: success probability. Each picks its best hold.

For each scorer the table reports precision@k (share of picks with ``was_profitable``) and the mean /
median realised ``actual_profit_pct`` of the picks; the ``all_entries`` row is the mean over every test
position, as a baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    r2_score,
    recall_score,
    roc_auc_score,
)

from cryptoml.errors import DataValidationError
from cryptoml.models.scoring import composite_score

MS_PER_DAY = 86_400_000


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """MAE, RMSE (same unit as y) and R² of a regression."""
    yt, yp = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    return {
        "mae": float(mean_absolute_error(yt, yp)),
        "rmse": float(np.sqrt(mean_squared_error(yt, yp))),
        "r2": float(r2_score(yt, yp)) if yt.size > 1 else float("nan"),
    }


def safe_auc(y_true: Any, score: Any) -> float:
    """ROC AUC, NaN when only one class is present (AUC undefined)."""
    yt = np.asarray(y_true).astype(bool)
    if yt.all() or not yt.any():
        return float("nan")
    return float(roc_auc_score(yt, np.asarray(score, dtype=np.float64)))


def classification_metrics(y_true: Any, proba: Any, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (at ``threshold``), AUC and Brier score of P(profitable)."""
    yt = np.asarray(y_true).astype(bool)
    p = np.asarray(proba, dtype=np.float64)
    yp = p >= threshold
    return {
        "accuracy": float(accuracy_score(yt, yp)),
        "precision": float(precision_score(yt, yp, zero_division=0)),
        "recall": float(recall_score(yt, yp, zero_division=0)),
        "f1": float(f1_score(yt, yp, zero_division=0)),
        "auc": safe_auc(yt, p),
        "brier": float(np.mean((p - yt) ** 2)),
        "positive_rate": float(yt.mean()),
    }


def calibration_bins(y_true: Any, proba: Any, n_bins: int = 10) -> dict[str, list[float]]:
    """Reliability curve: mean predicted probability and observed frequency per non-empty bin."""
    prob_true, prob_pred = calibration_curve(np.asarray(y_true).astype(int), np.asarray(proba), n_bins=n_bins)
    return {"prob_pred": prob_pred.tolist(), "prob_true": prob_true.tolist()}


def top_k_picks(
    table: pd.DataFrame,
    keys: list[np.ndarray],
    top_k: int,
    period_ms: int = MS_PER_DAY,
    seed: int = 0,
) -> np.ndarray:
    """Positional indices of the picks: per period, the ``top_k`` best entries, one row per entry.

    ``keys``: per-row sort keys, most significant first, higher is better. Ties are broken by a seeded
    random order so that no column order (e.g. by hold) leaks into a scorer.
    """
    n = len(table)
    frame = pd.DataFrame(
        {
            "period": table["ts_ms"].to_numpy(dtype=np.int64) // period_ms,
            "ts_ms": table["ts_ms"].to_numpy(),
            "oid": table["opportunity_id"].to_numpy(),
            "pos": np.arange(n),
            **{f"k{i}": np.asarray(k, dtype=np.float64) for i, k in enumerate(keys)},
        }
    )
    frame = frame.iloc[np.random.default_rng(seed).permutation(n)]
    key_cols = [f"k{i}" for i in range(len(keys))]
    frame = frame.sort_values(["period", *key_cols], ascending=[True] + [False] * len(keys), kind="stable")
    best_per_entry = frame.drop_duplicates(subset=["ts_ms", "oid"], keep="first")
    return best_per_entry.groupby("period", sort=True).head(top_k)["pos"].to_numpy(dtype=np.int64)


def ml_vs_rule(
    table: pd.DataFrame,
    ml_scores: Mapping[str, np.ndarray],
    top_k: int,
    period_ms: int = MS_PER_DAY,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per scorer: periods, picks, precision_at_k, mean/median realised profit (%) of picks."""
    profit = table["actual_profit_pct"].to_numpy(dtype=np.float64)
    won = table["was_profitable"].to_numpy().astype(bool)
    hold = table["hold_hours"].to_numpy(dtype=np.float64)
    rule_keys = [table["fund_apr"].to_numpy(dtype=np.float64), -table["break_even_hours"].to_numpy(dtype=np.float64)]
    scorers: dict[str, list[np.ndarray]] = {"rule": rule_keys, **{k: [v] for k, v in ml_scores.items()}}
    n_periods = int(np.unique(table["ts_ms"].to_numpy(dtype=np.int64) // period_ms).size)
    rows = []
    for name, keys in scorers.items():
        picks = top_k_picks(table, keys, top_k, period_ms, seed)
        rows.append(
            {
                "scorer": name,
                "periods": n_periods,
                "picks": int(picks.size),
                "precision_at_k": float(won[picks].mean()),
                "mean_profit_pct": float(profit[picks].mean()),
                "median_profit_pct": float(np.median(profit[picks])),
                "mean_hold_hours": float(hold[picks].mean()),
            }
        )
    rows.append(
        {
            "scorer": "all_entries",
            "periods": n_periods,
            "picks": len(table),
            "precision_at_k": float(won.mean()),
            "mean_profit_pct": float(profit.mean()),
            "median_profit_pct": float(np.median(profit)),
            "mean_hold_hours": float(hold.mean()),
        }
    )
    return pd.DataFrame(rows)


def evaluate(
    test: pd.DataFrame,
    profit_pred: np.ndarray,
    success_proba: np.ndarray,
    top_k: int,
    hold_true_hours: np.ndarray | None = None,
    hold_pred_hours: dict[str, np.ndarray] | None = None,
    period_ms: int = MS_PER_DAY,
    profit_weight: float = 1.0,
    success_weight: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """All test metrics as a JSON-able dict.

    ``test``: the test positions (contract columns); ``profit_pred`` / ``success_proba``: per row.
    ``hold_true_hours``: best simulated hold per test entry; ``hold_pred_hours``: named predictions of
    it (e.g. the hold classifier, the profit-argmax over holds), each scored by MAE in hours and the
    share of exact hits; ``baseline_median_mae_hours`` is a constant guess at the median of the test
    truth itself (an optimistic constant baseline).
    """
    if len(test) == 0:
        raise DataValidationError("evaluate: the test set is empty")
    if len(profit_pred) != len(test) or len(success_proba) != len(test):
        raise DataValidationError("evaluate: predictions and test rows differ in length")
    won = test["was_profitable"].to_numpy().astype(bool)
    success = classification_metrics(won, success_proba)
    success["rule_auc_fund_apr"] = safe_auc(won, test["fund_apr"].to_numpy(dtype=np.float64))
    composite = np.asarray(
        composite_score(
            profit_pred, success_proba, test["hold_hours"].to_numpy(dtype=np.float64), profit_weight, success_weight
        )
    )
    table = ml_vs_rule(
        test,
        {"ml_profit": profit_pred, "ml_composite": composite, "ml_success": success_proba},
        top_k,
        period_ms,
        seed,
    )
    out: dict[str, Any] = {
        "profit": regression_metrics(test["actual_profit_pct"], profit_pred),
        "success": success,
        "calibration": calibration_bins(won, success_proba),
        "ml_vs_rule": table.to_dict(orient="records"),
        "test_rows": len(test),
    }
    if hold_true_hours is not None:
        truth = np.asarray(hold_true_hours, dtype=np.float64)
        hold: dict[str, Any] = {"test_entries": int(truth.size)}
        if truth.size:
            median = float(np.median(truth))
            hold["baseline_median_mae_hours"] = float(np.mean(np.abs(truth - median)))
            for name, pred in (hold_pred_hours or {}).items():
                pred_arr = np.asarray(pred, dtype=np.float64)
                hold[f"{name}_mae_hours"] = float(np.mean(np.abs(pred_arr - truth)))
                hold[f"{name}_exact_share"] = float(np.mean(pred_arr == truth))
        out["hold"] = hold
    return out


def write_importance(models: Mapping[str, Any], out_dir: Path) -> Path:
    """``importance.csv``: per feature, XGBoost's ``gain`` (mean loss reduction per split) of each model.

    ``models``: name -> fitted wrapper (``booster_``, ``feature_names_``); a feature a model never
    splits on (or does not take) gets 0. Sorted by the first model's gain, descending.
    """
    names: list[str] = []
    for model in models.values():
        names += [f for f in model.feature_names_ if f not in names]
    frame = pd.DataFrame({"feature": names})
    for label, model in models.items():
        gain = model.booster_.get_score(importance_type="gain")
        frame[f"{label}_gain"] = [float(gain.get(f, 0.0)) for f in names]
    frame = frame.sort_values(frame.columns[1], ascending=False, kind="stable")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "importance.csv"
    frame.to_csv(path, index=False)
    return path


def write_shap_summary(
    models: Mapping[str, Any],
    X: pd.DataFrame,
    out_dir: Path,
    max_rows: int = 1000,
    top_n: int = 15,
    seed: int = 0,
) -> Path:
    """``shap_summary.png``: one beeswarm-like panel per model from XGBoost's TreeSHAP.

    Each dot is one row of ``X`` (a seeded sample of at most ``max_rows``): its SHAP value (x, in the
    model's margin unit: profit % for the regressor, log-odds for the classifier) for one of the
    ``top_n`` features with the largest mean |SHAP|, coloured by the feature's rank within the sample
    (blue low, red high). ``X`` must hold every model's feature columns.
    """
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    sample = X.iloc[np.sort(rng.choice(len(X), size=min(max_rows, len(X)), replace=False))]
    fig = Figure(figsize=(7.0 * len(models), 0.42 * top_n + 1.6), dpi=100)
    for i, (label, model) in enumerate(models.items()):
        ax = fig.add_subplot(1, len(models), i + 1)
        cols = list(model.feature_names_)
        Xm = sample[cols]
        dm = xgb.DMatrix(Xm.to_numpy(dtype=np.float32), feature_names=cols)
        contrib = np.asarray(model.booster_.predict(dm, pred_contribs=True))[:, : len(cols)]
        order = np.argsort(-np.abs(contrib).mean(axis=0))[:top_n][::-1]
        for row, j in enumerate(order):
            values = Xm.iloc[:, j].to_numpy(dtype=np.float64)
            colour = pd.Series(values).rank(pct=True).to_numpy()
            jitter = rng.uniform(-0.3, 0.3, size=values.size)
            ax.scatter(contrib[:, j], row + jitter, c=colour, cmap="coolwarm", s=4, alpha=0.6, vmin=0, vmax=1)
        ax.set_yticks(range(len(order)), [cols[j] for j in order], fontsize=8)
        ax.axvline(0.0, color="grey", lw=0.8)
        unit = "log-odds" if getattr(model, "_objective", "").startswith("binary") else "percent"
        ax.set_xlabel(f"SHAP value ({unit})")
        ax.set_title(f"{label}: TreeSHAP, {len(sample)} test rows", fontsize=10)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "shap_summary.png"
    fig.savefig(path)
    return path


def write_calibration_plot(y_true: Any, proba: Any, out_dir: Path, n_bins: int = 10) -> Path:
    """``calibration.png``: reliability diagram of P(profitable) plus the histogram of predictions."""
    bins = calibration_bins(y_true, proba, n_bins)
    fig = Figure(figsize=(6.0, 6.5), dpi=100)
    ax, hist = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfectly calibrated")
    ax.plot(bins["prob_pred"], bins["prob_true"], marker="o", label="success classifier")
    ax.set_xlabel("mean predicted P(profitable)")
    ax.set_ylabel("observed share profitable")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    hist.hist(np.asarray(proba, dtype=np.float64), bins=n_bins * 2, range=(0, 1), color="tab:blue")
    hist.set_xlabel("predicted P(profitable)")
    hist.set_ylabel("test positions")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "calibration.png"
    fig.savefig(path)
    return path
