"""Walk-forward backtest of the opportunity scorer: ML composite score vs the rule, one UTC day at a time.

Input: the simulated positions (one row per opportunity entry x hold, the ``simulate`` stage's table) and
their entry-time features (the ``opportunity_features`` stage's table, row-aligned). Times are entry
snapshot times ``ts_ms`` (epoch ms UTC); profits are realised ``actual_profit_pct`` (percent of one leg's
notional over the whole hold) and ``actual_profit_usd`` (for ``simulate.position_usd`` per leg).

Folds (:func:`opportunity_folds`): each test window is one UTC day ``[D, D + 1 day)``; the models of that
fold learn from every position entered before ``D - purge`` (purge = ``opportunity_model.purge_hours`` or,
when 0, the longest simulated hold), so every training position has exited, and its label is known,
before the first test entry. The first test day is the first whole day with at least ``min_train_days`` of
entries before its purge. Training rows are thinned to at most ``max_train_rows`` by keeping every n-th
entry snapshot (consecutive 5-minute snapshots are near-copies; every opportunity and hold of a kept
snapshot stays), a deterministic choice.

Scorers (per test day, the ``top_k`` best entries; an entry is ``(ts_ms, opportunity_id)``, at most one
position each; :func:`cryptoml.models.evaluation.top_k_picks` does the picking, ties broken by a seeded
order):

- ``ml``: the fold's profit and success models (:class:`ProfitRegressor`, :class:`SuccessClassifier`, fixed
  rounds, no early stopping) score every simulated hold of every entry with
  :func:`cryptoml.models.scoring.composite_score`; an entry counts with its best-scoring hold, i.e. the
  model's best hold among the holds simulated for it.
- ``rule``: the live rule scorer (:func:`cryptoml.edge.opportunities.rule_score`): rank by ``fund_apr``
  (desc) then ``break_even_hours`` (asc), hold = the shortest grid hold >= break-even; an entry whose
  break-even exceeds the longest hold is skipped, as is one whose rule hold was not simulated (near the
  end of the data).

Each scorer's result is the realised PnL of its picks from the simulated positions: USD total, mean
percent, hit rate (share of picks that were profitable), and a cumulative PnL curve by exit time
(``ts_ms + actual_hold_hours``). Picks of different days may overlap in time: the PnL is the sum over
positions of one ``position_usd`` notional each, not a capital-constrained portfolio. Deterministic:
fixed seeds, fixed thread count per fit.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cryptoml.atomic import atomic_write_bytes
from cryptoml.backtest.report import json_safe
from cryptoml.config import BacktestParams, OpportunityModelParams
from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.features.opportunity import FEATURE_NAMES
from cryptoml.models.evaluation import top_k_picks
from cryptoml.models.opportunity import ProfitRegressor, SuccessClassifier
from cryptoml.models.scoring import composite_score

__all__ = [
    "OpportunityBacktest",
    "OpportunityBacktestSettings",
    "OpportunityFold",
    "OpportunityFoldData",
    "OpportunityFoldResult",
    "backtest_opportunity_scorer",
    "opportunity_fold_data",
    "opportunity_folds",
    "purge_ms_for",
    "rule_hold_hours",
    "run_opportunity_fold",
    "summarize_opportunity_folds",
    "write_opportunity_report",
]

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
SCORERS = ("ml", "rule")
TEST_COLUMNS = (
    "ts_ms",
    "opportunity_id",
    "hold_hours",
    "fund_apr",
    "break_even_hours",
    "actual_profit_pct",
    "actual_profit_usd",
    "actual_hold_hours",
    "was_profitable",
)
REPORT_FILES = {"json": "opportunity_backtest.json", "png": "opportunity_backtest.png"}


@dataclass(frozen=True)
class OpportunityBacktestSettings:
    """Budget of the opportunity walk-forward (``top_k`` from ``backtest.opportunity_top_k``).

    ``n_estimators``: boosting rounds of each fold's two models; ``max_train_rows``: training rows kept
    per fold (every n-th snapshot); ``min_train_days``: entries needed before the first test day's purge;
    ``n_jobs``: XGBoost threads per fit (1 when folds run in parallel; the same value gives the same trees).
    """

    top_k: int = 20
    n_estimators: int = 100
    max_train_rows: int = 100_000
    min_train_days: float = 2.0
    n_jobs: int = 1

    @classmethod
    def from_params(cls, backtest: BacktestParams, **overrides: Any) -> OpportunityBacktestSettings:
        return cls(**{"top_k": backtest.opportunity_top_k, **overrides})

    def validate(self) -> None:
        for name in ("top_k", "n_estimators", "max_train_rows", "n_jobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"opportunity backtest: {name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.min_train_days) or self.min_train_days <= 0:
            raise ConfigError(f"opportunity backtest: min_train_days must be > 0, got {self.min_train_days}")


@dataclass(frozen=True)
class OpportunityFold:
    """One test day ``[test_start_ms, test_end_ms)``; training entries are those before ``train_end_ms``."""

    index: int
    train_end_ms: int
    test_start_ms: int
    test_end_ms: int


def purge_ms_for(model_params: OpportunityModelParams, hold_hours: Sequence[float]) -> int:
    """``opportunity_model.purge_hours`` (or the longest hold when 0) in ms; never shorter than the longest hold."""
    longest_h = float(max(hold_hours))
    if model_params.purge_hours and model_params.purge_hours < longest_h:
        raise ConfigError(
            f"opportunity_model.purge_hours={model_params.purge_hours:g} is shorter than the longest hold "
            f"{longest_h:g} h: training labels would overlap the test day (use 0 for the minimum)"
        )
    return math.ceil((model_params.purge_hours or longest_h) * MS_PER_HOUR)


def opportunity_folds(entry_ts_ms: np.ndarray, *, purge_ms: int, min_train_ms: int) -> list[OpportunityFold]:
    """One fold per UTC day that has entries, from the first day with ``min_train_ms`` of entries before its purge."""
    ts = np.asarray(entry_ts_ms, dtype=np.int64)
    if ts.size == 0:
        raise DataValidationError("opportunity backtest: no positions")
    first_day = -(-(int(ts.min()) + min_train_ms + purge_ms) // MS_PER_DAY) * MS_PER_DAY
    days = np.unique(ts[ts >= first_day] // MS_PER_DAY) * MS_PER_DAY
    if days.size == 0:
        span_d = (int(ts.max()) - int(ts.min())) / MS_PER_DAY
        need_d = (min_train_ms + purge_ms) / MS_PER_DAY + 1
        raise DataValidationError(
            f"opportunity backtest: entries span {span_d:.2f} days; it needs more than {need_d:g} days "
            f"(training {min_train_ms / MS_PER_DAY:g} d + purge {purge_ms / MS_PER_HOUR:g} h + one test day)"
        )
    return [OpportunityFold(i, int(d) - purge_ms, int(d), int(d) + MS_PER_DAY) for i, d in enumerate(days.tolist())]


def rule_hold_hours(break_even_hours: np.ndarray, grid_hours: Sequence[float]) -> np.ndarray:
    """The rule's hold per entry: the shortest grid hold >= break-even; NaN when none (the rule skips it).

    Vectorised form of the ``hold_hours`` of :func:`cryptoml.edge.opportunities.rule_score`.
    """
    grid = np.unique(np.asarray(grid_hours, dtype=np.float64))
    be = np.asarray(break_even_hours, dtype=np.float64)
    idx = np.searchsorted(grid, np.where(np.isnan(be), np.inf, be), side="left")
    out = np.full(be.shape, np.nan)
    ok = idx < grid.size
    out[ok] = grid[idx[ok]]
    return out


@dataclass(frozen=True)
class OpportunityFoldData:
    """The picklable inputs of one fold: thinned training matrix + labels, the test day's rows."""

    fold: OpportunityFold
    feature_names: tuple[str, ...]
    hold_grid: tuple[float, ...]
    X_train: np.ndarray  # float32 (n_train, features)
    y_profit: np.ndarray  # actual_profit_pct
    y_won: np.ndarray  # was_profitable as 0.0 / 1.0
    train_rows_total: int  # before thinning
    test: pd.DataFrame  # TEST_COLUMNS of the test day's positions
    X_test: np.ndarray  # float32 (n_test, features)


def _checked(positions: pd.DataFrame, features: pd.DataFrame) -> None:
    missing = [c for c in TEST_COLUMNS if c not in positions.columns]
    if missing:
        raise DataValidationError(f"opportunity backtest: positions lack columns {missing}")
    absent = [c for c in FEATURE_NAMES if c not in features.columns]
    if absent or len(features) != len(positions):
        raise DataValidationError(
            f"opportunity backtest: features do not match the positions ({len(features)} rows for "
            f"{len(positions)} positions; missing feature columns {absent[:5]})"
        )


def opportunity_fold_data(
    positions: pd.DataFrame,
    features: pd.DataFrame,
    fold: OpportunityFold,
    settings: OpportunityBacktestSettings,
) -> OpportunityFoldData:
    """Slice one fold out of the positions and their features (row-aligned tables)."""
    _checked(positions, features)
    ts = positions["ts_ms"].to_numpy(dtype=np.int64)
    hold_ms = positions["hold_hours"].to_numpy(dtype=np.float64) * MS_PER_HOUR
    train = ts < fold.train_end_ms
    if (ts[train] + hold_ms[train] > fold.test_start_ms).any():
        raise DataValidationError(
            f"opportunity backtest: fold {fold.index} has training positions that exit after the test day "
            "starts; the purge must be at least the longest hold"
        )
    rows = np.flatnonzero(train)
    if rows.size == 0:
        raise DataValidationError(f"opportunity backtest: fold {fold.index} has no training position")
    # Thin by whole snapshots (every n-th distinct entry time), anchored on the first snapshot of the data.
    snapshots = np.unique(ts)
    stride = math.ceil(rows.size / settings.max_train_rows)
    if stride > 1:
        keep_snapshots = snapshots[::stride]
        rows = rows[np.isin(ts[rows], keep_snapshots)]
    test = np.flatnonzero((ts >= fold.test_start_ms) & (ts < fold.test_end_ms))
    names = tuple(FEATURE_NAMES)
    X = features[list(names)]
    return OpportunityFoldData(
        fold=fold,
        feature_names=names,
        hold_grid=tuple(float(h) for h in np.unique(positions["hold_hours"].to_numpy(dtype=np.float64))),
        X_train=X.iloc[rows].to_numpy(dtype=np.float32),
        y_profit=positions["actual_profit_pct"].to_numpy(dtype=np.float64)[rows],
        y_won=positions["was_profitable"].to_numpy().astype(np.float64)[rows],
        train_rows_total=int(train.sum()),
        test=positions.iloc[test][list(TEST_COLUMNS)].reset_index(drop=True),
        X_test=X.iloc[test].to_numpy(dtype=np.float32),
    )


@dataclass(frozen=True)
class OpportunityFoldResult:
    """One test day: the picks of both scorers (``scorer`` column + TEST_COLUMNS + ``score``) and its metrics."""

    fold: OpportunityFold
    picks: pd.DataFrame
    metrics: dict[str, Any]


def _scorer_metrics(picks: pd.DataFrame) -> dict[str, Any]:
    n = len(picks)
    return {
        "picks": n,
        "pnl_usd": float(picks["actual_profit_usd"].sum()) if n else 0.0,
        "mean_profit_pct": float(picks["actual_profit_pct"].mean()) if n else None,
        "hit_rate": float(picks["was_profitable"].mean()) if n else None,
        "mean_hold_hours": float(picks["hold_hours"].mean()) if n else None,
    }


def run_opportunity_fold(
    data: OpportunityFoldData, model_params: OpportunityModelParams, settings: OpportunityBacktestSettings
) -> OpportunityFoldResult:
    """Fit the fold's profit and success models, pick each scorer's top-k of the test day, score the picks."""
    settings.validate()
    names = list(data.feature_names)
    budget = {"n_estimators": settings.n_estimators, "n_jobs": settings.n_jobs}
    X_train = pd.DataFrame(data.X_train, columns=names)
    profit_model = ProfitRegressor.from_params(model_params, **budget).fit(X_train, data.y_profit)
    success_model = SuccessClassifier.from_params(model_params, **budget).fit(X_train, data.y_won)
    test = data.test
    picks = []
    if len(test):
        X_test = pd.DataFrame(data.X_test, columns=names)
        composite = np.asarray(
            composite_score(
                profit_model.predict(X_test),
                success_model.predict_proba(X_test)[:, 1],
                test["hold_hours"].to_numpy(dtype=np.float64),
                model_params.composite_profit_weight,
                model_params.composite_success_weight,
            ),
            dtype=np.float64,
        )
        seed = model_params.random_state
        ml = top_k_picks(test, [composite], settings.top_k, MS_PER_DAY, seed)
        picks.append(test.iloc[ml].assign(scorer="ml", score=composite[ml]))
        rule_hold = rule_hold_hours(test["break_even_hours"].to_numpy(), data.hold_grid)
        eligible = np.flatnonzero(test["hold_hours"].to_numpy(dtype=np.float64) == rule_hold)
        if eligible.size:
            table = test.iloc[eligible].reset_index(drop=True)
            keys = [table["fund_apr"].to_numpy(dtype=np.float64), -table["break_even_hours"].to_numpy(dtype=np.float64)]
            rule = top_k_picks(table, keys, settings.top_k, MS_PER_DAY, seed)
            picks.append(table.iloc[rule].assign(scorer="rule", score=table["fund_apr"].to_numpy()[rule]))
    columns = ["scorer", *TEST_COLUMNS, "score"]
    frame = pd.concat(picks, ignore_index=True)[columns] if picks else pd.DataFrame(columns=columns)
    frame = frame.sort_values(["scorer", "ts_ms", "opportunity_id"], kind="stable").reset_index(drop=True)
    by = {s: frame[frame["scorer"] == s] for s in SCORERS}
    metrics: dict[str, Any] = {
        "fold": data.fold.index,
        "test_start_ms": data.fold.test_start_ms,
        "test_end_ms": data.fold.test_end_ms,
        "train_end_ms": data.fold.train_end_ms,
        "train_rows": int(data.X_train.shape[0]),
        "train_rows_before_thinning": data.train_rows_total,
        "test_positions": len(test),
        "test_entries": int(test[["ts_ms", "opportunity_id"]].drop_duplicates().shape[0]) if len(test) else 0,
        "all_positions_mean_profit_pct": float(test["actual_profit_pct"].mean()) if len(test) else None,
        **{s: _scorer_metrics(by[s]) for s in SCORERS},
    }
    return OpportunityFoldResult(fold=data.fold, picks=frame, metrics=metrics)


@dataclass(frozen=True)
class OpportunityBacktest:
    """Every fold's metrics, all picks, the cumulative PnL curves and the overall comparison."""

    folds: list[dict[str, Any]]
    picks: pd.DataFrame
    curve: pd.DataFrame  # scorer, exit_ms, pnl_usd, cum_pnl_usd (one row per pick, by exit time)
    overall: dict[str, Any]


def summarize_opportunity_folds(results: Sequence[OpportunityFoldResult]) -> OpportunityBacktest:
    """Combine fold results (in fold order) into picks, curves and overall metrics per scorer."""
    results = sorted(results, key=lambda r: r.fold.index)
    picks = pd.concat([r.picks.assign(fold=r.fold.index) for r in results], ignore_index=True)
    exit_ms = picks["ts_ms"].to_numpy(dtype=np.int64) + np.round(
        picks["actual_hold_hours"].to_numpy(dtype=np.float64) * MS_PER_HOUR
    ).astype(np.int64)
    curve = (
        pd.DataFrame({"scorer": picks["scorer"], "exit_ms": exit_ms, "pnl_usd": picks["actual_profit_usd"]})
        .assign(ts_ms=picks["ts_ms"], opportunity_id=picks["opportunity_id"])
        .sort_values(["scorer", "exit_ms", "ts_ms", "opportunity_id"], kind="stable")
        .reset_index(drop=True)
    )
    curve["cum_pnl_usd"] = curve.groupby("scorer", sort=False)["pnl_usd"].cumsum()
    folds = [r.metrics for r in results]
    overall: dict[str, Any] = {
        "folds": len(folds),
        "first_test_ms": results[0].fold.test_start_ms if results else None,
        "last_test_end_ms": results[-1].fold.test_end_ms if results else None,
        **{s: _scorer_metrics(picks[picks["scorer"] == s]) for s in SCORERS},
    }
    ml_days = [f["ml"]["pnl_usd"] for f in folds]
    rule_days = [f["rule"]["pnl_usd"] for f in folds]
    overall["ml_minus_rule_pnl_usd"] = overall["ml"]["pnl_usd"] - overall["rule"]["pnl_usd"]
    overall["days_ml_beats_rule"] = int(sum(m > r for m, r in zip(ml_days, rule_days, strict=True)))
    return OpportunityBacktest(
        folds=folds, picks=picks, curve=curve[["scorer", "exit_ms", "pnl_usd", "cum_pnl_usd"]], overall=overall
    )


def backtest_opportunity_scorer(
    positions: pd.DataFrame,
    features: pd.DataFrame,
    model_params: OpportunityModelParams,
    settings: OpportunityBacktestSettings,
) -> OpportunityBacktest:
    """The whole walk-forward, serially (the flow fans :func:`run_opportunity_fold` out instead)."""
    settings.validate()
    _checked(positions, features)
    folds = opportunity_folds(
        positions["ts_ms"].to_numpy(dtype=np.int64),
        purge_ms=purge_ms_for(model_params, positions["hold_hours"].unique().tolist()),
        min_train_ms=round(settings.min_train_days * MS_PER_DAY),
    )
    return summarize_opportunity_folds(
        [
            run_opportunity_fold(opportunity_fold_data(positions, features, f, settings), model_params, settings)
            for f in folds
        ]
    )


def _png(result: OpportunityBacktest, title: str) -> bytes:
    fig = Figure(figsize=(10.0, 6.4), dpi=100)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    colours = {"ml": "tab:blue", "rule": "tab:orange"}
    labels = {"ml": "ML composite (best hold)", "rule": "rule (fund_apr, break-even hold)"}
    for s in SCORERS:
        c = result.curve[result.curve["scorer"] == s]
        if len(c):
            top.step(
                c["exit_ms"].to_numpy().astype("datetime64[ms]"),
                c["cum_pnl_usd"],
                where="post",
                color=colours[s],
                label=labels[s],
            )
    top.axhline(0.0, color="grey", lw=0.6)
    top.set_ylabel("cumulative realised PnL (USD)")
    top.set_xlabel("position exit time (UTC)")
    top.set_title(f"{title}: top-{_top_k(result)} picks per UTC day, realised simulated PnL", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    days = np.asarray([f["test_start_ms"] for f in result.folds], dtype=np.int64).astype("datetime64[ms]")
    width = np.timedelta64(MS_PER_DAY * 2 // 5, "ms")
    for offset, s in ((-1, "ml"), (1, "rule")):
        values = [f[s]["pnl_usd"] for f in result.folds]
        bottom.bar(
            days + offset * width // 2 + np.timedelta64(MS_PER_DAY // 2, "ms"),
            values,
            width=width,
            color=colours[s],
            label=s,
        )
    bottom.axhline(0.0, color="grey", lw=0.6)
    bottom.set_ylabel("PnL of the day's picks (USD)")
    bottom.set_xlabel("entry day (UTC)")
    bottom.legend(loc="upper left", fontsize=8)
    bottom.grid(alpha=0.3)
    for ax in (top, bottom):
        ax.tick_params(axis="x", labelrotation=25)  # not autofmt_xdate: it hides the top panel's own time axis
    fig.tight_layout()
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})  # no version tag: same input, same bytes
    return buf.getvalue()


def _top_k(result: OpportunityBacktest) -> int:
    counts = result.picks.groupby(["scorer", "fold"]).size()
    return int(counts.max()) if len(counts) else 0


def write_opportunity_report(
    result: OpportunityBacktest,
    out_dir: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    title: str = "Opportunity scorer",
) -> dict[str, Path]:
    """Write ``opportunity_backtest.json`` (overall, per fold, settings) and ``opportunity_backtest.png`` atomically."""
    doc = {"overall": result.overall, "folds": result.folds, "settings": settings or {}}
    text = json.dumps(json_safe(doc, "opportunity_backtest"), indent=2, sort_keys=True, allow_nan=False) + "\n"
    png = _png(result, title)
    paths = {k: Path(out_dir) / v for k, v in REPORT_FILES.items()}
    atomic_write_bytes(text.encode("utf-8"), paths["json"])
    atomic_write_bytes(png, paths["png"])
    return paths
