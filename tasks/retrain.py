"""Prefect tasks of the retraining loop: a retrain workspace beside the DVC one, registering, the shadow review.

**Where retraining happens, and why not in ``data/`` and ``models/``.** Those folders are DVC outputs of
``dvc.yaml``: what ``dvc repro`` rebuilds from ``params.yaml``. A rolling-window retrain produces other
data and other models (a different window, newer candles), so it never writes there: it runs the DAG's own
flows inside ``state/retrain/run/``, a folder shaped like the project (``params.yaml``, ``data/raw``,
``data/*.parquet``, ``models/``, ``reports/``) where every relative path of the tasks resolves. The
workspace's data, models, reports and ``dvc.lock`` stay untouched, so ``dvc repro`` afterwards is still a
no-op (or re-runs exactly what it would have re-run anyway), and the DVC ``register`` stage never moves the
retrained challenger aside. ``state/`` is ignored by git. What reaches users goes through the MLflow
registry: the retrained bundle, its holdout and its tags (reason, window); the run folder is kept until the
next retrain for inspection.

Layout of ``state/retrain/``:

- ``raw/``: the retrain's own market store, persistent across runs: topped up from the workspace store
  (``market.data_dir``, read only: whatever ``cryptoml backfill`` already fetched is not fetched again),
  then backfilled incrementally to now from the configured source; emptied when ``market.source`` changes
  kind (``raw/.source`` names the last one), so synthetic and exchange candles never mix;
- ``run/``: this run's project-shaped folder; ``run/data/raw`` holds the **training window**, the newest
  ``retrain.window_days`` of every dataset of ``raw/``, ending at the close of the newest stored candle
  (market time, not the wall clock, so a replay or a stale source still gets a full window);
- ``run/mlruns``: with the default MLflow store (``sqlite:///mlruns/mlflow.db``, a path relative to the
  working directory), a link to the project's ``mlruns/``, so runs and registry stay the project's own;
- ``.lock``: held for the whole run (a second retrain fails with TemporaryError instead of mixing files).

**The shadow review** (:func:`review_model`): for a registered model whose `challenger` differs from its
`champion`, the runner's state file gives both models' labelled predictions (champion slot: rows of the
champion's version; shadow slot: rows of the challenger's version, named ``v<N>`` when the runner follows the
registry or by the bundle's sha256 prefix when it reads a bundles folder), compared on the same bars by
:func:`cryptoml.monitoring.shadow.compare_shadow` with the challenger's registered holdout metric (``ic``,
Spearman, for ``price_lgbm``) and ``registry.margin_for(name)``. Every outcome is written as ``shadow_*``
tags on the challenger version; the `champion` alias moves only when the verdict is ``better`` **and**
``retrain.auto_promote`` is on (tags ``promotion=shadow`` and ``promotion_detail`` then, as
:func:`tasks.registry.promote` records its own). Otherwise a person decides: in the MLflow UI, or with
``cryptoml promote NAME --version N --force --reason ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from prefect import task

from cryptoml.atomic import atomic_path, atomic_write_text
from cryptoml.config import Params, load_params, timeframe_ms
from cryptoml.errors import ConfigError, DataValidationError, TemporaryError
from cryptoml.market.store import ParquetStore

log = logging.getLogger("cryptoml")

RETRAIN_DIR = Path("state/retrain")
DAY_MS = 86_400_000
PENDING = "pending"

# Decisions of the shadow review (tag shadow_decision), beside the comparison's status (tag shadow_status).
PROMOTED = "promoted"  # better and retrain.auto_promote: `champion` moved
AWAITING_PERSON = "awaiting_person"  # better, auto-promotion off: a person moves the alias
NOT_PROMOTED = "not_promoted"  # not better than the champion by the margin
WAITING = "waiting"  # not enough shadow evidence yet
CHAMPION_MOVED = "champion_moved"  # better, but the champion changed during the review: decide again later
SKIPPED = "skipped"  # nothing to review (no challenger, no champion, or they are the same version)


# --- the workspace --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    """Absolute paths of one retrain run (see the module docstring)."""

    project: Path  # the project folder the flow was started in
    store: Path  # state/retrain/raw: the persistent market store of the retrain
    run: Path  # state/retrain/run: this run's project-shaped folder
    params_path: Path  # run/params.yaml: the project's params with the run's paths

    @property
    def window_store(self) -> Path:
        return self.run / "data" / "raw"


def _plain(value: Any) -> Any:
    """asdict output -> YAML-safe (tuples -> lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_params(params: Params, project: Path) -> dict[str, Any]:
    """params.yaml of a run folder: ``params`` with the store and reports inside the run folder and a
    sentiment file path (if any) made absolute, since the tasks run with the run folder as working directory."""
    data = _plain(dataclasses.asdict(params))
    data["market"]["data_dir"] = "data/raw"
    data["market"]["reports_dir"] = "reports"
    sentiment = data["price_keras"]["sentiment"]
    if sentiment not in ("synthetic", "none"):
        data["price_keras"]["sentiment"] = str((project / sentiment).resolve())
    return dict(data)


def _local_tracking_store() -> bool:
    """True when MLflow's store is a path relative to the working directory (the default ``mlruns/``)."""
    from tasks.tracking import tracking_uri

    uri = tracking_uri()
    return uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")


def _forget_other_source(store: Path, source: str) -> None:
    """Empty the retrain store when it was filled from another kind of source (synthetic vs exchange vs files):
    it is a cache, and candles of two sources must never share a training window."""
    marker = store / ".source"
    if marker.is_file() and marker.read_text().strip() != source:
        log.warning("retrain store %s held %s data; market.source is now %s: starting it afresh",
                    store, marker.read_text().strip(), source)  # fmt: skip
        shutil.rmtree(store)
    store.mkdir(parents=True, exist_ok=True)
    atomic_write_text(source + "\n", marker)


@contextlib.contextmanager
def retrain_workspace(params: Params, project: Path | None = None) -> Iterator[Workspace]:
    """Lock ``state/retrain``, give this run a fresh ``run/`` folder with its params.yaml and the ``mlruns``
    link, and yield the paths; the lock is released afterwards, the run folder kept for inspection.

    TemporaryError when another retrain holds the lock.
    """
    project = (project or Path.cwd()).resolve()
    root = project / RETRAIN_DIR
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise TemporaryError(f"another retrain is running in {root} (it holds {root / '.lock'})") from e
        try:
            ws = Workspace(project, root / "raw", root / "run", root / "run" / "params.yaml")
            if ws.run.exists():
                shutil.rmtree(ws.run)
            ws.run.mkdir(parents=True)
            _forget_other_source(ws.store, params.market.source)
            header = "# written by the retrain flow: the project's params with this run's paths\n"
            atomic_write_text(header + yaml.safe_dump(run_params(params, project), sort_keys=False), ws.params_path)
            load_params(ws.params_path)  # what the stages will read must load (it round-trips the dataclasses)
            if _local_tracking_store():
                mlruns = project / "mlruns"
                mlruns.mkdir(exist_ok=True)
                (ws.run / "mlruns").symlink_to(mlruns, target_is_directory=True)
            yield ws
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[Path]:
    """Run the block with ``folder`` as working directory (the DAG's tasks use paths relative to it).

    The working directory is per process: a flow run using this must have its process to itself, as
    Prefect's workers and ``serve`` give each flow run.
    """
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


# --- data: the retrain store and the training window ------------------------------------------------


@task(name="retrain-top-up-store")
def top_up_store_task(source_dir: str, store_dir: str, synthetic: bool) -> dict[str, Any]:
    """Copy into the retrain store whatever the workspace store holds that it lacks: datasets it does not
    have, and rows newer than its own newest (the only ones a rolling window can need). Reads ``source_dir``
    only; datasets marked synthetic are taken only when ``synthetic`` (the configured source is), others
    only when not."""
    source, store = ParquetStore(source_dir), ParquetStore(store_dir)
    if not Path(source_dir).is_dir():
        return {"source": source_dir, "copied": 0, "topped_up": 0, "rows_added": 0, "note": "no workspace store"}
    copied = topped_up = rows = skipped = 0
    for key in source.datasets():
        if (source.metadata(key).get("synthetic") == "true") != synthetic:
            skipped += 1
            continue
        if not store.exists(key):
            with atomic_path(store.path(key)) as tmp:
                shutil.copyfile(source.path(key), tmp)
            copied += 1
            continue
        last = store.last_timestamp(key)
        newer = source.read(key, start_ms=None if last is None else last + 1)
        if len(newer):
            store.append(key, newer, source.metadata(key))
            topped_up += 1
            rows += len(newer)
    log.info("retrain store %s: %d datasets copied, %d topped up (+%d rows)", store_dir, copied, topped_up, rows)
    return {"source": source_dir, "copied": copied, "topped_up": topped_up, "rows_added": rows, "skipped": skipped}


def backfill_range(timeframe: str, window_days: float, now_ms: int) -> tuple[str, str]:
    """``(since, until)`` ISO-8601 UTC of an incremental exchange backfill: the newest ``window_days`` up to the
    open of the bar forming at ``now_ms`` (exclusive). The store's backfill fetches only what it lacks there."""
    step = timeframe_ms(timeframe)
    until = now_ms - now_ms % step
    since = until - int(window_days * DAY_MS)
    since -= since % step
    return _iso(since), _iso(until)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


@task(name="retrain-window")
def cut_window_task(store_dir: str, window_dir: str, window_days: float, timeframe: str) -> dict[str, Any]:
    """Write the newest ``window_days`` of every dataset of ``store_dir`` to the store ``window_dir``.

    The window is ``[end - window_days, end)`` with ``end`` the close of the newest stored candle (over all
    candle datasets), in UTC epoch ms; funding and book rows are cut to the same times.
    """
    store, out = ParquetStore(store_dir), ParquetStore(window_dir)
    keys = list(store.datasets())
    lasts = [t for k in keys if k.kind == "ohlcv" and (t := store.last_timestamp(k)) is not None]
    if not lasts:
        raise DataValidationError(
            f"retrain: no stored candles in {store_dir} (turn on retrain.backfill, or run `cryptoml backfill`)"
        )
    end_ms = max(lasts) + timeframe_ms(timeframe)
    start_ms = end_ms - int(window_days * DAY_MS)
    written = rows = 0
    for key in keys:
        frame = store.read(key, start_ms, end_ms)
        if len(frame):
            out.write(key, frame, store.metadata(key))
            written += 1
            rows += len(frame)
    log.info(
        "retrain window %s -> %s: %d datasets, %d rows (newest %g days)",
        _iso(start_ms), _iso(end_ms), written, rows, window_days,
    )  # fmt: skip
    return {"start_ms": start_ms, "end_ms": end_ms, "days": window_days, "datasets": written, "rows": rows}


# --- registering the retrained bundles ------------------------------------------------------------------


@task(name="retrain-register")
def register_retrained_task(params: Params, families: Sequence[str], tags: dict[str, str]) -> dict[str, Any]:
    """Register the bundles the run exported (working directory: the run folder) as `challenger`; each new
    version gets ``tags`` (reason, window...) and ``shadow_status=pending``. A model without a champion gets
    this version as champion (``registry.promote_first``), never otherwise."""
    from tasks import registry
    from tasks.export import MODEL_SPECS, NOT_TRAINED, bundle_dir
    from tasks.price import holdout_path

    rows: dict[str, Any] = {}
    for spec in MODEL_SPECS:
        if spec.family not in families:
            continue
        folder = bundle_dir(spec.name)
        if (folder / NOT_TRAINED).exists():
            rows[spec.name] = {"registered": False, "reason": json.loads((folder / NOT_TRAINED).read_text())["reason"]}
            continue
        result = registry.register_bundle(
            folder, holdout_path(spec.family, spec.name), promote_first=params.registry.promote_first
        )
        row: dict[str, Any] = {
            "registered": True,
            "version": result.version,
            "new_version": result.created,
            "metric": result.metric,
            "holdout_value": result.holdout_value,
            "champion": result.promoted_first,
        }
        if result.created:
            status = "not needed: first champion" if result.promoted_first else PENDING
            registry.tag_version(spec.name, result.version, {**tags, "shadow_status": status})
            log.info(
                "retrain: %s v%s registered as %s (%s %.6g on its holdout)",
                spec.name, result.version, "champion (the first)" if result.promoted_first else "challenger",
                result.metric, result.holdout_value,
            )  # fmt: skip
        else:
            row["note"] = f"byte-identical to v{result.version}, already registered: no new challenger"
            log.info("retrain: %s %s", spec.name, row["note"])
        rows[spec.name] = row
    return rows


# --- the shadow review -------------------------------------------------------------------------------------


def _identities(version: str, tags: dict[str, str]) -> list[str]:
    """The model_version strings the runner stores for a registered version: ``v<N>`` (registry) and the
    bundle's sha256 prefix (bundles folder)."""
    out = [f"v{version}"]
    if tags.get("bundle_sha256"):
        out.append(tags["bundle_sha256"][:12])
    return out


def shadow_outcomes(
    store: Any, model_name: str, slot: str, model_versions: Sequence[str], symbols: Sequence[str]
) -> Any:
    """Labelled predictions of ``model_name`` in ``slot`` made by any of ``model_versions``, per symbol, as
    :class:`cryptoml.monitoring.shadow.Outcomes` (``store``: a :class:`cryptoml.edge.state.StateStore`)."""
    from cryptoml.monitoring.shadow import Outcomes

    ts, pred, real, sym = [], [], [], []
    for symbol in symbols:
        bar_ts, prediction, realised = store.prediction_outcomes(model_name, slot=slot, symbol=symbol)
        # prediction_outcomes does not filter by version; the feature-less matrix read gives each version's bars.
        mine = [
            store.predictions_matrix(model_name, [], slot=slot, symbol=symbol, model_version=v) for v in model_versions
        ]
        keep = np.isin(bar_ts, np.concatenate([m.bar_ts_ms for m in mine]))
        ts.append(bar_ts[keep])
        pred.append(prediction[keep])
        real.append(realised[keep])
        sym.extend([symbol] * int(keep.sum()))
    return Outcomes.of(
        np.concatenate(ts) if ts else np.empty(0, np.int64),
        np.concatenate(pred) if pred else np.empty(0),
        np.concatenate(real) if real else np.empty(0),
        np.asarray(sym, dtype=object),
        what=f"{model_name} {slot} predictions",
    )


def _now_iso(now_ms: int) -> str:
    return datetime.fromtimestamp(now_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def review_model(name: str, params: Params, store: Any, state_path: str, now_ms: int) -> dict[str, Any]:
    """Review the `challenger` of registered model ``name`` against its `champion` on the shadow predictions in
    ``store`` (a read-only StateStore, or None when the state file ``state_path`` does not exist); record the
    decision as tags on the challenger and promote it when better and ``retrain.auto_promote`` is on."""
    from cryptoml.monitoring.shadow import BETTER, DEFAULT_METRIC, INSUFFICIENT, Outcomes, compare_shadow
    from tasks import registry

    try:
        aliases = registry.aliases(name)
    except ConfigError:
        return {"name": name, "decision": SKIPPED, "reason": f"{name} is not registered"}
    challenger, champion = aliases.get(registry.CHALLENGER), aliases.get(registry.CHAMPION)
    if challenger is None or champion is None or challenger == champion:
        why = (
            "no challenger"
            if challenger is None
            else f"no champion to compare with (`cryptoml promote {name}` makes v{challenger} the first)"
            if champion is None
            else f"the challenger v{challenger} is the champion"
        )
        return {"name": name, "decision": SKIPPED, "reason": why, "champion": champion, "challenger": challenger}
    challenger_tags = registry.version_tags(name, challenger)
    champion_tags = registry.version_tags(name, champion)
    metric = challenger_tags.get("holdout_metric") or DEFAULT_METRIC
    margin = params.registry.margin_for(name)
    symbols = list(params.live.symbols)
    if store is None:
        empty = Outcomes.of(np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty(0, dtype=object))
        champ_out = chall_out = empty
    else:
        champ_out = shadow_outcomes(store, name, "champion", _identities(champion, champion_tags), symbols)
        chall_out = shadow_outcomes(store, name, "shadow", _identities(challenger, challenger_tags), symbols)
    r = params.retrain
    comparison = compare_shadow(
        champ_out, chall_out, metric=metric, margin=margin,
        min_hours=r.shadow_hours, min_predictions=r.min_shadow_predictions,
    )  # fmt: skip
    reason = comparison.reason
    if store is None:
        reason = f"no state file {state_path} (the edge runner has not run here yet); {reason}"
    elif comparison.status == INSUFFICIENT and comparison.n == 0 and name != "price_lgbm":
        reason = f"the edge runner shadows price_lgbm only; {reason}"
    person = (
        f"move `champion` to v{challenger} in the MLflow UI, or run `cryptoml promote {name} --version {challenger} "
        "--force --reason ...`"
    )
    if comparison.status == BETTER and r.auto_promote:
        decision, detail = PROMOTED, f"shadow: {reason}"
    elif comparison.status == BETTER:
        decision, detail = AWAITING_PERSON, f"{reason}; retrain.auto_promote is off: awaiting a person to {person}"
    elif comparison.status == INSUFFICIENT:
        decision, detail = WAITING, f"{reason}; reviewed again on the next run"
    else:
        decision, detail = NOT_PROMOTED, f"{reason}; v{champion} stays champion"
    tags = {
        "shadow_status": comparison.status,
        "shadow_decision": decision,
        "shadow_reason": detail,
        "shadow_metric": metric,
        "shadow_margin": repr(margin),
        "shadow_gain": repr(comparison.gain),
        "shadow_n": str(comparison.n),
        "shadow_hours": f"{comparison.hours:.3f}",
        "shadow_first_bar_ms": str(comparison.first_bar_ts_ms or ""),
        "shadow_last_bar_ms": str(comparison.last_bar_ts_ms or ""),
        "shadow_champion_version": champion,
        "shadow_champion_metrics": json.dumps(comparison.champion.to_dict(), sort_keys=True),
        "shadow_challenger_metrics": json.dumps(comparison.challenger.to_dict(), sort_keys=True),
        "shadow_auto_promote": str(r.auto_promote).lower(),
        "shadow_reviewed_at": _now_iso(now_ms),
    }
    if decision == PROMOTED:
        promotion = {"promotion": "shadow", "promotion_detail": detail}
        if not registry.move_champion(name, challenger, expected_champion=champion, tags={**tags, **promotion}):
            decision = CHAMPION_MOVED
            tags["shadow_decision"] = decision
            tags["shadow_reason"] = detail = f"{reason}; the champion alias moved during the review: not promoted"
    if decision != PROMOTED:
        registry.tag_version(name, challenger, tags)
    log.info("shadow review %s v%s vs champion v%s: %s (%s)", name, challenger, champion, decision, detail)
    return {
        "name": name,
        "challenger": challenger,
        "champion": champion,
        "decision": decision,
        "reason": detail,
        "comparison": comparison.to_dict(),
    }


@task(name="shadow-review")
def shadow_review_task(params: Params, state_path: str, now_ms: int | None = None) -> dict[str, Any]:
    """Review every model of ``retrain.families`` (see :func:`review_model`); ``state_path`` is the runner's
    state file, read only (a missing file means no shadow predictions yet)."""
    from cryptoml.edge.state import StateStore
    from tasks.export import MODEL_SPECS

    now = int(time.time() * 1000) if now_ms is None else now_ms
    names = [s.name for s in MODEL_SPECS if s.family in params.retrain.families]
    path = Path(state_path)
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(StateStore(path, read_only=True)) if path.is_file() else None
        models = {name: review_model(name, params, store, str(path), now) for name in names}
    return {"state_path": str(path), "state_found": store is not None, "models": models}
