"""Prefect task of the ``drift_check`` flow: the champion's training rows vs the runner's recent predictions.

Inputs (read only, never changed):

- the champion bundle ``<models_dir>/price_lgbm/model_meta.json`` (the folder the edge runner loads):
  its ordered feature names, ``training_window`` and test-window ``metrics.directional_accuracy``;
- the **reference**: the rows of ``data/price_features.parquet`` (the table the model was trained from)
  whose bar-open ``ts_ms`` lies in the bundle's ``training_window``, warm-up rows excluded. When that
  table is absent, belongs to another symbol than the bundle's, or holds fewer than ``drift.min_samples``
  rows of the window (the data moved on since training), the model's holdout
  (``models/native/price_lgbm/price_lgbm.holdout.npz``: its test-window inputs, the nearest thing to its
  training distribution still at hand) is used instead; the report names which;
- the **recent** rows: the runner's state file, champion-slot ``price_lgbm`` predictions of the bars in
  the last ``drift.window_hours`` ending at the last committed bar (not the wall clock: the check of a
  stopped runner describes its last day and says when that was), their realised returns and the
  ``equity`` metric of the same bars.

Outputs: ``<reports_dir>/drift/drift.json`` (:meth:`DriftReport.to_dict`, sorted keys) and ``drift.png``
(PSI per feature with the threshold), both byte-stable for the same inputs. A missing state file, a
state without predictions or no champion bundle give an ``insufficient data`` report naming why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from cryptoml.atomic import atomic_path, atomic_write_text
from cryptoml.config import Params
from cryptoml.errors import ModelContractError
from cryptoml.monitoring.drift import (
    FIRED,
    INSUFFICIENT,
    DriftReport,
    FeatureDrift,
    feature_psi,
    performance_triggers,
)
from tasks.price import PRICE_FEATURES, holdout_path

log = logging.getLogger("cryptoml")

PRICE_MODEL = "price_lgbm"  # the runner's price model (cryptoml.edge.runner.PRICE_MODEL)
HOUR_MS = 3_600_000


def champion_meta(models_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The champion bundle's meta (schema-checked) and '' , or None and why it is unusable."""
    from cryptoml.export.bundle import read_meta

    folder = Path(models_dir) / PRICE_MODEL
    if not (folder / "model_meta.json").is_file():
        return None, f"no champion bundle: {folder}/model_meta.json not found"
    try:
        return read_meta(folder), ""
    except ModelContractError as e:
        return None, f"champion bundle unusable: {e}"


def load_reference(params: Params, meta: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Reference feature rows (n, f) in ``meta["feature_names"]`` order and time order, and their description."""
    from cryptoml.frames import read_frame
    from cryptoml.models.holdout import load_holdout

    names = list(meta["feature_names"])
    window = meta["training_window"]
    start, end = int(window["start_ms"]), int(window["end_ms"])
    expected_symbol = f"{params.price.exchange} {params.price.symbol}"
    why = ""
    if not PRICE_FEATURES.is_file():
        why = f"{PRICE_FEATURES} not found"
    elif meta.get("symbol") not in (None, expected_symbol):
        why = f"{PRICE_FEATURES} holds {expected_symbol}, the model learnt from {meta['symbol']}"
    else:
        table = read_frame(PRICE_FEATURES, "price features")
        ts = table["ts_ms"].to_numpy(dtype=np.int64)
        keep = (ts >= start) & (ts <= end) & ~table["is_warmup"].to_numpy(dtype=bool)
        absent = [c for c in names if c not in table.columns]
        if absent:
            why = f"{PRICE_FEATURES} lacks the model's features {absent}"
        elif int(keep.sum()) >= params.drift.min_samples:
            X = table.loc[keep, names].to_numpy(dtype=np.float64)
            return X, {
                "source": "training_window",
                "path": str(PRICE_FEATURES),
                "start_ms": start,
                "end_ms": end,
                "rows": len(X),
            }
        else:
            why = f"{PRICE_FEATURES} holds {int(keep.sum())} rows of the training window {start}..{end}"
    path = holdout_path(PRICE_MODEL, PRICE_MODEL)
    if path.is_file():
        holdout = load_holdout(path)
        X = holdout.columns(names, where=f"holdout {path}").astype(np.float64)
        order = np.argsort(holdout.ts_ms, kind="stable")
        return X[order], {
            "source": "holdout",
            "path": str(path),
            "start_ms": int(holdout.ts_ms.min()),
            "end_ms": int(holdout.ts_ms.max()),
            "rows": len(X),
            "why": f"training rows unavailable ({why}); using the model's test-window inputs",
        }
    return None, {"source": None, "why": f"{why}; no holdout at {path} either"}


def load_recent(state_path: Path, names: list[str], window_hours: float) -> tuple[dict[str, Any] | None, str]:
    """Champion predictions, outcomes and equity of the last ``window_hours`` of bars, or None and why."""
    from cryptoml.edge.state import StateStore

    if not Path(state_path).is_file():
        return None, f"state file {state_path} not found (has the runner run here?)"
    with StateStore(state_path, read_only=True) as store:
        last = store.last_bar_ts_ms()
        if last is None:
            return None, f"state file {state_path} holds no bars yet"
        since = last - int(window_hours * HOUR_MS) + 1
        matrix = store.predictions_matrix(PRICE_MODEL, names, since_ms=since, slot="champion")
        _, predicted, realised = store.prediction_outcomes(PRICE_MODEL, since_ms=since, slot="champion")
        equity = np.array([v for _, _, v in store.metrics("equity", since_ms=since)], dtype=np.float64)
        shadow = store.predictions_matrix(PRICE_MODEL, names, since_ms=last, slot="shadow")
    if len(matrix.X) == 0:
        return (
            None,
            f"state file {state_path}: no champion {PRICE_MODEL} predictions in the {window_hours:g} h to {last}",
        )
    return {
        "X": matrix.X,
        "predicted": predicted,
        "realised": realised,
        "equity": equity,
        "window": {"start_ms": since, "end_ms": last, "hours": window_hours},
        "first_prediction_ms": int(matrix.bar_ts_ms.min()),
        "shadow_active": len(shadow.X) > 0,  # the last bar has a challenger in the shadow slot
    }, ""


_COLOURS = {FIRED: "tab:red", "ok": "tab:blue", INSUFFICIENT: "tab:grey"}


def write_drift_plot(report: DriftReport, path: Path, threshold: float) -> Path:
    """``drift.png``: one horizontal bar per feature (PSI, coloured by status), the threshold as a dashed line,
    the training window's own same-length p99 as a marker. Same report -> same bytes (no dates in the PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 0.32 * max(len(report.features), 4) + 1.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if report.features:
        names = [f.feature for f in report.features][::-1]
        values = [f.psi or 0.0 for f in report.features][::-1]
        colours = [_COLOURS[f.status] for f in report.features][::-1]
        rows = np.arange(len(names))
        ax.barh(rows, values, color=colours)
        p99 = [(i, f.reference_block_p99) for i, f in zip(rows, report.features[::-1], strict=True)]
        marked = [(i, v) for i, v in p99 if v is not None]
        if marked:
            ax.plot(
                [v for _, v in marked], [i for i, _ in marked], "k|", ms=10, label="training-window p99 (same length)"
            )
        ax.axvline(threshold, color="tab:red", ls="--", lw=1.0, label=f"threshold {threshold:g}")
        ax.set_yticks(rows, names, fontsize=8)
        ax.set_xlabel("PSI (recent window vs reference)")
        ax.legend(loc="lower right", fontsize=8)
        n = max((f.n_recent for f in report.features), default=0)
        ax.set_title(f"feature drift: {report.status}, {n} recent rows", fontsize=10)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "insufficient data:\n" + "\n".join(report.notes), ha="center", va="center", wrap=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path


def check_drift(params: Params, state_path: Path, models_dir: Path) -> DriftReport:
    """The drift report of the runner state at ``state_path`` against the champion in ``models_dir``."""
    drift = params.drift
    meta, why = champion_meta(models_dir)
    if meta is None:
        return DriftReport(notes=(why,), context={"model": None})
    names = list(meta["feature_names"])
    metrics = meta.get("metrics") or {}
    historical = metrics.get("directional_accuracy")
    model = {
        "name": meta["name"],
        "onnx_sha256": meta["onnx_sha256"],
        "training_window": meta["training_window"],
        "historical_directional_accuracy": historical,
    }
    reference, ref_info = load_reference(params, meta)
    recent, why_recent = load_recent(Path(state_path), names, drift.window_hours)
    context: dict[str, Any] = {"model": model, "reference": ref_info, "state_path": str(state_path)}
    notes = []
    if reference is None:
        notes.append(f"no reference rows: {ref_info['why']}")
    if recent is None:
        notes.append(why_recent)
        return DriftReport(context=context, notes=tuple(notes))
    context["window"] = recent["window"]
    context["shadow_active"] = recent["shadow_active"]
    context["labelled_predictions"] = len(recent["realised"])
    features: tuple[FeatureDrift, ...] = ()
    if reference is not None:
        features = feature_psi(reference, recent["X"], names, drift, block_context=True)
    hist = float(historical) if isinstance(historical, int | float) else None
    triggers = performance_triggers(recent["predicted"], recent["realised"], recent["equity"], hist, drift)
    return DriftReport(features=features, triggers=triggers, context=context, notes=tuple(notes))


@task(name="drift_check")
def drift_check_task(params: Params, state_path: str, models_dir: str) -> dict[str, Any]:
    """Compute the drift report, write ``drift.json`` and ``drift.png``; returns the report dict plus paths."""
    report = check_drift(params, Path(state_path), Path(models_dir))
    out_dir = Path(params.market.reports_dir) / "drift"
    out_dir.mkdir(parents=True, exist_ok=True)
    body = report.to_dict()
    json_path = atomic_write_text(
        json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n", out_dir / "drift.json"
    )
    png_path = write_drift_plot(report, out_dir / "drift.png", params.drift.psi_threshold)
    for note in report.notes:
        log.warning("drift_check: %s", note)
    if report.fired:
        log.warning("drift_check: fired: %s", "; ".join(report.fired))
    else:
        log.info("drift_check: %s, nothing fired", report.status)
    return {**body, "report": str(json_path), "plot": str(png_path)}
