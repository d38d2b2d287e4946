"""Feature drift (PSI) and performance triggers of the live price model: the numbers behind ``drift_check``.

NumPy and the standard library only (the edge box may run the check next to the runner).

**PSI** (population stability index) of one feature between a *reference* sample (the model's training
window) and a *recent* sample (the runner's stored features over ``drift.window_hours``)::

    PSI = sum_b (q_b - p_b) * ln(q_b / p_b)

``p_b`` / ``q_b`` are the shares of the reference / recent rows in bin ``b``, each raised to ``floor``
when smaller (an empty bin would make the log infinite). Bins come from the **reference** alone:

- interior edges are the reference's quantiles at ``1/bins .. (bins-1)/bins``, taken as data values
  (``inverted_cdf``), de-duplicated; an edge at or below the reference minimum is dropped, so every
  reference bin holds at least one reference value even when a feature has a point mass (ties: a
  discrete feature such as ``volume_price_divergence``, or a flat stretch); when more than
  ``(bins - 1) / bins`` of the reference sits at its minimum, the one edge splits the minimum from the rest;
- bins are ``(-inf, e_1), [e_1, e_2), ..., [e_k, +inf)``: the outer bins are open-ended, so recent
  values outside the reference's range land in them instead of being lost;
- a constant reference ``c`` gets the three bins ``< c``, ``== c``, ``> c`` (any change then shows);
- non-finite values (NaN, e.g. warm-up rows; inf) are dropped from either side and counted.

Same-distribution samples of ``n`` rows give ``PSI ~ (bins - 1) / n`` on average when the rows are
independent (``n * PSI`` is close to a chi-square with ``bins - 1`` degrees of freedom), so the default
0.25 threshold is far in that tail at ``n = 500``; consecutive live bars are **not** independent (see
``tests/monitoring/test_drift.py`` for the false-alarm rates measured on the real BTC month).

**Performance triggers** over the labelled champion predictions and the runner's equity (each reports
its value, threshold, sample size and a status: ``fired``, ``ok`` or ``insufficient data``; a trigger
with too few samples never fires):

- ``rolling_sharpe``: annualised Sharpe of the per-bar simple returns of the runner's equity (24/7:
  ``365 * 24 * 60`` one-minute bars a year), below ``rolling_sharpe_min``; a flat equity (no position in
  the window) has no Sharpe and counts as insufficient data;
- ``directional_accuracy``: share of labelled predictions with a non-zero realised return whose sign the
  prediction got right (the definition of :func:`cryptoml.models.holdout.directional_accuracy`, which
  the training stage reports), below ``directional_accuracy_min``;
- ``accuracy_ratio``: that recent accuracy divided by the historical one (the bundle's test-window
  ``metrics.directional_accuracy``), below ``accuracy_ratio_min``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryptoml.config import DriftParams
from cryptoml.errors import DataValidationError
from cryptoml.models.holdout import directional_accuracy

FIRED, OK, INSUFFICIENT = "fired", "ok", "insufficient data"
MINUTES_PER_YEAR = 365 * 24 * 60  # crypto trades 24/7
BAR_MS = 60_000


# ------------------------------------------------------------------------------------------------ PSI
@dataclass(frozen=True)
class PsiResult:
    """PSI of one feature with its binning: ``edges`` (interior, increasing; ``len(edges) + 1`` bins),
    ``reference_share`` / ``recent_share`` per bin (before the floor), rows used and non-finite rows dropped."""

    psi: float
    edges: np.ndarray
    reference_share: np.ndarray
    recent_share: np.ndarray
    n_reference: int
    n_recent: int
    dropped_reference: int
    dropped_recent: int


def _finite(values: Any, what: str) -> tuple[np.ndarray, int]:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"psi: {what} is not numeric ({e})") from e
    if arr.ndim != 1:
        raise DataValidationError(f"psi: {what} must be one-dimensional, got shape {arr.shape}")
    keep = np.isfinite(arr)
    return arr[keep], int(arr.size - keep.sum())


def reference_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Interior bin edges from the finite, non-empty ``reference`` (see the module docstring)."""
    if bins < 2:
        raise DataValidationError(f"psi: bins must be >= 2, got {bins}")
    lowest = reference.min()
    edges = np.unique(np.quantile(reference, np.arange(1, bins) / bins, method="inverted_cdf"))
    edges = edges[edges > lowest]  # an edge at the minimum would leave the bin below it empty
    if edges.size:
        return edges
    above = reference[reference > lowest]
    if above.size:  # more than (bins - 1) / bins of the mass sits at the minimum: split it from the rest
        return np.array([above.min()])
    return np.array([lowest, np.nextafter(lowest, np.inf)])  # a constant reference: below / equal / above


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # side="right": a value equal to an edge belongs to the bin that starts there, on both sides alike.
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)
    return counts / values.size


@dataclass(frozen=True)
class ReferenceBins:
    """The binning of one feature's reference sample, fitted once and reused for many recent samples."""

    edges: np.ndarray  # interior edges, increasing; len(edges) + 1 bins
    share: np.ndarray  # reference share per bin (before the floor)
    n: int  # finite reference values used
    dropped: int  # non-finite reference values dropped
    floor: float

    @classmethod
    def fit(cls, reference: Any, *, bins: int = 10, floor: float = 1e-4) -> ReferenceBins:
        """Bins of ``reference`` (1-D); DataValidationError without a finite value or with ``floor`` outside (0, 1)."""
        if not 0 < floor < 1:
            raise DataValidationError(f"psi: floor must be in (0, 1), got {floor}")
        ref, dropped = _finite(reference, "reference")
        if ref.size == 0:
            raise DataValidationError(f"psi: the reference has no finite values ({dropped} dropped)")
        edges = reference_edges(ref, bins)
        return cls(edges, _shares(ref, edges), int(ref.size), dropped, floor)

    def psi(self, recent: Any) -> PsiResult:
        """PSI of ``recent`` (1-D) against this reference; DataValidationError when it has no finite value."""
        rec, dropped = _finite(recent, "recent")
        if rec.size == 0:
            raise DataValidationError(f"psi: the recent sample has no finite values ({dropped} dropped)")
        q = _shares(rec, self.edges)
        pf, qf = np.maximum(self.share, self.floor), np.maximum(q, self.floor)
        value = float(np.sum((qf - pf) * np.log(qf / pf)))
        return PsiResult(value, self.edges, self.share, q, self.n, int(rec.size), self.dropped, dropped)


def psi_detail(reference: Any, recent: Any, *, bins: int = 10, floor: float = 1e-4) -> PsiResult:
    """PSI of ``recent`` against ``reference`` (1-D samples of one feature) with the binning used.

    Raises DataValidationError when either side has no finite value or ``floor`` is not in (0, 1).
    """
    return ReferenceBins.fit(reference, bins=bins, floor=floor).psi(recent)


def psi(reference: Any, recent: Any, *, bins: int = 10, floor: float = 1e-4) -> float:
    """PSI of ``recent`` against ``reference`` (dimensionless, >= 0; 0 = identical binned shares)."""
    return psi_detail(reference, recent, bins=bins, floor=floor).psi


def block_psi_quantile(
    reference: Any, block_rows: int, *, bins: int = 10, floor: float = 1e-4, q: float = 0.99, blocks: int = 200
) -> float | None:
    """The ``q`` quantile of the PSI of ``blocks`` runs of ``block_rows`` consecutive reference rows against the
    whole reference: what a same-length window of the training period itself scores, autocorrelation included.

    ``reference``: 1-D, in time order (non-finite values dropped first). Block starts are evenly spaced, so
    the figure is deterministic. None when the reference holds fewer than ``2 * block_rows`` finite values.
    """
    fitted = ReferenceBins.fit(reference, bins=bins, floor=floor)
    ref, _ = _finite(reference, "reference")
    if block_rows < 1 or ref.size < 2 * block_rows:
        return None
    starts = np.unique(np.linspace(0, ref.size - block_rows, blocks).astype(np.int64))
    values = [fitted.psi(ref[s : s + block_rows]).psi for s in starts]
    return float(np.quantile(values, q))


@dataclass(frozen=True)
class FeatureDrift:
    """PSI of one feature and whether it fired (``psi > threshold`` with at least ``min_samples`` rows)."""

    feature: str
    psi: float | None  # None when the recent window holds no finite value
    threshold: float
    n_reference: int
    n_recent: int
    min_samples: int
    dropped_reference: int
    dropped_recent: int
    bins: int  # bins actually used (ties can merge quantile bins)
    status: str
    # PSI that runs of n_recent consecutive reference rows reach at the 99th percentile (None: not computed)
    reference_block_p99: float | None = None

    @property
    def fired(self) -> bool:
        return self.status == FIRED

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in self.__dict__.items()}


def _check_matrix(X: Any, names: Sequence[str], what: str) -> np.ndarray:
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"feature_psi: the {what} matrix is not numeric ({e})") from e
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise DataValidationError(
            f"feature_psi: the {what} matrix must be (rows, {len(names)} features), got shape {arr.shape}"
        )
    return arr


def feature_psi(
    reference: Any, recent: Any, names: Sequence[str], params: DriftParams, *, block_context: bool = False
) -> tuple[FeatureDrift, ...]:
    """PSI per column of ``reference`` (n_ref, f) vs ``recent`` (n, f), columns named by ``names``.

    A feature fires when its PSI exceeds ``params.psi_threshold``; with fewer than ``params.min_samples``
    finite recent values its PSI is still reported but its status is ``insufficient data``.
    ``block_context``: also report :func:`block_psi_quantile` of blocks as long as the recent sample
    (``reference`` rows must then be in time order): how far the training window's own stretches of
    that length stray, i.e. how much of a PSI autocorrelation alone explains. It does not change firing.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise DataValidationError(f"feature_psi: duplicate feature names in {names}")
    ref, rec = _check_matrix(reference, names, "reference"), _check_matrix(recent, names, "recent")
    out = []
    for j, name in enumerate(names):
        ref_j, rec_j = ref[:, j], rec[:, j]
        if not np.isfinite(ref_j).any():
            raise DataValidationError(f"feature_psi: the reference has no finite value of {name!r}")
        n_ref, n_recent = int(np.isfinite(ref_j).sum()), int(np.isfinite(rec_j).sum())
        fitted = ReferenceBins.fit(ref_j, bins=params.psi_bins, floor=params.psi_floor)
        value = fitted.psi(rec_j).psi if n_recent else None
        block_p99 = None
        if block_context and n_recent:
            block_p99 = block_psi_quantile(ref_j, n_recent, bins=params.psi_bins, floor=params.psi_floor)
        if n_recent < params.min_samples or value is None:
            status = INSUFFICIENT
        else:
            status = FIRED if value > params.psi_threshold else OK
        out.append(
            FeatureDrift(
                feature=name,
                psi=value,
                threshold=params.psi_threshold,
                n_reference=n_ref,
                n_recent=n_recent,
                min_samples=params.min_samples,
                dropped_reference=int(ref_j.size - n_ref),
                dropped_recent=int(rec_j.size - n_recent),
                bins=fitted.edges.size + 1,
                status=status,
                reference_block_p99=block_p99,
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------------- performance triggers
@dataclass(frozen=True)
class Trigger:
    """One performance trigger: fires when ``value < threshold`` with at least ``min_samples`` samples."""

    name: str
    value: float | None
    threshold: float
    n: int
    min_samples: int
    status: str
    detail: str = ""

    @property
    def fired(self) -> bool:
        return self.status == FIRED

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in self.__dict__.items()}


def _below(name: str, value: float | None, threshold: float, n: int, min_n: int, detail: str) -> Trigger:
    if value is None or not math.isfinite(value) or n < min_n:
        return Trigger(name, value, threshold, n, min_n, INSUFFICIENT, detail)
    return Trigger(name, value, threshold, n, min_n, FIRED if value < threshold else OK, detail)


def annualised_sharpe(equity: Any, *, bar_ms: int = BAR_MS) -> tuple[float | None, int]:
    """``(Sharpe, number of returns)`` of an equity curve sampled once per bar (24/7 annualisation).

    Sharpe = mean / std (ddof = 1) of the simple per-bar returns x sqrt(bars per year); None with fewer
    than two returns or when the equity never changed (no position: no risk taken, no Sharpe).
    """
    eq = np.asarray(equity, dtype=np.float64).ravel()
    if not np.isfinite(eq).all() or (eq.size and eq.min() <= 0):
        raise DataValidationError("rolling Sharpe: the equity series must be finite and > 0")
    if bar_ms <= 0:
        raise DataValidationError(f"rolling Sharpe: bar_ms must be > 0, got {bar_ms}")
    returns = eq[1:] / eq[:-1] - 1.0
    if returns.size < 2:
        return None, int(returns.size)
    std = float(returns.std(ddof=1))
    if std == 0.0:
        return None, int(returns.size)
    bars_per_year = MINUTES_PER_YEAR * 60_000 / bar_ms
    return float(returns.mean() / std * math.sqrt(bars_per_year)), int(returns.size)


def performance_triggers(
    predictions: Any,
    realised: Any,
    equity: Any,
    historical_accuracy: float | None,
    params: DriftParams,
    *,
    bar_ms: int = BAR_MS,
) -> tuple[Trigger, ...]:
    """The three performance triggers (module docstring).

    ``predictions`` / ``realised``: the labelled champion predictions and their realised returns (same
    units, e.g. 10-minute log returns; equal lengths). ``equity``: the runner's equity (quote currency)
    once per bar over the window, oldest first. ``historical_accuracy``: the model's directional
    accuracy on its test window (a share, 0..1), None when unknown (then the ratio trigger reports
    insufficient data). Sample sizes: labelled predictions with a non-zero realised return, and equity
    returns; each needs ``params.min_outcomes``.
    """
    pred = np.asarray(predictions, dtype=np.float64).ravel()
    real = np.asarray(realised, dtype=np.float64).ravel()
    if pred.shape != real.shape:
        raise DataValidationError(f"performance triggers: {pred.size} predictions but {real.size} realised returns")
    if not (np.isfinite(pred).all() and np.isfinite(real).all()):
        raise DataValidationError("performance triggers: predictions and realised returns must be finite")
    n_min = params.min_outcomes
    sharpe, n_returns = annualised_sharpe(equity, bar_ms=bar_ms)
    sharpe_detail = "equity did not change in the window (no position)" if sharpe is None and n_returns >= 2 else ""
    moved = int(np.count_nonzero(real))
    accuracy = directional_accuracy(real, pred) if moved else None
    if accuracy is not None and math.isnan(accuracy):
        accuracy = None
    ratio: float | None = None
    ratio_detail = f"historical directional accuracy {historical_accuracy}"
    if historical_accuracy is None or not math.isfinite(historical_accuracy) or historical_accuracy <= 0:
        ratio_detail = "no historical directional accuracy in the bundle's metrics"
    elif accuracy is not None:
        ratio = accuracy / historical_accuracy
    accuracy_detail = f"{moved} labelled predictions with a non-zero realised return"
    return (
        _below("rolling_sharpe", sharpe, params.rolling_sharpe_min, n_returns, n_min, sharpe_detail),
        _below("directional_accuracy", accuracy, params.directional_accuracy_min, moved, n_min, accuracy_detail),
        _below("accuracy_ratio", ratio, params.accuracy_ratio_min, moved, n_min, ratio_detail),
    )


# ------------------------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class DriftReport:
    """Everything one drift check found. ``context`` holds the window, reference and model description
    (plain JSON values); ``notes`` explain missing inputs (then the report is ``insufficient data``)."""

    features: tuple[FeatureDrift, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    context: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def fired(self) -> list[str]:
        """One line per fired check, e.g. ``psi rsi_14=0.41`` or ``directional_accuracy=0.52<0.6``."""
        out = [f"psi {f.feature}={f.psi:.3g}" for f in self.features if f.fired and f.psi is not None]
        out += [f"{t.name}={t.value:.3g}<{t.threshold:g}" for t in self.triggers if t.fired and t.value is not None]
        return out

    @property
    def status(self) -> str:
        if self.fired:
            return FIRED
        statuses = [c.status for c in self.features] + [t.status for t in self.triggers]
        if all(s == INSUFFICIENT for s in statuses):  # also when nothing could be checked at all
            return INSUFFICIENT
        return OK

    def reason(self) -> str:
        """A one-line retrain reason, e.g. ``drift: psi rsi_14=0.41, directional_accuracy=0.52<0.6``."""
        return "drift: " + ", ".join(self.fired) if self.fired else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "fired": self.fired,
            "reason": self.reason(),
            "notes": list(self.notes),
            "context": _json_number(dict(self.context)),
            "features": [f.to_dict() for f in self.features],
            "triggers": [t.to_dict() for t in self.triggers],
        }


def _json_number(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, NaN / inf to None (strict JSON has no such numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _json_number(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_number(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
