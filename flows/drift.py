"""Prefect flow ``drift_check``: feature drift and performance triggers of the live price model, and the retrain.

Runs every 15 minutes as a deployment (``orchestration.drift_cron``). When a check fires and ``retrain`` is
true it starts the ``retrain`` flow as a sub-flow with the fired checks as its reason, unless a challenger
is already running in the runner's shadow slot (a retrain is then under way: starting another every 15
minutes while the same drift persists would only replace the challenger before it could be judged).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow

from flows.common import params_with
from tasks.drift import drift_check_task

log = logging.getLogger("cryptoml")


@flow(name="drift_check", log_prints=True)
def drift_check_flow(
    params_path: str = "params.yaml",
    state_path: str | None = None,
    models_dir: str | None = None,
    retrain: bool = True,
) -> dict[str, Any]:
    """Write ``reports/drift/drift.json`` + ``drift.png``; returns the report with ``retrain`` (what was started).

    ``state_path`` defaults to ``live.state_path``, ``models_dir`` to ``live.models_dir``.
    """
    params = params_with(params_path)
    result = drift_check_task(params, state_path or params.live.state_path, models_dir or params.live.models_dir)
    fired = result["fired"]
    summary = "; ".join(fired) if fired else "nothing"
    print(f"drift_check: {result['status']}; fired: {summary}; report {result['report']}")
    retrain_info: dict[str, Any] = {"started": False, "reason": result["reason"]}
    if fired and not retrain:
        retrain_info["skipped"] = "retrain=False"
    elif fired and result["context"].get("shadow_active"):
        retrain_info["skipped"] = "a challenger is already in the shadow slot"
        print("drift_check: not retraining: a challenger is already in the shadow slot")
    elif fired:
        from flows.retrain import retrain_flow  # here: drift_check works (and is tested) without the retrain stack

        print(f"drift_check: starting retrain ({result['reason']})")
        retrain_info["started"] = True
        retrain_info["result"] = retrain_flow(params_path=params_path, reason=result["reason"])
    return {**result, "retrain": retrain_info}


if __name__ == "__main__":
    drift_check_flow()
