"""Shared flow plumbing: load params.yaml once per flow run and apply command-line overrides."""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.logging.handlers import PrefectConsoleHandler

from cryptoml.config import Params, load_params, replace_section
from cryptoml.errors import CryptoMLError

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# OpenMP threads that spin while waiting make LightGBM/XGBoost crawl when stages share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def task_runner_for(params: Params) -> Any:
    """The Prefect task runner ``orchestration.task_runner`` names: threads here, or Dask.

    ``dask`` connects to ``orchestration.dask_address`` when set, else starts a LocalCluster on 127.0.0.1 with
    ``dask_workers`` single-threaded worker processes for the flow run. Use it as
    ``some_flow.with_options(task_runner=task_runner_for(params))`` and fan work out with ``task.submit`` /
    ``task.map``; results are gathered in submission order, so outputs do not depend on the runner.
    """
    orchestration = params.orchestration
    if orchestration.task_runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=orchestration.dask_workers)
    from prefect_dask import DaskTaskRunner

    # distributed logs every worker start / stop at INFO on the console; keep its warnings and errors.
    logging.getLogger("distributed").setLevel(logging.WARNING)

    if orchestration.dask_address:
        return DaskTaskRunner(address=orchestration.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": orchestration.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",  # loopback, any free port (None still tries :8787)
        },
    )


def params_with(params_path: str, **sections: dict[str, Any] | None) -> Params:
    """params.yaml with ``section={field: value}`` overrides (None values are ignored), validated."""
    params = load_params(params_path)
    for section, changes in sections.items():
        if changes and any(v is not None for v in changes.values()):
            params = replace_section(params, section, **changes)
    return params


class ProjectErrorsWithoutTraceback(logging.Filter):
    """Drop the traceback of a project error (CryptoMLError) from Prefect's console log lines.

    Prefect logs a failed task or flow run with the whole exception chain (a ccxt 503 is ~200 lines); for
    the project's own errors the CLI prints one line naming the error, so the console keeps only Prefect's
    one-line messages. The Prefect API still receives the traceback: run loggers hand the record to their
    API handler before it propagates to the root's console handler, the last to see it. Any other
    exception is a bug and keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CryptoMLError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_project_error_tracebacks() -> None:
    """Attach :class:`ProjectErrorsWithoutTraceback` to Prefect's console handlers (idempotent)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, ProjectErrorsWithoutTraceback) for f in handler.filters
        ):
            handler.addFilter(ProjectErrorsWithoutTraceback())


# Importing prefect configured its logging; every flow module imports this one.
quiet_project_error_tracebacks()
