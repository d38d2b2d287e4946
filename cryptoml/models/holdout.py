"""A model's held-out test set, saved beside its bundle, so two model versions are scored on the SAME rows.

The export stage writes the test window a model was evaluated on (raw, unscaled inputs and the label in
its own units); the registry keeps it with each version and scores a challenger and the champion on the
challenger's holdout before moving the ``champion`` alias. NumPy and the standard library only: the edge
runner may import it.

File format (``holdout.npz``): a zip of ``X.npy``, ``y.npy``, ``ts_ms.npy`` and ``holdout.json`` (feature
names, metric, label, format version), every member deflated at a fixed level with a fixed 1980-01-01
date, so the same arrays always give the same bytes (``dvc repro`` stays a no-op; ``numpy.savez`` would
stamp the current time). ``numpy.load`` can read the arrays too.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryptoml.atomic import atomic_write_bytes
from cryptoml.errors import DataValidationError, ModelContractError

if TYPE_CHECKING:  # bundle.py imports onnxruntime: only the functions that take a Bundle need it
    from cryptoml.export.bundle import Bundle

HOLDOUT_FILE = "holdout.npz"
FORMAT_VERSION = 1
_META_MEMBER = "holdout.json"
_ARRAY_MEMBERS = ("X", "y", "ts_ms")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold: no wall clock in the bytes
_DEFLATE_LEVEL = 6


# --- metrics: fn(y_true, y_pred) -> float, NaN when undefined ---------------------------------------


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    yt = np.asarray(y_true, dtype=np.float64).ravel()
    yp = np.asarray(y_pred, dtype=np.float64).ravel()
    if yt.shape != yp.shape:
        raise DataValidationError(f"metric: {yt.size} true values but {yp.size} predictions")
    return yt, yp


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span (as scipy's rankdata)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def mse(y_true: Any, y_pred: Any) -> float:
    """Mean squared error, in the label's unit squared."""
    yt, yp = _pair(y_true, y_pred)
    return float(np.mean((yt - yp) ** 2)) if yt.size else math.nan


def rmse(y_true: Any, y_pred: Any) -> float:
    """Root mean squared error, in the label's unit."""
    return math.sqrt(mse(y_true, y_pred))


def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error, in the label's unit (``mae_hours`` when the label is a hold duration in hours)."""
    yt, yp = _pair(y_true, y_pred)
    return float(np.mean(np.abs(yt - yp))) if yt.size else math.nan


def roc_auc(y_true: Any, y_score: Any) -> float:
    """ROC AUC by the Mann-Whitney U statistic (tied scores count one half); positives are ``y_true > 0``.

    NaN when only one class is present.
    """
    yt, ys = _pair(y_true, y_score)
    positive = yt > 0
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(average_ranks(ys)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def information_coefficient(y_true: Any, y_pred: Any) -> float:
    """Spearman rank correlation of prediction and outcome (ties get average ranks); NaN if either is constant."""
    yt, yp = _pair(y_true, y_pred)
    if yt.size < 2:
        return math.nan
    rt, rp = average_ranks(yt), average_ranks(yp)
    if rt.std() == 0 or rp.std() == 0:
        return math.nan
    return float(np.corrcoef(rt, rp)[0, 1])


def directional_accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of rows with a non-zero true value whose predicted sign matches it (a zero prediction misses).

    NaN when no true value is non-zero.
    """
    yt, yp = _pair(y_true, y_pred)
    moved = yt != 0
    if not moved.any():
        return math.nan
    return float(np.mean(np.sign(yp[moved]) == np.sign(yt[moved])))


Metric = Callable[[np.ndarray, np.ndarray], float]

#: name -> (fn(y_true, y_pred), higher_is_better)
HOLDOUT_METRICS: dict[str, tuple[Metric, bool]] = {
    "rmse": (rmse, False),
    "mae": (mae, False),
    "mse": (mse, False),
    "mae_hours": (mae, False),
    "auc": (roc_auc, True),
    "ic": (information_coefficient, True),
    "directional_accuracy": (directional_accuracy, True),
}

# Metrics that make sense per kind of prediction (meta["prediction"]["type"]); `cryptoml compare` shows these
# plus the holdout's headline metric. A probability's "mse" is the Brier score.
METRICS_BY_PREDICTION: dict[str, tuple[str, ...]] = {
    "value": ("rmse", "mae", "mse", "ic", "directional_accuracy"),
    "probability_class_1": ("auc", "mse"),
    "class_probabilities": ("mae", "rmse", "ic"),
}


def higher_is_better(metric: str) -> bool:
    return _metric(metric)[1]


def _metric(name: str) -> tuple[Metric, bool]:
    try:
        return HOLDOUT_METRICS[name]
    except KeyError:
        raise ModelContractError(
            f"unknown holdout metric {name!r} (expected one of {sorted(HOLDOUT_METRICS)})"
        ) from None


def metric_value(metric: str, y_true: Any, y_pred: Any) -> float:
    """``HOLDOUT_METRICS[metric]`` of the pair; ModelContractError on an unknown metric name."""
    fn, _ = _metric(metric)
    return float(fn(np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)))


def applicable_metrics(prediction_type: str, headline: str | None = None) -> tuple[str, ...]:
    """The metrics worth reporting for a prediction type, the headline metric first."""
    names = METRICS_BY_PREDICTION.get(prediction_type, ())
    if headline is None:
        return names
    return (headline, *(n for n in names if n != headline))


# --- the holdout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holdout:
    """The held-out rows of one model, raw, in the label's units.

    ``X``: float32, ``(n, f)`` feature rows or ``(n, steps, channels)`` windows, unscaled (the bundle's
    scaler is applied at prediction time), last axis named by ``feature_names``. ``y``: float64 ``(n,)``,
    finite, the label (e.g. ``actual_profit_pct`` in %, ``was_profitable`` 0/1, hold hours, a log return).
    ``ts_ms``: int64 ``(n,)``, epoch ms of each row (entry time of a position, or bar-open time of a
    window's last bar). ``metric``: key of :data:`HOLDOUT_METRICS`, the model's headline holdout metric.
    Arrays are converted to those dtypes on construction; a shape, dtype or name that breaks the contract
    raises DataValidationError.
    """

    X: np.ndarray
    y: np.ndarray
    ts_ms: np.ndarray
    feature_names: tuple[str, ...]
    metric: str
    label: str
    # Optional (n, k) bool: which of a multi-class model's k classes were possible for each row (e.g. the holds
    # simulated for an entry near the data's end); the predicted class is then the likeliest possible one.
    candidates: np.ndarray | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once here so every holdout has the same dtypes
        try:
            set_(self, "X", np.ascontiguousarray(np.asarray(self.X, dtype=np.float32)))
            set_(self, "y", np.ascontiguousarray(np.asarray(self.y, dtype=np.float64)))
            ts = np.asarray(self.ts_ms)
        except (TypeError, ValueError) as e:
            raise DataValidationError(f"holdout: arrays are not numeric ({e})") from e
        if ts.dtype.kind not in "iu" and ts.size:
            raise DataValidationError(f"holdout: ts_ms must be integer epoch milliseconds, got dtype {ts.dtype}")
        set_(self, "ts_ms", np.ascontiguousarray(ts.astype(np.int64)))
        set_(self, "feature_names", tuple(str(n) for n in self.feature_names))
        X, y, names = self.X, self.y, self.feature_names
        if X.ndim not in (2, 3):
            raise DataValidationError(f"holdout: X must be (n, features) or (n, steps, channels), got {X.shape}")
        if len(X) == 0:
            raise DataValidationError("holdout: no rows")
        if y.shape != (len(X),) or self.ts_ms.shape != (len(X),):
            raise DataValidationError(
                f"holdout: X has {len(X)} rows but y has shape {y.shape} and ts_ms {self.ts_ms.shape}"
            )
        if len(names) != X.shape[-1] or len(set(names)) != len(names):
            raise DataValidationError(
                f"holdout: {len(names)} feature_names (distinct: {len(set(names))}) for the last axis of X of "
                f"size {X.shape[-1]}"
            )
        if not np.isfinite(y).all():
            raise DataValidationError(
                f"holdout: label {self.label!r} has {int((~np.isfinite(y)).sum())} non-finite values"
            )
        if self.metric not in HOLDOUT_METRICS:
            raise DataValidationError(
                f"holdout: unknown metric {self.metric!r} (expected one of {sorted(HOLDOUT_METRICS)})"
            )
        if not isinstance(self.label, str) or not self.label:
            raise DataValidationError("holdout: label must be a non-empty string")
        if self.candidates is not None:
            cand = np.ascontiguousarray(np.asarray(self.candidates, dtype=bool))
            if cand.ndim != 2 or len(cand) != len(X) or not cand.any(axis=1).all():
                raise DataValidationError(
                    f"holdout: candidates must be (n, classes) with at least one True per row, got {cand.shape}"
                )
            set_(self, "candidates", cand)

    @property
    def higher_is_better(self) -> bool:
        return HOLDOUT_METRICS[self.metric][1]

    def columns(self, names: Sequence[str], where: str = "holdout") -> np.ndarray:
        """``X`` restricted to ``names`` in that order (last axis); ModelContractError naming absent names."""
        index = {n: i for i, n in enumerate(self.feature_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ModelContractError(
                f"{where}: the holdout lacks features {missing} the model needs (it has {list(self.feature_names)})"
            )
        picked = [index[n] for n in names]
        if picked == list(range(len(self.feature_names))):
            return self.X
        return np.ascontiguousarray(self.X[..., picked])


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16  # a fixed mode, whatever the umask
    info.create_system = 3  # unix, on any platform
    zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=_DEFLATE_LEVEL)


def holdout_bytes(holdout: Holdout) -> bytes:
    """The bytes of ``holdout.npz`` (deterministic: the same holdout gives the same bytes)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "feature_names": list(holdout.feature_names),
        "metric": holdout.metric,
        "label": holdout.label,
        "rows": len(holdout.X),
        "x_shape": list(holdout.X.shape),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in _ARRAY_MEMBERS:
            _member(zf, f"{name}.npy", _npy_bytes(getattr(holdout, name)))
        if holdout.candidates is not None:
            _member(zf, "candidates.npy", _npy_bytes(holdout.candidates))
        _member(zf, _META_MEMBER, (json.dumps(meta, sort_keys=True, indent=2) + "\n").encode("utf-8"))
    return buf.getvalue()


def save_holdout(path: Path, holdout: Holdout) -> Path:
    """Write ``holdout`` to ``path`` (conventionally ``<bundle>/../holdout.npz`` or beside the bundle) atomically;
    the same arrays and names always give the same bytes. Returns ``path``."""
    return atomic_write_bytes(holdout_bytes(holdout), Path(path))


def load_holdout(path: Path) -> Holdout:
    """Read a holdout written by :func:`save_holdout`; DataValidationError naming the file and what is wrong."""
    path = Path(path)
    where = f"holdout {path}"
    if not path.is_file():
        raise DataValidationError(f"{where}: file not found")
    try:
        with zipfile.ZipFile(path) as zf:
            members = set(zf.namelist())
            wanted = [f"{n}.npy" for n in _ARRAY_MEMBERS] + [_META_MEMBER]
            missing = [m for m in wanted if m not in members]
            if missing:
                raise DataValidationError(f"{where}: missing members {missing} (has {sorted(members)})")
            meta = json.loads(zf.read(_META_MEMBER).decode("utf-8"))
            arrays = {
                n: np.lib.format.read_array(io.BytesIO(zf.read(f"{n}.npy")), allow_pickle=False) for n in _ARRAY_MEMBERS
            }
            candidates = (
                np.lib.format.read_array(io.BytesIO(zf.read("candidates.npy")), allow_pickle=False)
                if "candidates.npy" in members
                else None
            )
    except DataValidationError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataValidationError(f"{where}: not a readable holdout zip ({e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataValidationError(f"{where}: {_META_MEMBER} is not valid JSON ({e})") from e
    except ValueError as e:  # a malformed .npy header, or an object array that would need pickle
        raise DataValidationError(f"{where}: an array member is malformed ({e})") from e
    if not isinstance(meta, dict):
        raise DataValidationError(f"{where}: {_META_MEMBER} must hold a JSON object")
    absent = [k for k in ("format_version", "feature_names", "metric", "label") if k not in meta]
    if absent:
        raise DataValidationError(f"{where}: {_META_MEMBER} lacks {absent}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataValidationError(
            f"{where}: format_version {meta['format_version']!r}, this code reads {FORMAT_VERSION}"
        )
    names = meta["feature_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataValidationError(f"{where}: feature_names must be a list of strings")
    try:
        return Holdout(
            X=arrays["X"],
            y=arrays["y"],
            ts_ms=arrays["ts_ms"],
            feature_names=tuple(names),
            metric=str(meta["metric"]),
            label=str(meta["label"]),
            candidates=candidates,
        )
    except DataValidationError as e:
        raise DataValidationError(f"{where}: {str(e).removeprefix('holdout: ')}") from e


# --- scoring a bundle --------------------------------------------------------------------------------


def predict_label(bundle: Bundle, X_raw: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """The bundle's prediction of raw inputs ``X_raw`` (feature order = ``bundle.feature_names``), float64 (n,),
    in the label's units.

    A regression gives its value (a sequence model through :meth:`Bundle.predict_raw`: the stored scaler is
    applied to the inputs and the target mapped back); a binary classifier the probability of class 1; a
    multi-class classifier the class of highest probability, ``meta["classes"][argmax]`` (e.g. hold hours),
    among the ``candidates`` (``(n, classes)`` bool) of each row when given.
    """
    pred_type = bundle.meta["prediction"]["type"]
    out = bundle.predict_raw(X_raw)
    if pred_type == "class_probabilities":
        try:
            classes = np.asarray(bundle.meta["classes"], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ModelContractError(
                f"model {bundle.name}: classes {bundle.meta['classes']} are not numeric, so no label value can be "
                "predicted"
            ) from e
        if out.ndim != 2 or out.shape[1] != classes.size:
            raise ModelContractError(f"model {bundle.name}: {out.shape} probabilities for {classes.size} classes")
        if candidates is not None:
            if candidates.shape != out.shape:
                raise ModelContractError(
                    f"model {bundle.name}: candidates of shape {candidates.shape} for {out.shape} probabilities"
                )
            out = np.where(candidates, out, -np.inf)
        return classes[np.argmax(out, axis=1)]
    if out.ndim != 1:
        raise ModelContractError(f"model {bundle.name}: prediction of shape {out.shape} is not one value per row")
    return out


def score_bundle(bundle: Bundle, holdout: Holdout, metric: str | None = None) -> float:
    """``metric`` (default ``holdout.metric``) of ``bundle`` on ``holdout``.

    The holdout's columns are picked by name in ``bundle.feature_names`` order (ModelContractError naming
    the features the holdout lacks), predicted with :func:`predict_label` and compared with ``holdout.y``.
    """
    X = holdout.columns(bundle.feature_names, where=f"model {bundle.name}")
    return metric_value(metric or holdout.metric, holdout.y, predict_label(bundle, X, holdout.candidates))
