"""Prefect deployments of the project, served by one process: the schedules of params.yaml ``orchestration``.

``serve_deployments()`` (``cryptoml deploy``; also ``python -m flows.deployments``) registers them with the
Prefect server at ``PREFECT_API_URL`` and executes their runs until stopped (Ctrl+C / SIGTERM, which pauses
the schedules). Crons are read in ``orchestration.timezone`` (UTC):

- ``pipeline/manual``: the whole DAG (flows/pipeline.py); no schedule, started with ``prefect deployment run``.
- ``backfill/hourly``: incremental backfill up to the forming bar (``backfill_cron``, ``0 * * * *``).
- ``drift_check/every-15-minutes``: drift report, retrain when a trigger fires (``drift_cron``, ``*/15 * * * *``).
- ``retrain/weekly``: retrain -> export -> register `challenger` (``retrain_cron``, ``0 3 * * 1``: Monday 03:00).
- ``shadow_review/hourly``: challenger vs champion on the shadow predictions (``orchestration.shadow_review_cron``).

A served run is a subprocess of the serve process, in its working directory: serve from the project folder
(the stages' paths - ``data/``, ``models/``, ``state/``, ``mlruns/`` - are relative to it); every deployment
passes ``params_path`` as given. Entrypoints are module paths (``flows.retrain.retrain_flow``), so the runs
import the installed project code, whatever the folder. Flow modules are imported when the deployments are
built, not when this module is imported.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow

from cryptoml.config import Params, load_params, timeframe_ms
from cryptoml.errors import ConfigError, CryptoMLError
from flows.common import params_with

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

# Not (yet) an orchestration param: hourly, half-way between the hourly backfills so they do not share the cores.
TAGS = ["cryptoml"]

log = logging.getLogger("cryptoml")


def forming_bar_open_iso(timeframe: str, now_ms: int) -> str:
    """ISO-8601 UTC open time of the bar forming at ``now_ms``: the exclusive end of a backfill of closed bars."""
    step = timeframe_ms(timeframe)
    return datetime.fromtimestamp((now_ms - now_ms % step) / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


@flow(name="backfill", log_prints=True)
def incremental_backfill_flow(params_path: str = "params.yaml", until: str | None = None) -> dict[str, Any]:
    """The hourly backfill: the ``backfill`` flow with ``market.until`` moved to now for an exchange source.

    ccxt: fetches what the store lacks in ``[market.since, until)``, ``until`` defaulting to the open of the
    forming bar (only closed bars), so each run adds the bars closed since the previous one. synthetic: the
    seeded market as configured (idempotent). files: nothing newer to fetch; skipped.
    """
    from flows.backfill import backfill_flow

    params = params_with(params_path)
    if params.market.source == "files":
        return {"skipped": "market.source is files: there is nothing newer to fetch"}
    if params.market.source == "ccxt" and until is None:
        until = forming_bar_open_iso(params.market.timeframe, int(time.time() * 1000))
    # .fn: the backfill's tasks run in this flow run (one 'backfill' run in the UI, not one nested in another).
    result: dict[str, Any] = backfill_flow.fn(params_path=params_path, until=until)
    return result


def build_deployments(params: Params, params_path: str = "params.yaml") -> list[RunnerDeployment]:
    """The project's deployments (``RunnerDeployment`` objects, not yet registered), schedules from ``params``."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    # Imported by module name even from here: run as ``python -m flows.deployments`` this file is __main__,
    # and an entrypoint naming __main__ cannot be loaded by the flow-run processes.
    from flows.deployments import incremental_backfill_flow
    from flows.drift import drift_check_flow
    from flows.pipeline import pipeline_flow
    from flows.retrain import retrain_flow, shadow_review_flow

    o = params.orchestration
    on_params = {"params_path": params_path}

    def deployment(flow_obj: Any, name: str, cron: str | None, **parameters: Any) -> RunnerDeployment:
        return flow_obj.to_deployment(
            name=name,
            schedule=Cron(cron, timezone=o.timezone) if cron else None,
            parameters={**on_params, **parameters},
            tags=TAGS,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )

    return [
        deployment(pipeline_flow, "manual", None),
        deployment(incremental_backfill_flow, "hourly", o.backfill_cron),
        deployment(drift_check_flow, "every-15-minutes", o.drift_cron),
        deployment(retrain_flow, "weekly", o.retrain_cron, reason="schedule"),
        deployment(shadow_review_flow, "hourly", o.shadow_review_cron),
    ]


def serve_deployments(params_path: str = "params.yaml", *, limit: int | None = None) -> None:
    """Register the deployments with the Prefect server and run their flow runs here until interrupted.

    Run it in the project folder with ``PREFECT_API_URL`` naming the server. ``limit`` caps the flow runs
    executing at once (None: no cap). Params are loaded first, so a bad params.yaml fails with a ConfigError
    before anything is registered. Blocks; on shutdown (SIGTERM or Ctrl+C) the schedules are paused until
    the next serve, so no runs pile up as Late while nothing executes them.
    """
    from prefect import serve

    if not Path(params_path).is_file():
        raise ConfigError(f"{params_path} not found in {Path.cwd()}: serve from the project folder")
    deployments = build_deployments(load_params(params_path), params_path)
    if threading.current_thread() is threading.main_thread():
        # Until the runner installs its own SIGTERM handler, a SIGTERM would kill the process before `finally`.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        serve(*deployments, limit=limit)
    finally:
        # prefect 3.8 pauses the schedules on SIGTERM only: Ctrl+C returns from serve() with them active.
        pause_deployments(deployments)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def pause_deployments(deployments: Sequence[RunnerDeployment]) -> None:
    """Pause these deployments' schedules on the server (a warning, not an error, when it cannot be reached)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            for deployment in deployments:
                found = client.read_deployment_by_name(deployment.full_name)
                client.pause_deployment(found.id)
    except Exception as e:  # shutting down: report and carry on, the schedules stay as they were
        log.warning("could not pause the deployments' schedules: %s", e)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flows.deployments [--params params.yaml] [--limit N]``."""
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=serve_deployments.__doc__)
    parser.add_argument("--params", default="params.yaml", help="params.yaml, relative to this folder")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs executing at once")
    args = parser.parse_args(argv)
    try:
        serve_deployments(args.params, limit=args.limit)
    except CryptoMLError as e:  # one line and the error class's exit code, as the cryptoml CLI does
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    main()
