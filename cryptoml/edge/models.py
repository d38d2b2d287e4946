"""The loaded model bundles of the edge and what they answer: opportunity scores and price forecasts.

:class:`ModelSet` loads every bundle folder under a directory (``models/<name>/model.onnx`` +
``model_meta.json``) with :func:`cryptoml.export.bundle.load_bundle`, checking each known name's kind
and ordered features against this code's feature definitions. A corrupt, mismatched or unloadable bundle
is skipped with its reason (logged, and listed by :meth:`ModelSet.describe`); it never stops the others
from loading. The HTTP API (:mod:`cryptoml.edge.api`) and the edge runner share this class; it knows
nothing of HTTP. Imports: numpy, onnxruntime and the project's numpy-only modules.

Opportunity scoring (:meth:`ModelSet.score_opportunities`), one entry snapshot per row:

- features: :func:`~cryptoml.features.opportunity.feature_matrix` of the row's entry-time fields at each
  candidate hold (``hold_hours`` given: that hold only; else every hold of the grid = the hold model's
  classes, else the ``hold_grid_hours`` the set was built with);
- ``opportunity_profit`` (percent of one leg's notional over the hold) and ``opportunity_success``
  (P(profitable)) at each candidate, then :func:`~cryptoml.models.scoring.composite_score`;
- **best hold = the candidate with the highest composite score.** Why not the hold model's own pick:
  the composite is the score that ranks opportunities, so the chosen hold is the one under which this
  opportunity ranks best, and its profit, probability and score are the models' answers at that very
  hold. The hold model (one row per entry, trained on the best *realised* hold) is still run, and its
  choice and probability are reported beside (``hold_model_hours``), so the two can be compared live;
- Kelly size :func:`~cryptoml.models.scoring.kelly_fraction` of the chosen hold's probability, with the
  payoff ratio from the training window's mean win / mean loss (``sizing`` in the profit or success
  bundle's meta, or in its ``metrics``); without them an even payoff (b = 1) is assumed and said so.

Price forecast (:meth:`ModelSet.predict_price`) from recent closed 1-minute bars (oldest first):
``price_lgbm`` predicts the forward log return over its ``horizon_minutes`` from the streaming technical
features of the last bar; the Keras model chosen by :func:`~cryptoml.models.sentiment.choose_price_model`
(sentiment variant when every bar of its window has a sentiment reading, else price-only) predicts the
next bar's log return from the raw window, scaled as its meta says (:meth:`Bundle.predict_raw`). The main
answer is ``price_lgbm``'s (the strategy's model and horizon) when it can answer, else the Keras one; every
answer is listed and the reason says which model answered and why the others did not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from cryptoml.errors import ConfigError, DataValidationError, ModelContractError
from cryptoml.export.bundle import META_FILE, MODEL_FILE, Bundle, check_features, load_bundle
from cryptoml.features.opportunity import ENTRY_FEATURE_NAMES, FEATURE_NAMES, INPUT_COLUMNS, feature_matrix
from cryptoml.features.streaming import StreamingFeatures
from cryptoml.features.technical import BAR_MS, TECHNICAL_FEATURES, WARMUP_BARS
from cryptoml.models.scoring import composite_score, kelly_fraction
from cryptoml.models.sentiment import (
    PRICE_FEATURES,
    PRICE_ONLY_MODEL,
    SENTIMENT_COLUMNS,
    SENTIMENT_MODEL,
    SENTIMENT_PRICE_FEATURES,
    choose_price_model,
)

__all__ = [
    "BAR_COLUMNS",
    "EXPECTED",
    "HOLD_MODEL",
    "OPPORTUNITY_MODELS",
    "PRICE_LGBM",
    "PROFIT_MODEL",
    "SUCCESS_MODEL",
    "ModelSet",
    "SequencePredictor",
    "SkippedBundle",
    "bundle_version",
    "check_edge_bundle",
    "registry_version",
]

log = logging.getLogger(__name__)

PROFIT_MODEL = "opportunity_profit"
SUCCESS_MODEL = "opportunity_success"
HOLD_MODEL = "opportunity_hold"
PRICE_LGBM = "price_lgbm"
OPPORTUNITY_MODELS = (PROFIT_MODEL, SUCCESS_MODEL, HOLD_MODEL)
NOT_TRAINED_FILE = "NOT_TRAINED.json"  # left by the export instead of a bundle when a variant was not trained

# Known bundle names -> (kind, ordered features this code computes for it).
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    PROFIT_MODEL: ("xgboost_regressor", FEATURE_NAMES),
    SUCCESS_MODEL: ("xgboost_classifier", FEATURE_NAMES),
    HOLD_MODEL: ("xgboost_multiclass", ENTRY_FEATURE_NAMES),
    PRICE_LGBM: ("lightgbm_regressor", TECHNICAL_FEATURES),
    PRICE_ONLY_MODEL: ("keras_sequence", PRICE_FEATURES),
    SENTIMENT_MODEL: ("keras_sequence", SENTIMENT_PRICE_FEATURES),
}
BAR_COLUMNS = ("ts_ms", "open", "high", "low", "close", "volume")
DEFAULT_SENTIMENT_MAX_AGE_MS = 60 * BAR_MS  # as params.yaml price_keras.sentiment_max_age_minutes
_ENTRY_COLUMNS = [FEATURE_NAMES.index(n) for n in ENTRY_FEATURE_NAMES]  # hold-model inputs within FEATURE_NAMES


@dataclass(frozen=True)
class SkippedBundle:
    """A folder under the models directory that is not served, and why."""

    path: str
    reason: str


def registry_version(meta: Mapping[str, Any]) -> str | None:
    """The MLflow registry version recorded in a bundle's meta (``registry_version`` or
    ``registry.version``, set when the bundle came from the registry), else None."""
    registry = meta.get("registry")
    version = meta.get("registry_version")
    if version is None and isinstance(registry, Mapping):
        version = registry.get("version")
    text = "" if version is None else str(version).strip().removeprefix("v")
    return text or None


def bundle_version(meta: Mapping[str, Any]) -> str:
    """``v<N>`` when the meta records a registry version, else ``sha256:<first 12 hex of model.onnx>``:
    either way it changes whenever the model does."""
    version = registry_version(meta)
    return f"v{version}" if version is not None else f"sha256:{str(meta['onnx_sha256'])[:12]}"


def _check_known(bundle: Bundle) -> None:
    """A known name must have its kind; a Keras bundle also its scaler (inputs and target)."""
    kind, _ = EXPECTED[bundle.name]
    where = f"bundle {bundle.path}"
    if bundle.kind != kind:
        raise ModelContractError(f"{where}: {bundle.name} must be a {kind}, the meta says {bundle.kind}")
    if kind == "keras_sequence":
        shape = bundle.meta["input_shape"]
        if len(shape) != 3 or not isinstance(shape[1], int):
            raise ModelContractError(f"{where}: a price sequence model needs input [null, bars, channels], got {shape}")
        scaler = bundle.meta.get("scaler")
        if not isinstance(scaler, Mapping) or not isinstance(scaler.get("target"), Mapping):
            raise ModelContractError(f"{where}: needs the scaler (inputs and target) it was trained with")
    if kind == "xgboost_multiclass":
        classes = bundle.meta["classes"]
        if not all(isinstance(c, int | float) and not isinstance(c, bool) and c > 0 for c in classes):
            raise ModelContractError(f"{where}: the hold model's classes must be hold hours > 0, got {classes}")


def _dry_run(bundle: Bundle) -> None:
    """One prediction of a row of ones (scaled as the meta says): a graph or scaler that fails at run time
    is refused at load rather than on the first request."""
    sample = np.ones([1, *(d or 1 for d in bundle.meta["input_shape"][1:])], dtype=np.float64)
    try:
        out = bundle.predict_raw(sample)
    except ModelContractError:
        raise
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise ModelContractError(f"bundle {bundle.path}: a trial prediction failed: {e}") from e
    if not np.isfinite(out).all():
        raise ModelContractError(f"bundle {bundle.path}: a trial prediction is not finite ({out.ravel()[:3]})")


def check_edge_bundle(bundle: Bundle) -> None:
    """The checks :meth:`ModelSet.load` applies to a known bundle, for callers loading one at a time (the
    runner's hot swap): a known name, its kind and ordered features, a Keras scaler / the hold classes,
    and one finite trial prediction. Raises ModelContractError naming what is wrong."""
    if bundle.name not in EXPECTED:
        raise ModelContractError(
            f"bundle {bundle.path}: {bundle.name!r} is not a model the edge knows ({sorted(EXPECTED)})"
        )
    check_features(bundle.feature_names, EXPECTED[bundle.name][1], f"bundle {bundle.path}")
    _check_known(bundle)
    _dry_run(bundle)


class SequencePredictor:
    """:meth:`Bundle.predict_raw` of one window for a Keras sequence bundle, without per-call allocations.

    The edge runner calls it on every bar: the scaling (``(x - min) / span`` in float64, then float32, as
    ``predict_raw``) writes into buffers made once, and the session is run directly, so the answer is
    bit-identical to ``float(bundle.predict_raw(window[None])[0])`` at a fraction of the Python overhead.
    ``window``: ``(steps, channels)`` float64 raw values, oldest bar first; returns the target in its units.
    """

    def __init__(self, bundle: Bundle) -> None:
        _check_known(bundle)  # a sequence model with its scaler
        meta = bundle.meta
        scaler = meta["scaler"]
        lo = np.asarray(scaler["feature_min"], dtype=np.float64)
        span = np.asarray(scaler["feature_max"], dtype=np.float64) - lo
        self.steps = int(meta["input_shape"][1])
        self.channels = len(bundle.feature_names)
        if lo.shape != (self.channels,) or scaler.get("kind") != "minmax":
            raise ModelContractError(f"model {bundle.name}: scaler is not a minmax over its {self.channels} inputs")
        self._lo, self._span = lo, np.where(span > 0, span, 1.0)
        target = scaler["target"]
        self._mean, self._std = float(target["mean"]), float(target["std"])
        self._x64 = np.empty((self.steps, self.channels), dtype=np.float64)
        self._x32 = np.empty((1, self.steps, self.channels), dtype=np.float32)
        self._run = bundle.session.run
        self._outputs = [meta["prediction"]["output"]]
        self._feed = {meta["input_name"]: self._x32}
        self.bundle = bundle

    def __call__(self, window: np.ndarray) -> float:
        if window.shape != self._x64.shape:
            raise ModelContractError(f"model {self.bundle.name}: window {window.shape} is not {self._x64.shape}")
        np.subtract(window, self._lo, out=self._x64)
        np.divide(self._x64, self._span, out=self._x64)
        self._x32[0] = self._x64  # float64 -> float32, as predict_raw's astype
        out = self._run(self._outputs, self._feed)[0]
        return float(out.reshape(-1)[0]) * self._std + self._mean


def _sizing(meta: Mapping[str, Any]) -> tuple[float, float] | None:
    metrics = meta.get("metrics")
    for source in (meta.get("sizing"), metrics.get("sizing") if isinstance(metrics, Mapping) else None):
        if isinstance(source, Mapping):
            try:
                win, loss = float(source["mean_win_pct"]), float(source["mean_loss_pct"])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(win) and math.isfinite(loss) and win >= 0 and loss >= 0:
                return win, loss
    return None


def _as_array(values: Any, name: str, n: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"{name} is not numeric: {e}") from e
    if n is not None and arr.size != n:
        raise DataValidationError(f"{name} has {arr.size} values, expected {n}")
    return arr


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


_LABEL_INPUTS = ("strategy", "regime")
# Types whose float() is the very float64 np.asarray(..., dtype=np.float64) holds (np.float64 is a float).
_PLAIN_NUMBERS = frozenset({float, int, bool, np.float64})


def _numeric_column(rows: Sequence[Mapping[str, Any]], name: str, counts: Sequence[int]) -> list[float]:
    """Column ``name`` of ``rows`` (None = NaN) as Python floats, row ``i``'s value repeated ``counts[i]``
    times: the values and errors of ``_as_array([...], name, len(rows))`` repeated per candidate.

    Plain Python numbers are converted one by one with ``float()``; any other value (a string, a
    sequence, a NumPy scalar, an int beyond float range) sends the column through ``_as_array``, so its
    value or its error is exactly NumPy's."""
    values: list[float] = []
    try:
        for row, k in zip(rows, counts, strict=True):
            v = row[name]
            if isinstance(v, Enum):
                v = v.value
            if v is None:
                values += [math.nan] * k
            elif type(v) in _PLAIN_NUMBERS:
                values += [float(v)] * k
            else:
                break
        else:
            return values
    except OverflowError:
        pass
    plain = [_plain(row[name]) for row in rows]
    arr = _as_array([np.nan if v is None else v for v in plain], name, len(rows))
    out: list[float] = np.repeat(arr, counts).tolist()
    return out


def _best_candidates(score: np.ndarray, scores: list[float], counts: Sequence[int]) -> list[int]:
    """Index of each row's best candidate (rows' candidates are consecutive, ``counts[i]`` of row ``i``):
    the highest score, ties to the first (the shortest hold of the grid). ``scores`` is ``score.tolist()``."""
    if any(s != s for s in scores):  # NaN: max() would depend on its position; sort it last as NumPy does
        entry = np.repeat(np.arange(len(counts)), counts)
        order = np.lexsort((-score, entry))
        picked: list[int] = order[np.r_[0, np.flatnonzero(np.diff(entry[order])) + 1]].tolist()
        return picked
    first: list[int] = []
    start = 0
    for k in counts:
        block = scores[start : start + k]
        first.append(start + block.index(max(block)))  # max and index both keep the first of equal values
        start += k
    return first


class ModelSet:
    """The bundles the edge serves, by name, plus the folders it skipped and why.

    Build with :meth:`load`; a set never changes once built (a model swap builds a new one), so threads
    may share it. ``composite_profit_weight``, ``composite_success_weight``, ``kelly_fraction``
    and ``kelly_cap`` are ``opportunity_model`` params; ``hold_grid_hours`` is the candidate grid used
    when no hold model is loaded; ``sentiment_max_age_ms``: an older reading counts as missing.
    """

    def __init__(
        self,
        bundles: Mapping[str, Bundle],
        skipped: Sequence[SkippedBundle] = (),
        *,
        composite_profit_weight: float = 1.0,
        composite_success_weight: float = 1.0,
        kelly_fraction: float = 0.25,
        kelly_cap: float = 0.2,
        hold_grid_hours: Sequence[float] | None = None,
        sentiment_max_age_ms: int = DEFAULT_SENTIMENT_MAX_AGE_MS,
    ) -> None:
        self.bundles: Mapping[str, Bundle] = MappingProxyType(dict(bundles))  # read-only: swap = a new ModelSet
        self.skipped: tuple[SkippedBundle, ...] = tuple(skipped)
        self.composite_profit_weight = float(composite_profit_weight)
        self.composite_success_weight = float(composite_success_weight)
        self.kelly_fraction = float(kelly_fraction)
        self.kelly_cap = float(kelly_cap)
        self.sentiment_max_age_ms = int(sentiment_max_age_ms)
        hold = self.bundles.get(HOLD_MODEL)
        grid = hold.meta["classes"] if hold is not None else hold_grid_hours
        self.hold_grid_hours: tuple[float, ...] | None = (
            tuple(float(h) for h in grid) if grid is not None and len(grid) else None
        )
        if self.hold_grid_hours is not None and not all(math.isfinite(h) and h > 0 for h in self.hold_grid_hours):
            raise ConfigError(f"hold grid must hold finite hours > 0, got {list(self.hold_grid_hours)}")
        self.sizing: tuple[float, float] | None = None
        for name in (PROFIT_MODEL, SUCCESS_MODEL):
            if self.sizing is None and name in self.bundles:
                self.sizing = _sizing(self.bundles[name].meta)
        self._opportunity_version = ",".join(
            f"{name}={bundle_version(self.bundles[name].meta)}"
            for name in (PROFIT_MODEL, SUCCESS_MODEL, HOLD_MODEL)
            if name in self.bundles
        )

    @classmethod
    def load(cls, models_dir: Path, **options: Any) -> ModelSet:
        """Load every bundle folder directly under ``models_dir`` (sorted by folder name).

        A sub-folder holding ``model.onnx`` or ``model_meta.json`` is a bundle; one that fails to load, has
        a known name with the wrong kind or features, repeats a name already loaded or fails a trial
        prediction is skipped with the reason. A folder with ``NOT_TRAINED.json`` is listed as skipped with
        the reason it records. Other folders (native models, caches) are ignored. Raises ConfigError when
        ``models_dir`` is not a folder.
        """
        root = Path(models_dir)
        if not root.is_dir():
            raise ConfigError(f"models directory {root} does not exist or is not a folder")
        bundles: dict[str, Bundle] = {}
        skipped: list[SkippedBundle] = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if (folder / NOT_TRAINED_FILE).is_file():
                skipped.append(SkippedBundle(str(folder), f"not trained: {_not_trained_reason(folder)}"))
                continue
            if not ((folder / MODEL_FILE).exists() or (folder / META_FILE).exists()):
                continue
            try:
                bundle = load_bundle(folder)
                if bundle.name in EXPECTED:
                    check_features(bundle.feature_names, EXPECTED[bundle.name][1], f"bundle {folder}")
                    _check_known(bundle)
                if bundle.name in bundles:
                    raise ModelContractError(f"bundle {folder}: name {bundle.name} already loaded from another folder")
                _dry_run(bundle)
            except (ModelContractError, OSError) as e:  # OSError: unreadable files
                skipped.append(SkippedBundle(str(folder), str(e)))
                log.warning("model bundle skipped: %s", e)
                continue
            bundles[bundle.name] = bundle
            log.info("model bundle %s loaded (%s, %s)", bundle.name, bundle.kind, bundle_version(bundle.meta))
        return cls(bundles, skipped, **options)

    # --- description ---------------------------------------------------------------------------------

    def versions(self) -> dict[str, str]:
        """Model name -> version (see :func:`bundle_version`)."""
        return {name: bundle_version(b.meta) for name, b in sorted(self.bundles.items())}

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: each loaded model (name, kind, version, sha256, registry version, features,
        horizon) and each skipped folder with its reason."""
        models = []
        for name, b in sorted(self.bundles.items()):
            models.append(
                {
                    "name": name,
                    "kind": b.kind,
                    "version": bundle_version(b.meta),
                    "onnx_sha256": str(b.meta["onnx_sha256"]),
                    "registry_version": registry_version(b.meta),
                    "n_features": len(b.feature_names),
                    "horizon_minutes": self._horizon_minutes(b),
                    "path": str(b.path),
                }
            )
        return {
            "models": models,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
        }

    @staticmethod
    def _horizon_minutes(bundle: Bundle) -> int | None:
        value = bundle.meta.get("horizon_minutes")
        if value is None and isinstance(bundle.meta.get("label"), Mapping):
            value = bundle.meta["label"].get("horizon_minutes")
        if value is None and bundle.kind == "keras_sequence":
            return 1  # the sequence models predict the next bar's return
        try:
            return None if value is None else int(value)
        except (TypeError, ValueError):
            return None

    def _require(self, name: str) -> Bundle:
        bundle = self.bundles.get(name)
        if bundle is None:
            why = [s.reason for s in self.skipped if Path(s.path).name == name]
            detail = f" (skipped: {why[0]})" if why else ""
            raise ModelContractError(f"model {name} is not loaded{detail}")
        return bundle

    # --- opportunities -------------------------------------------------------------------------------

    def score_opportunity(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Score one opportunity; see :meth:`score_opportunities`."""
        return self.score_opportunities([fields])[0]

    def score_opportunities(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Score opportunities (one dict of entry-time fields per row) in one vectorised pass.

        Each row maps every name of :data:`~cryptoml.features.opportunity.INPUT_COLUMNS` to a value (None =
        unknown, given the documented substitute; ``hold_hours`` None or absent = choose the best hold).
        Returns per row: ``predicted_profit_pct`` (% of one leg's notional over the hold),
        ``success_probability``, ``predicted_hold_hours``, ``composite_score`` (% per sqrt(day)),
        ``kelly_fraction`` (of capital), ``hold_choice`` (``given`` | ``best_composite``),
        ``hold_model_hours`` / ``hold_model_probability`` (the hold model's own pick, None without it),
        ``model_version``. Raises DataValidationError for a bad row (naming it), ModelContractError when
        the profit or success model is not loaded.
        """
        profit_b, success_b = self._require(PROFIT_MODEL), self._require(SUCCESS_MODEL)
        hold_b = self.bundles.get(HOLD_MODEL)
        if not rows:
            return []
        counts: list[int] = []  # candidates of each row
        holds: list[float] = []
        given: list[bool] = []
        for i, row in enumerate(rows):
            missing = [c for c in INPUT_COLUMNS if c != "hold_hours" and c not in row]
            if missing:
                raise DataValidationError(f"opportunity {i}: missing fields {missing}")
            h = row.get("hold_hours")
            given.append(h is not None)
            if h is None:
                if self.hold_grid_hours is None:
                    raise DataValidationError(
                        f"opportunity {i}: hold_hours is required: no hold model is loaded to give the hold grid"
                    )
                candidates: Sequence[float] = self.hold_grid_hours
            else:
                candidates = (float(h),)
            counts.append(len(candidates))
            holds.extend(candidates)
        # Columns as lists of Python floats / str, one value per candidate: the feature code's small path
        # takes them as they are (a request is one entry at the 9 holds of the grid, where NumPy's per-call
        # overhead would dominate).
        cols: dict[str, Any] = {}
        for c in INPUT_COLUMNS:
            if c == "hold_hours":
                cols[c] = holds
            elif c in _LABEL_INPUTS:
                labels: list[str] = []
                for row, k in zip(rows, counts, strict=True):
                    labels += [str(_plain(row[c]))] * k
                cols[c] = labels
            else:
                cols[c] = _numeric_column(rows, c, counts)
        try:
            X = feature_matrix(cols)
        except DataValidationError as e:
            entry = np.repeat(np.arange(len(rows)), counts)  # candidate -> its row
            bad = next((i for i in range(len(rows)) if not self._row_ok(cols, entry == i)), 0)
            raise DataValidationError(f"opportunity {bad}: {e}") from e
        profit = profit_b.predict(X)
        proba = np.clip(success_b.predict(X), 0.0, 1.0)  # float32 rounding may step just outside [0, 1]
        if not (np.isfinite(profit).all() and np.isfinite(proba).all()):
            raise ModelContractError("the opportunity models returned non-finite predictions for finite features")
        score = np.asarray(
            composite_score(
                profit, proba, np.asarray(holds), self.composite_profit_weight, self.composite_success_weight
            )
        )
        score_l: list[float] = score.tolist()
        first = _best_candidates(score, score_l, counts)
        # without a recorded mean win / loss an even payoff (b = 1) is assumed: f* = 2p - 1
        win, loss = self.sizing if self.sizing is not None else (1.0, 1.0)
        kelly = np.asarray(kelly_fraction(proba[first], win, loss, self.kelly_fraction, self.kelly_cap)).tolist()
        hold_hours: list[float] | None = None
        hold_prob: list[float] | None = None
        if hold_b is not None:
            probs = np.asarray(hold_b.predict(X[first][:, _ENTRY_COLUMNS])).reshape(len(rows), -1)
            pick = np.argmax(probs, axis=1)
            hold_hours = np.asarray(hold_b.meta["classes"], dtype=np.float64)[pick].tolist()
            hold_prob = probs[np.arange(len(rows)), pick].tolist()
        version = self.opportunity_version()
        profit_l, proba_l = profit.tolist(), proba.tolist()
        return [
            {
                "predicted_profit_pct": float(profit_l[j]),
                "success_probability": float(proba_l[j]),
                "predicted_hold_hours": holds[j],
                "composite_score": float(score_l[j]),
                "kelly_fraction": float(kelly[k]),
                "hold_choice": "given" if given[k] else "best_composite",
                "hold_model_hours": None if hold_hours is None else hold_hours[k],
                "hold_model_probability": None if hold_prob is None else float(hold_prob[k]),
                "model_version": version,
            }
            for k, j in enumerate(first)
        ]

    @staticmethod
    def _row_ok(cols: Mapping[str, Any], mask: np.ndarray) -> bool:
        try:
            feature_matrix({c: np.asarray(v)[mask] for c, v in cols.items()})
        except DataValidationError:
            return False
        return True

    def opportunity_version(self) -> str:
        """``name=version`` of the loaded opportunity models, comma-separated (the ``model_version`` field)."""
        return self._opportunity_version

    # --- price ---------------------------------------------------------------------------------------

    def predict_price(self, bars: Mapping[str, Any], sentiment: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Forward log return from recent closed 1-minute bars; never raises for a missing model.

        ``bars``: ``ts_ms`` (bar open, epoch ms, strictly increasing in steps that are multiples of one
        minute) and ``open high low close volume`` columns of equal length, oldest first; the last bar is
        the latest closed one. ``sentiment``: optional readings, ``ts_ms`` (when each became available,
        increasing) and the 8 :data:`~cryptoml.models.sentiment.SENTIMENT_COLUMNS`; bar ``t`` takes the last
        reading known at its close (``ts_ms <= bar + 60_000``) and no older than ``sentiment_max_age_ms``.
        Returns ``forward_return`` (log return, None when no model could answer), ``horizon_minutes``,
        ``model``, ``model_version``, ``reason`` and ``predictions`` (every answer given). Raises
        DataValidationError for malformed bars or readings.
        """
        ts, values = _bar_arrays(bars)
        answers: list[dict[str, Any]] = []
        notes: list[str] = []

        lgbm = self.bundles.get(PRICE_LGBM)
        if lgbm is None:
            notes.append(f"{PRICE_LGBM} is not loaded")
        else:
            stream = StreamingFeatures()
            vector = None
            for t in range(ts.size):
                vector = stream.update(int(ts[t]), *(float(x) for x in values[t]))
            if vector is None:
                notes.append(
                    f"{PRICE_LGBM} needs {WARMUP_BARS + 1} bars without a gap over 5 minutes to compute the "
                    f"technical features; the latest segment has {stream.bars_in_segment}"
                )
            else:
                answers.append(self._answer(lgbm, float(lgbm.predict(vector[None, :])[0])))
                notes.append(f"{PRICE_LGBM} answered from the technical features of the bar at ts_ms={int(ts[-1])}")

        keras_models = {n: self.bundles[n] for n in (SENTIMENT_MODEL, PRICE_ONLY_MODEL) if n in self.bundles}
        if not keras_models:
            notes.append("no Keras price model is loaded")
        else:
            sentiment_window = None
            if sentiment is not None:  # "available now" = a reading for every bar of the window
                steps = int(next(iter(keras_models.values())).meta["input_shape"][1])
                if SENTIMENT_MODEL in keras_models:
                    steps = int(keras_models[SENTIMENT_MODEL].meta["input_shape"][1])
                sentiment_window = self._aligned_sentiment(ts[-steps:], sentiment)
                if ts.size < steps:
                    sentiment_window = None
            has_now = sentiment_window is not None and bool(np.isfinite(sentiment_window).all())
            name, why = choose_price_model(keras_models, has_now)
            if name is None:
                notes.append(why)
            else:
                bundle = keras_models[name]
                steps = int(bundle.meta["input_shape"][1])
                window = values[-steps:]
                if ts.size < steps or int(ts[-1] - ts[-steps]) != (steps - 1) * BAR_MS:
                    notes.append(f"{name} ({why}) needs the last {steps} bars to be consecutive minutes")
                else:
                    if name == SENTIMENT_MODEL and sentiment_window is not None:
                        window = np.concatenate([window, sentiment_window], axis=1)
                    raw = float(bundle.predict_raw(window[None, :, :])[0])
                    answers.append(self._answer(bundle, raw))
                    notes.append(f"{name} answered: {why}")

        main = answers[0] if answers else None
        return {
            "forward_return": None if main is None else main["forward_return"],
            "horizon_minutes": None if main is None else main["horizon_minutes"],
            "model": None if main is None else main["model"],
            "model_version": None if main is None else main["model_version"],
            "reason": "; ".join(notes),
            "predictions": answers,
        }

    def _answer(self, bundle: Bundle, value: float) -> dict[str, Any]:
        if not math.isfinite(value):
            raise ModelContractError(f"model {bundle.name} returned a non-finite forecast for finite inputs")
        return {
            "model": bundle.name,
            "forward_return": value,
            "horizon_minutes": self._horizon_minutes(bundle),
            "model_version": bundle_version(bundle.meta),
        }

    def _aligned_sentiment(self, bar_ts_ms: np.ndarray, sentiment: Mapping[str, Any]) -> np.ndarray:
        """The readings known at each bar's close, ``(bars, 8)``, NaN where none (or too old).

        The as-of rule of :func:`cryptoml.models.sentiment.align_sentiment`, on plain arrays (no pandas).
        """
        if "ts_ms" not in sentiment:
            raise DataValidationError("sentiment: missing ts_ms")
        read_ts = np.asarray(_as_array(sentiment["ts_ms"], "sentiment ts_ms"), dtype=np.int64)
        n = read_ts.size
        missing = [c for c in SENTIMENT_COLUMNS if c not in sentiment]
        if missing:
            raise DataValidationError(f"sentiment: missing columns {missing}")
        vals = np.column_stack([_as_array(sentiment[c], f"sentiment {c}", n) for c in SENTIMENT_COLUMNS])
        if not np.isfinite(vals).all():
            raise DataValidationError("sentiment: readings must be finite (leave a missing reading out)")
        if n > 1 and (np.diff(read_ts) <= 0).any():
            raise DataValidationError("sentiment: ts_ms must be strictly increasing")
        out = np.full((bar_ts_ms.size, len(SENTIMENT_COLUMNS)), np.nan)
        if n == 0:
            return out
        close_ms = bar_ts_ms + BAR_MS
        idx = np.searchsorted(read_ts, close_ms, side="right") - 1
        ok = (idx >= 0) & (close_ms - read_ts[idx.clip(0)] <= self.sentiment_max_age_ms)
        out[ok] = vals[idx[ok]]
        return out


def _not_trained_reason(folder: Path) -> str:
    import json

    try:
        data = json.loads((folder / NOT_TRAINED_FILE).read_text(encoding="utf-8"))
        return str(data.get("reason", "no reason recorded")) if isinstance(data, dict) else "no reason recorded"
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{NOT_TRAINED_FILE} is unreadable"


def _bar_arrays(bars: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``ts_ms`` (int64) and the ``(n, 5)`` float64 values of ``bars``, checked like the streaming features."""
    missing = [c for c in BAR_COLUMNS if c not in bars]
    if missing:
        raise DataValidationError(f"bars: missing columns {missing}")
    ts_f = _as_array(bars["ts_ms"], "bars ts_ms")
    n = ts_f.size
    if n == 0:
        raise DataValidationError("bars: no bars")
    if not np.isfinite(ts_f).all() or (ts_f != np.round(ts_f)).any():
        raise DataValidationError("bars: ts_ms must be integer epoch milliseconds")
    ts = ts_f.astype(np.int64)
    values = np.column_stack([_as_array(bars[c], f"bars {c}", n) for c in PRICE_FEATURES])
    bad = ~np.isfinite(values).all(axis=1) | (values[:, :4] <= 0).any(axis=1) | (values[:, 4] < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataValidationError(f"bars[{i}]: prices must be finite and > 0, volume finite and >= 0")
    inverted = values[:, 1] < values[:, 2]
    if inverted.any():
        i = int(np.flatnonzero(inverted)[0])
        raise DataValidationError(f"bars[{i}]: high {values[i, 1]} < low {values[i, 2]}")
    steps = np.diff(ts)
    wrong = (steps <= 0) | (steps % BAR_MS != 0)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0]) + 1
        raise DataValidationError(
            f"bars[{i}]: ts_ms {int(ts[i])} must follow the previous bar ({int(ts[i - 1])}) by a positive "
            f"multiple of {BAR_MS} ms (closed 1-minute bars, oldest first)"
        )
    return ts, values
