"""Walk-forward of the price strategy: one LightGBM refit per segment and its predictions.

Time alignment (bars in the store schema: ``ts_ms`` = bar **open** time, epoch ms UTC, 1-minute bars):

- features of bar ``t`` (:mod:`cryptoml.features.technical`) are known at ``t``'s close; the label of bar
  ``t`` is ``ln(close[t + h] / close[t])`` (:func:`cryptoml.models.price_lgbm.forward_return_target`),
  realised at the close of bar ``t + h``, i.e. at ``ts_ms[t] + (h + 1) * 60_000``;
- a segment (:class:`cryptoml.backtest.windows.Segment`) is fitted on the rows with
  ``fit_start_ms <= ts_ms < fit_end_ms`` (warm-up rows and rows without a label dropped) and predicts the
  bars with ``start_ms <= ts_ms < end_ms``. It must satisfy ``fit_end_ms + h * 60_000 <= start_ms`` (the
  windows purge by the label horizon), so the last training label is realised at or before the open of
  the first bar it predicts: no label of the future reaches the model (:func:`segment_signals` checks it);
- ``predicted_bps`` of a bar is the predicted forward log return over ``h`` minutes in basis points
  (x 1e4), known at the bar's close: the strategy decides on it there and the engine fills at the next
  open. Warm-up bars (and any bar with a non-finite feature) get NaN: "no prediction".

In-sample predictions: each refit also predicts the last ``end_ms - start_ms`` of its own training rows
(the stretch just before ``fit_end_ms``). Across the segments of a walk-forward these stretches follow each
other like the segments do (shifted back by the purge; where a fold ends with a shorter segment they
leave a small gap and overlap the next one), so the in-sample and out-of-sample series have about the same
length and the same rule and strategy can be scored on both (:func:`signal_quality`,
:func:`cryptoml.backtest.walkforward.evaluate_walk_forward`).

Evaluation: :func:`cryptoml.backtest.walkforward.evaluate_walk_forward` runs the engine on these signals
and computes the report figures.

Determinism and fan-out: :func:`segment_signals` is pure and its inputs are picklable; each refit is an
independent LightGBM fit with a fixed seed, ``deterministic=True``, row-wise histograms and its own
``num_threads`` (1 when fanned out), so the results are byte-identical whichever order, process or worker
runs them. :func:`fold_signals` runs the segments of one fold (the unit the flow fans out: a fold's slice
of the bars is small to ship, ~0.7 MB for 48 h + 24 h). The LightGBM Dataset is rebuilt for every refit
on purpose: a Dataset built once per fold and subset would take its histogram bin edges from the later
rows of the fold, i.e. from the future of the early segments; construction is ~7 % of a refit anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from cryptoml.backtest.windows import Fold, Segment
from cryptoml.config import PriceLgbmParams
from cryptoml.errors import DataValidationError
from cryptoml.features.technical import BAR_MS, TECHNICAL_FEATURES, technical_features
from cryptoml.models.price_lgbm import (
    ForwardReturnModel,
    directional_accuracy,
    forward_return_target,
    information_coefficient,
    threshold_rule_sharpe,
)

__all__ = [
    "LgbmSettings",
    "SegmentSignals",
    "SignalInputs",
    "assemble_predictions",
    "fold_signals",
    "fold_span_ms",
    "segment_signals",
    "segment_table",
    "signal_inputs",
    "signal_quality",
    "walk_forward_signals",
]

BPS = 1e4


@dataclass(frozen=True)
class SignalInputs:
    """Bars' features and labels as plain row-aligned arrays (picklable, cheap to slice by time).

    ``ts_ms`` int64 bar-open times (strictly increasing); ``features`` float64 (n, 19) in
    ``feature_names`` order, NaN on warm-up rows; ``warmup`` bool; ``target`` the forward log return over
    ``horizon_minutes`` (NaN where the future bar is absent), computed on the whole series so a slice
    keeps each row's true label.
    """

    ts_ms: np.ndarray
    features: np.ndarray
    warmup: np.ndarray
    target: np.ndarray
    horizon_minutes: int
    feature_names: tuple[str, ...] = TECHNICAL_FEATURES

    def __post_init__(self) -> None:
        n = self.ts_ms.shape[0]
        if (
            self.features.shape != (n, len(self.feature_names))
            or self.warmup.shape != (n,)
            or self.target.shape != (n,)
        ):
            raise DataValidationError(
                f"SignalInputs: arrays are not row-aligned ({n} ts_ms, features {self.features.shape}, "
                f"warmup {self.warmup.shape}, target {self.target.shape}, {len(self.feature_names)} feature names)"
            )
        if n > 1 and (np.diff(self.ts_ms) <= 0).any():
            raise DataValidationError("SignalInputs: ts_ms must be strictly increasing")
        if self.horizon_minutes <= 0:
            raise DataValidationError(f"SignalInputs: horizon_minutes must be > 0, got {self.horizon_minutes}")

    def window(self, start_ms: int, end_ms: int) -> SignalInputs:
        """The rows with ``start_ms <= ts_ms < end_ms`` (labels unchanged)."""
        lo, hi = np.searchsorted(self.ts_ms, [start_ms, end_ms], side="left")
        return SignalInputs(
            ts_ms=self.ts_ms[lo:hi],
            features=self.features[lo:hi],
            warmup=self.warmup[lo:hi],
            target=self.target[lo:hi],
            horizon_minutes=self.horizon_minutes,
            feature_names=self.feature_names,
        )


def signal_inputs(table: pd.DataFrame, horizon_minutes: int) -> SignalInputs:
    """:class:`SignalInputs` from the bars with their features (the ``price_features`` stage's table).

    ``table``: ``ts_ms`` + OHLCV, sorted by ``ts_ms``; when ``is_warmup`` and the 19 feature columns are
    present they are used as stored, else they are computed here (:func:`technical_features`).
    """
    feats = table if all(c in table.columns for c in ("is_warmup", *TECHNICAL_FEATURES)) else technical_features(table)
    target = forward_return_target(table, horizon_minutes).to_numpy(dtype=np.float64)
    return SignalInputs(
        ts_ms=table["ts_ms"].to_numpy(dtype=np.int64),
        features=np.ascontiguousarray(feats[list(TECHNICAL_FEATURES)].to_numpy(dtype=np.float64)),
        warmup=feats["is_warmup"].to_numpy(dtype=bool),
        target=target,
        horizon_minutes=int(horizon_minutes),
    )


@dataclass(frozen=True)
class LgbmSettings:
    """Hyperparameters of every walk-forward refit: fixed rounds, no early stopping (no validation split).

    ``max_bin``: LightGBM's histogram bins (255 = LightGBM's default, what ``train_price_lgbm`` uses;
    63 refits ~40 % faster). ``num_threads``: per refit; keep 1 when refits run in parallel.
    """

    rounds: int = 100
    num_leaves: int = 64
    max_depth: int = 8
    learning_rate: float = 0.03
    subsample: float = 0.8
    subsample_freq: int = 1
    random_state: int = 42
    num_threads: int = 1
    max_bin: int = 255

    @classmethod
    def from_params(
        cls, params: PriceLgbmParams, rounds: int, num_threads: int = 1, max_bin: int = 255
    ) -> LgbmSettings:
        """``price_lgbm``'s tree settings with ``backtest.lgbm_rounds`` rounds."""
        return cls(
            rounds=rounds,
            num_leaves=params.num_leaves,
            max_depth=params.max_depth,
            learning_rate=params.learning_rate,
            subsample=params.subsample,
            subsample_freq=params.subsample_freq,
            random_state=params.random_state,
            num_threads=num_threads,
            max_bin=max_bin,
        )


def refit_params(settings: LgbmSettings) -> dict[str, Any]:
    """LightGBM parameters of a refit: :class:`ForwardReturnModel`'s (deterministic, row-wise) + ``max_bin``."""
    model = ForwardReturnModel(
        num_leaves=settings.num_leaves,
        max_depth=settings.max_depth,
        n_estimators=settings.rounds,
        learning_rate=settings.learning_rate,
        subsample=settings.subsample,
        subsample_freq=settings.subsample_freq,
        random_state=settings.random_state,
        n_jobs=settings.num_threads,
        deterministic=True,
    )
    model._check_hyperparameters()
    return {**model._lgb_params(), "max_bin": settings.max_bin}


@dataclass(frozen=True)
class SegmentSignals:
    """One refit's predictions (all times epoch ms, bar-open; returns in bps of a log return).

    ``ts_ms`` / ``predicted_bps`` / ``target_bps``: the segment's bars, their prediction (NaN on warm-up
    bars) and their realised forward return (NaN where the future bar is absent; for scoring only).
    ``is_*``: the in-sample stretch (the last ``end_ms - start_ms`` of the training rows) predicted by
    the same model. ``train_rows``: rows the model was fitted on; ``last_label_ms``: when the last
    training label was realised (``<= start_ms``); ``horizon_minutes``: the label horizon.
    """

    fold_index: int
    segment_index: int
    fit_start_ms: int
    fit_end_ms: int
    start_ms: int
    end_ms: int
    train_rows: int
    last_label_ms: int
    horizon_minutes: int
    ts_ms: np.ndarray
    predicted_bps: np.ndarray
    target_bps: np.ndarray
    is_ts_ms: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    is_predicted_bps: np.ndarray = field(default_factory=lambda: np.empty(0))
    is_target_bps: np.ndarray = field(default_factory=lambda: np.empty(0))


def _check_segment(segment: Segment, horizon_minutes: int) -> None:
    fs, fe, s, e = segment.fit_start_ms, segment.fit_end_ms, segment.start_ms, segment.end_ms
    if not (fs < fe and s < e):
        raise DataValidationError(f"segment_signals: empty fit or test window in {segment!r}")
    if fe + horizon_minutes * BAR_MS > s:
        raise DataValidationError(
            f"segment_signals: the fit window ends {(s - fe) / BAR_MS:g} min before the segment starts, less "
            f"than the {horizon_minutes}-minute label horizon; training labels would reach into the segment "
            f"({segment!r}); build the windows with purge_ms >= horizon"
        )


def segment_signals(
    inputs: SignalInputs,
    segment: Segment,
    settings: LgbmSettings,
    *,
    fold_index: int = 0,
    segment_index: int = 0,
) -> SegmentSignals:
    """Fit one model on the segment's training rows and predict its bars (see the module docstring).

    ``inputs`` must cover ``[fit_start_ms, end_ms)`` (a wider slice is fine). Raises
    :class:`DataValidationError` when the segment is not purged by the horizon or has no training row.
    """
    h = inputs.horizon_minutes
    _check_segment(segment, h)
    ts = inputs.ts_ms
    finite_x = np.isfinite(inputs.features).all(axis=1) & ~inputs.warmup
    # A row trains only if its label is realised by the first bar's open: the explicit form of the purge.
    label_done_ms = ts + (h + 1) * BAR_MS
    train = (
        (ts >= segment.fit_start_ms)
        & (ts < segment.fit_end_ms)
        & (label_done_ms <= segment.start_ms)
        & finite_x
        & np.isfinite(inputs.target)
    )
    rows = np.flatnonzero(train)
    if rows.size == 0:
        raise DataValidationError(
            f"segment_signals: no training row in [{segment.fit_start_ms}, {segment.fit_end_ms}) (all warm-up, "
            "unlabelled or outside the bars given)"
        )
    # ForwardReturnModel's parameters, but lgb.train called directly: with fixed rounds there is nothing to
    # cut, and skipping the wrapper's booster round trip through a model string saves ~15 % of a refit.
    dtrain = lgb.Dataset(
        inputs.features[rows],
        label=inputs.target[rows],
        feature_name=list(inputs.feature_names),
        params={"verbosity": -1, "max_bin": settings.max_bin},
    )
    booster = lgb.train(refit_params(settings), dtrain, num_boost_round=settings.rounds)

    def predict_bps(mask: np.ndarray) -> np.ndarray:
        out = np.full(int(mask.sum()), np.nan)
        ok = finite_x[mask]
        if ok.any():
            out[ok] = np.asarray(booster.predict(inputs.features[mask][ok]), dtype=np.float64) * BPS
        return out

    test = (ts >= segment.start_ms) & (ts < segment.end_ms)
    is_start = max(segment.fit_start_ms, segment.fit_end_ms - (segment.end_ms - segment.start_ms))
    in_sample = train & (ts >= is_start)
    return SegmentSignals(
        fold_index=int(fold_index),
        segment_index=int(segment_index),
        fit_start_ms=int(segment.fit_start_ms),
        fit_end_ms=int(segment.fit_end_ms),
        start_ms=int(segment.start_ms),
        end_ms=int(segment.end_ms),
        train_rows=int(rows.size),
        last_label_ms=int(label_done_ms[rows].max()),
        horizon_minutes=h,
        ts_ms=ts[test].copy(),
        predicted_bps=predict_bps(test),
        target_bps=inputs.target[test] * BPS,
        is_ts_ms=ts[in_sample].copy(),
        is_predicted_bps=predict_bps(in_sample),
        is_target_bps=inputs.target[in_sample] * BPS,
    )


def fold_span_ms(fold: Fold) -> tuple[int, int]:
    """``[first fit start, last segment end)`` of a fold: the bars :func:`fold_signals` needs."""
    return (min(int(s.fit_start_ms) for s in fold.segments), max(int(s.end_ms) for s in fold.segments))


def fold_signals(inputs: SignalInputs, fold: Fold, settings: LgbmSettings) -> list[SegmentSignals]:
    """:func:`segment_signals` of every segment of ``fold``, in segment order (slices ``inputs`` first)."""
    start, end = fold_span_ms(fold)
    part = inputs.window(start, end)
    return [
        segment_signals(part, seg, settings, fold_index=fold.index, segment_index=i)
        for i, seg in enumerate(fold.segments)
    ]


def walk_forward_signals(inputs: SignalInputs, folds: Iterable[Fold], settings: LgbmSettings) -> list[SegmentSignals]:
    """Every fold's segments, serially (the flow fans :func:`fold_signals` out instead)."""
    return [s for fold in folds for s in fold_signals(inputs, fold, settings)]


def assemble_predictions(
    ts_ms: np.ndarray, segments: Sequence[SegmentSignals], *, in_sample: bool = False
) -> np.ndarray:
    """``predicted_bps`` aligned to the bars ``ts_ms`` (float64), NaN where no segment predicts.

    Out of sample (default) two segments predicting the same bar is an error. ``in_sample=True`` assembles
    the in-sample stretches instead; those may overlap where a fold ends with a shorter segment, and the
    later segment's prediction wins there. Raises :class:`DataValidationError` when a segment's bar is
    not among ``ts_ms``.
    """
    ts = np.asarray(ts_ms, dtype=np.int64)
    out = np.full(ts.size, np.nan)
    seen = np.zeros(ts.size, dtype=bool)
    for seg in segments:
        seg_ts, seg_pred = (seg.is_ts_ms, seg.is_predicted_bps) if in_sample else (seg.ts_ms, seg.predicted_bps)
        idx = np.searchsorted(ts, seg_ts)
        if idx.size and (idx.max() >= ts.size or (ts[idx] != seg_ts).any()):
            raise DataValidationError(f"assemble_predictions: segment starting {seg.start_ms} has bars not in ts_ms")
        if not in_sample and seen[idx].any():
            raise DataValidationError(f"assemble_predictions: segments overlap at the segment starting {seg.start_ms}")
        seen[idx] = True
        out[idx] = seg_pred
    return out


def _scores(
    pred_bps: np.ndarray, target_bps: np.ndarray, ts_ms: np.ndarray, h: int, threshold_bps: float
) -> dict[str, Any]:
    ok = np.isfinite(pred_bps) & np.isfinite(target_bps)
    if ok.sum() < 2:
        return {"rows": int(ok.sum()), "ic": None, "directional_accuracy": None, "rule_sharpe": None}
    yt, yp, ts = target_bps[ok] / BPS, pred_bps[ok] / BPS, ts_ms[ok]
    rule = threshold_rule_sharpe(yt, yp, h, threshold_bps, ts_ms=ts)

    def clean(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    return {
        "rows": int(ok.sum()),
        "ic": clean(information_coefficient(yt, yp)),
        "directional_accuracy": clean(directional_accuracy(yt, yp)),
        "rule_sharpe": clean(rule["sharpe"]),
        "rule_exposure": clean(rule["exposure"]),
    }


def signal_quality(segments: Sequence[SegmentSignals], horizon_minutes: int, threshold_bps: float) -> dict[str, Any]:
    """In-sample vs out-of-sample quality of the predictions, overall and per fold (JSON-safe, no NaN).

    For each of ``in_sample`` / ``out_of_sample``: ``rows`` scored, ``ic`` (Spearman), ``directional_accuracy``
    and ``rule_sharpe``: the annualised gross Sharpe of "long above +threshold_bps, short below -threshold_bps"
    on non-overlapping ``horizon_minutes`` decisions (:func:`threshold_rule_sharpe`). A large in-sample
    vs out-of-sample gap means the refits fit noise. None where undefined.
    """

    def both(group: Sequence[SegmentSignals]) -> dict[str, Any]:
        if not group:
            return {}
        out = {}
        for name, ts, pred, tgt in (
            ("out_of_sample", "ts_ms", "predicted_bps", "target_bps"),
            ("in_sample", "is_ts_ms", "is_predicted_bps", "is_target_bps"),
        ):
            t = np.concatenate([getattr(s, ts) for s in group])
            p = np.concatenate([getattr(s, pred) for s in group])
            y = np.concatenate([getattr(s, tgt) for s in group])
            order = np.argsort(t, kind="stable")
            out[name] = _scores(p[order], y[order], t[order], horizon_minutes, threshold_bps)
        return out

    by_fold: dict[int, list[SegmentSignals]] = {}
    for s in segments:
        by_fold.setdefault(s.fold_index, []).append(s)
    return {
        "overall": {**both(segments), "segments": len(segments)},
        "folds": {str(k): {**both(v), "segments": len(v)} for k, v in sorted(by_fold.items())},
    }


def segment_table(segments: Sequence[SegmentSignals]) -> list[Mapping[str, int]]:
    """One JSON-able row per refit: fold, segment, windows and training rows (for the report)."""
    return [
        {
            "fold": s.fold_index,
            "segment": s.segment_index,
            "fit_start_ms": s.fit_start_ms,
            "fit_end_ms": s.fit_end_ms,
            "start_ms": s.start_ms,
            "end_ms": s.end_ms,
            "train_rows": s.train_rows,
            "last_label_ms": s.last_label_ms,
        }
        for s in segments
    ]
