"""Shadow comparison: a challenger's live shadow predictions against the champion's, on the same bars.

NumPy and the standard library only (plus the project's numpy-only metric functions).

The edge runner predicts with the champion (``slot="champion"``, traded) and the challenger (``slot="shadow"``,
logged only) on every closed bar, and labels both ``horizon`` bars later with the realised log return (see
:mod:`cryptoml.edge.state`). This module scores the two on **the same bars**: an inner join on
``(symbol, bar_ts_ms)`` of the two models' *labelled* predictions, where ``bar_ts_ms`` is the open time (UTC
epoch ms) of the bar the prediction was made at the close of. Bars only one of them predicted (the challenger
was registered mid-way, a restart, warm-up) are left out, so neither model is scored on bars the other never
saw. Each model is scored against its own stored label (normally the same number).

Per model (:class:`ModelScore`): ``n``, directional accuracy (share of bars with a non-zero realised return
whose sign the prediction got right), IC and MSE (in the label's unit squared). **IC is the Spearman rank
correlation** (:func:`cryptoml.models.holdout.information_coefficient`), the headline metric the registry
records for ``price_lgbm``'s holdout (tag ``holdout_metric = ic``), so a shadow verdict and a holdout
promotion measure the same thing. Any metric of :data:`~cryptoml.models.holdout.HOLDOUT_METRICS` can be the
headline (its direction comes from there).

The verdict (:func:`compare_shadow`), in this order:

- ``insufficient``: fewer than ``min_predictions`` compared bars, or the compared bars span less than
  ``min_hours`` (from the open of the first compared bar to the close of the last): not enough evidence yet;
- ``better``: the challenger beats the champion on the headline metric by **more than** ``margin`` (the
  metric's units; for a lower-is-better metric, ``champion - challenger > margin``), the registry's rule;
- ``not_better``: otherwise, including a metric that is undefined (NaN) for either model (e.g. constant
  predictions have no IC): a challenger that cannot be shown better is never better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.models.holdout import HOLDOUT_METRICS, directional_accuracy, information_coefficient, mse

INSUFFICIENT, BETTER, NOT_BETTER = "insufficient", "better", "not_better"
STATUSES = (INSUFFICIENT, BETTER, NOT_BETTER)
DEFAULT_METRIC = "ic"
BAR_MS = 60_000  # the runner's 1-minute bars
HOUR_MS = 3_600_000


@dataclass(frozen=True, eq=False)
class Outcomes:
    """Labelled predictions of one model in one slot, one row per (symbol, bar).

    ``bar_ts_ms`` int64 bar open times (UTC epoch ms); ``prediction`` and ``realised_return`` float64 in the
    label's unit (a log return over the model's horizon); ``symbol`` optional (None: one symbol).
    """

    bar_ts_ms: np.ndarray
    prediction: np.ndarray
    realised_return: np.ndarray
    symbol: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        bar_ts_ms: Any,
        prediction: Any,
        realised_return: Any,
        symbol: Sequence[str] | np.ndarray | None = None,
        *,
        what: str = "outcomes",
    ) -> Outcomes:
        """Checked arrays: equal lengths, finite values, no (symbol, bar) twice; DataValidationError naming ``what``."""
        ts = np.asarray(bar_ts_ms)
        if ts.size and not np.issubdtype(ts.dtype, np.integer):
            raise DataValidationError(f"{what}.bar_ts_ms: expected integer epoch ms, got dtype {ts.dtype}")
        ts = ts.astype(np.int64).ravel()
        pred = np.asarray(prediction, dtype=np.float64).ravel()
        real = np.asarray(realised_return, dtype=np.float64).ravel()
        sym = None if symbol is None else np.asarray(symbol, dtype=object).ravel()
        sizes = {"bar_ts_ms": ts.size, "prediction": pred.size, "realised_return": real.size}
        if sym is not None:
            sizes["symbol"] = sym.size
        if len(set(sizes.values())) > 1:
            raise DataValidationError(f"{what}: arrays of different lengths {sizes}")
        for name, values in (("prediction", pred), ("realised_return", real)):
            bad = ~np.isfinite(values)
            if bad.any():
                raise DataValidationError(
                    f"{what}.{name}: {int(bad.sum())} non-finite values (first at bar {int(ts[np.argmax(bad)])})"
                )
        keys = _keys(ts, sym, _symbol_codes(sym, sym))
        if np.unique(keys).size != keys.size:
            raise DataValidationError(f"{what}: the same (symbol, bar_ts_ms) appears more than once")
        return cls(ts, pred, real, sym)

    def __len__(self) -> int:
        return int(self.bar_ts_ms.size)


@dataclass(frozen=True)
class ModelScore:
    """One model's scores over the compared bars. NaN where a metric is undefined (too few rows, constant)."""

    n: int
    directional_accuracy: float
    ic: float  # Spearman rank correlation of prediction and realised return
    mse: float  # label unit squared
    headline: float  # the value of the comparison's headline metric

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "directional_accuracy": _finite_or_none(self.directional_accuracy),
            "ic": _finite_or_none(self.ic),
            "mse": _finite_or_none(self.mse),
            "headline": _finite_or_none(self.headline),
        }


@dataclass(frozen=True)
class ShadowComparison:
    """The verdict of :func:`compare_shadow` and the numbers behind it (see the module docstring)."""

    status: str  # insufficient | better | not_better
    reason: str
    metric: str
    higher_is_better: bool
    margin: float
    gain: float  # challenger's advantage in the metric's units (positive = better); NaN when undefined
    n: int  # compared bars (labelled by both models)
    hours: float  # span of the compared bars, first bar open to last bar close
    first_bar_ts_ms: int | None
    last_bar_ts_ms: int | None
    min_hours: float
    min_predictions: int
    champion: ModelScore
    challenger: ModelScore

    @property
    def better(self) -> bool:
        return self.status == BETTER

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None)."""
        return {
            "status": self.status,
            "reason": self.reason,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "margin": self.margin,
            "gain": _finite_or_none(self.gain),
            "n": self.n,
            "hours": self.hours,
            "first_bar_ts_ms": self.first_bar_ts_ms,
            "last_bar_ts_ms": self.last_bar_ts_ms,
            "min_hours": self.min_hours,
            "min_predictions": self.min_predictions,
            "champion": self.champion.to_dict(),
            "challenger": self.challenger.to_dict(),
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _symbol_codes(sym: np.ndarray | None, universe: np.ndarray | None) -> np.ndarray | None:
    """Integer codes of ``sym`` within the sorted distinct values of ``universe``."""
    if sym is None or universe is None:
        return None
    names = np.unique(universe.astype(str))
    return np.searchsorted(names, sym.astype(str)).astype(np.int64)


def _keys(ts: np.ndarray, sym: np.ndarray | None, codes: np.ndarray | None) -> np.ndarray:
    """One sortable join key per row: (symbol code, bar) as a structured array, or just the bar."""
    if sym is None or codes is None:
        return ts
    out = np.empty(ts.size, dtype=[("symbol", np.int64), ("bar_ts_ms", np.int64)])
    out["symbol"], out["bar_ts_ms"] = codes, ts
    return out


@dataclass(frozen=True)
class AlignedOutcomes:
    """The bars both models predicted and had labelled, sorted by (symbol, bar)."""

    bar_ts_ms: np.ndarray
    champion_prediction: np.ndarray
    challenger_prediction: np.ndarray
    champion_realised: np.ndarray
    challenger_realised: np.ndarray


def align_on_bars(champion: Outcomes, challenger: Outcomes) -> AlignedOutcomes:
    """Inner join of the two models' labelled predictions on ``(symbol, bar_ts_ms)``, or on ``bar_ts_ms`` alone
    when neither names symbols (each then holds one symbol's rows)."""
    if (champion.symbol is None) != (challenger.symbol is None):
        raise DataValidationError("shadow comparison: give symbols for both models' outcomes or for neither")
    if champion.symbol is not None and challenger.symbol is not None:
        universe = np.concatenate([champion.symbol, challenger.symbol])
        a = _keys(champion.bar_ts_ms, champion.symbol, _symbol_codes(champion.symbol, universe))
        b = _keys(challenger.bar_ts_ms, challenger.symbol, _symbol_codes(challenger.symbol, universe))
    else:
        a, b = champion.bar_ts_ms, challenger.bar_ts_ms
    _, ia, ib = np.intersect1d(a, b, assume_unique=True, return_indices=True)
    return AlignedOutcomes(
        bar_ts_ms=champion.bar_ts_ms[ia],
        champion_prediction=champion.prediction[ia],
        challenger_prediction=challenger.prediction[ib],
        champion_realised=champion.realised_return[ia],
        challenger_realised=challenger.realised_return[ib],
    )


def score(prediction: np.ndarray, realised_return: np.ndarray, metric: str = DEFAULT_METRIC) -> ModelScore:
    """n, directional accuracy, Spearman IC, MSE and the headline ``metric`` of predictions vs realised returns."""
    fn, _ = _metric(metric)
    n = int(np.asarray(prediction).size)
    return ModelScore(
        n=n,
        directional_accuracy=directional_accuracy(realised_return, prediction) if n else math.nan,
        ic=information_coefficient(realised_return, prediction),
        mse=mse(realised_return, prediction),
        headline=float(fn(realised_return, prediction)) if n else math.nan,
    )


def _metric(metric: str) -> tuple[Any, bool]:
    if metric not in HOLDOUT_METRICS:
        raise ConfigError(f"shadow comparison: unknown metric {metric!r} (one of {sorted(HOLDOUT_METRICS)})")
    return HOLDOUT_METRICS[metric]


def compare_shadow(
    champion: Outcomes,
    challenger: Outcomes,
    *,
    metric: str = DEFAULT_METRIC,
    margin: float = 0.0,
    min_hours: float,
    min_predictions: int,
    bar_ms: int = BAR_MS,
) -> ShadowComparison:
    """Score both models on the bars they share and decide ``insufficient`` / ``better`` / ``not_better``.

    ``margin`` in the metric's units (>= 0); ``min_hours`` the shortest span of compared bars that counts
    (``retrain.shadow_hours``); ``min_predictions`` the fewest compared bars (``retrain.min_shadow_predictions``);
    ``bar_ms`` the bar length, so ``k`` consecutive bars span ``k * bar_ms``.
    """
    _, higher = _metric(metric)
    if not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"shadow comparison: margin must be a finite number >= 0, got {margin!r}")
    if not (math.isfinite(min_hours) and min_hours >= 0) or min_predictions < 1 or bar_ms <= 0:
        raise ConfigError(
            f"shadow comparison: need min_hours >= 0, min_predictions >= 1 and bar_ms > 0 "
            f"(got {min_hours!r}, {min_predictions!r}, {bar_ms!r})"
        )
    joined = align_on_bars(champion, challenger)
    n = int(joined.bar_ts_ms.size)
    first = int(joined.bar_ts_ms.min()) if n else None
    last = int(joined.bar_ts_ms.max()) if n else None
    hours = 0.0 if first is None or last is None else (last - first + bar_ms) / HOUR_MS
    champ = score(joined.champion_prediction, joined.champion_realised, metric)
    chall = score(joined.challenger_prediction, joined.challenger_realised, metric)
    gain = (chall.headline - champ.headline) if higher else (champ.headline - chall.headline)
    numbers = (
        f"{metric} ({'higher' if higher else 'lower'} is better) over {n} shared labelled bars ({hours:.1f} h): "
        f"challenger {_fmt(chall.headline)} vs champion {_fmt(champ.headline)}, gain {_fmt(gain)}"
    )
    if n < min_predictions or hours < min_hours:
        short = []
        if n < min_predictions:
            short.append(f"{n} < {min_predictions} compared predictions")
        if hours < min_hours:
            short.append(f"{hours:.1f} h < {min_hours:g} h of shadow")
        status, reason = INSUFFICIENT, f"not enough shadow evidence yet ({', '.join(short)}); {numbers}"
    elif math.isfinite(gain) and gain > margin:
        status, reason = BETTER, f"{numbers} > margin {margin:g}"
    else:
        why = f"<= margin {margin:g}" if math.isfinite(gain) else f"cannot win: the {metric} is undefined"
        status, reason = NOT_BETTER, f"{numbers} {why}"
    return ShadowComparison(
        status=status,
        reason=reason,
        metric=metric,
        higher_is_better=higher,
        margin=float(margin),
        gain=float(gain),
        n=n,
        hours=hours,
        first_bar_ts_ms=first,
        last_bar_ts_ms=last,
        min_hours=float(min_hours),
        min_predictions=int(min_predictions),
        champion=champ,
        challenger=chall,
    )


def _fmt(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else "n/a"
