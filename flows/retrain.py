"""Prefect flows ``retrain`` and ``shadow_review``: retrain on the rolling window, shadow, promote only when better.

``retrain`` (weekly on schedule, or when ``drift_check`` fires): (a) review the challenger already in the
runner's shadow slot, (b) top up and incrementally backfill the retrain store, (c) cut the newest
``retrain.window_days``, validate it, rebuild features and retrain each family of ``retrain.families``,
(d) export with the parity gate, (e) register the bundles as `challenger`, tagged with the reason and the
window. Steps (b)-(d) are the DAG's own flows (the ones ``dvc repro`` runs through the CLI) run inside the
retrain workspace ``state/retrain/run``, never in the DVC-tracked ``data/`` and ``models/``: see
:mod:`tasks.retrain` for the layout and why ``dvc repro`` stays a no-op afterwards.

``shadow_review`` compares the challenger's shadow predictions with the champion's on the same bars and moves
`champion` only if the challenger is better by the margin **and** ``retrain.auto_promote`` is on; each
decision is recorded as ``shadow_*`` tags on the challenger version.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from cryptoml.config import load_params
from cryptoml.errors import ConfigError
from cryptoml.lineage import git_commit
from flows.backfill import backfill_flow
from flows.common import params_with
from flows.opportunity import opportunity_features_flow, simulate_flow, snapshots_flow, train_opportunity_flow
from flows.price import export_flow, price_features_flow, train_price_keras_flow, train_price_lgbm_flow
from flows.validate import validate_flow
from tasks.retrain import (
    Workspace,
    backfill_range,
    cut_window_task,
    inside,
    register_retrained_task,
    retrain_workspace,
    shadow_review_task,
    top_up_store_task,
)


@flow(name="shadow_review", log_prints=True)
def shadow_review_flow(params_path: str = "params.yaml", state_path: str | None = None) -> dict[str, Any]:
    """Review each retrained model's challenger on the runner's state file (default ``live.state_path``)."""
    params = params_with(params_path)
    return shadow_review_task(params, state_path or params.live.state_path)


def _backfill_newest(ws: Workspace, source: str, timeframe: str, window_days: float) -> dict[str, Any]:
    """Fill the retrain store from the configured source: the seeded synthetic market, or the newest
    ``window_days`` up to now from the exchanges (incremental: only what the store lacks is fetched)."""
    if source == "files":
        return {"skipped": "market.source is files: nothing newer to fetch; the stored files are used"}
    if source == "synthetic":
        return backfill_flow(params_path=str(ws.params_path), data_dir=str(ws.store))
    since, until = backfill_range(timeframe, window_days, int(time.time() * 1000))
    return backfill_flow(params_path=str(ws.params_path), data_dir=str(ws.store), since=since, until=until)


def _train_and_export(family: str, run_params: str) -> dict[str, Any]:
    """One family's training flows then its export flow (the dvc.yaml stages of that branch)."""
    out: dict[str, Any] = {}
    if family == "price_lgbm":
        out["train"] = train_price_lgbm_flow(params_path=run_params)
    elif family == "price_keras":
        out["train"] = train_price_keras_flow(params_path=run_params)
    else:
        out["snapshots"] = snapshots_flow(params_path=run_params)
        out["simulate"] = simulate_flow(params_path=run_params)
        out["features"] = opportunity_features_flow(params_path=run_params)
        out["train"] = train_opportunity_flow(params_path=run_params)
    out["export"] = export_flow(family, params_path=run_params)
    return out


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


@flow(name="retrain", log_prints=True)
def retrain_flow(params_path: str = "params.yaml", reason: str = "schedule") -> dict[str, Any]:
    """Shadow review, then backfill -> window -> validate -> features -> train -> export -> register `challenger`.

    ``reason`` says why it runs (``schedule``, ``drift: ...``) and is recorded on the new versions.
    """
    if not reason.strip():
        raise ConfigError("retrain: --reason must say why (e.g. 'schedule' or the drift trigger that fired)")
    params = params_with(params_path)
    out: dict[str, Any] = {"reason": reason, "shadow_review": shadow_review_flow(params_path=params_path)}
    r, market = params.retrain, params.market
    with retrain_workspace(params) as ws:
        out["workspace"] = str(ws.run)
        workspace_store = str((ws.project / market.data_dir).resolve())
        out["top_up"] = top_up_store_task(workspace_store, str(ws.store), market.source == "synthetic")
        with inside(ws.run):
            out["backfill"] = (
                _backfill_newest(ws, market.source, market.timeframe, r.window_days)
                if r.backfill
                else {"skipped": "retrain.backfill is false: the stored data is used"}
            )
            window = cut_window_task(str(ws.store), str(ws.window_store), r.window_days, market.timeframe)
            out["window"] = window
            run_params = str(ws.params_path)
            out["validate"] = validate_flow(params_path=run_params)
            if {"price_lgbm", "price_keras"} & set(r.families):
                out["price_features"] = price_features_flow(params_path=run_params)
            out["families"] = {family: _train_and_export(family, run_params) for family in r.families}
            tags = {
                "retrain_reason": reason,
                "retrain_window_start_ms": str(window["start_ms"]),
                "retrain_window_end_ms": str(window["end_ms"]),
                "retrain_window_days": f"{r.window_days:g}",
                "retrain_source": market.source,
                "retrain_backfill": str(r.backfill).lower(),
                "retrain_flow_run_id": _flow_run_id(),
                # From the project root: the bundle's own git_commit is taken in the run folder, where git's
                # dirty check sees only that (untracked) folder.
                "retrain_git_commit": git_commit(ws.project),
            }
            out["register"] = register_retrained_task(load_params(run_params), list(r.families), tags)
    return out


if __name__ == "__main__":
    retrain_flow()
