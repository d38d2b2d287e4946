"""Prefect flow ``backtest`` (the DVC stage and ``cryptoml backtest`` share the name): walk-forward of the strategy.

The refits of each fold and the opportunity scorer's test days fan out on the task runner that
``orchestration.task_runner`` names (threads, or Dask workers); results are gathered in submission order,
so the report files are the same bytes whichever runner computed them.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import params_with, task_runner_for
from tasks.backtest import (
    backtest_inputs_task,
    backtest_report_task,
    fold_inputs,
    fold_signals_task,
    lgbm_settings,
    opportunity_fold_task,
    opportunity_inputs_task,
    opportunity_report_task,
    track_backtest_task,
)


@flow(name="backtest", log_prints=True)
def backtest_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """Walk-forward backtest of the price strategy (and of the opportunity scorer) into reports/backtest/."""
    params = params_with(params_path)
    inputs = backtest_inputs_task(params)
    settings = lgbm_settings(params)
    days = opportunity_inputs_task(params) if params.backtest.opportunity else []
    # One runner for both walk-forwards: the opportunity days queue behind the price folds on the same workers.
    with task_runner_for(params) as runner:
        folds = [
            runner.submit(
                fold_signals_task,
                parameters={"inputs": fold_inputs(inputs["inputs"], fold), "fold": fold, "settings": settings},
            )
            for fold in inputs["folds"]
        ]
        day_futures = [runner.submit(opportunity_fold_task, parameters={"data": d, "params": params}) for d in days]
        segments = [s for future in folds for s in future.result()]
        day_results = [future.result() for future in day_futures]
    report = backtest_report_task(params, inputs["bars"], inputs["folds"], segments, inputs["funding"])
    opportunity = opportunity_report_task(params, day_results)["overall"] if day_results else None
    run_id = track_backtest_task(params, report["metrics"], opportunity)
    m = report["metrics"]
    out: dict[str, Any] = {
        key: m[key]
        for key in ("folds", "refits", "total_return", "sharpe", "sharpe_in_sample", "deflated_sharpe", "n_trades")
    }
    out.update({"reports": report["paths"], "mlflow_run_id": run_id})
    if opportunity is not None:
        out["opportunity"] = {
            s: {k: opportunity[s][k] for k in ("pnl_usd", "hit_rate", "picks")} for s in ("ml", "rule")
        }
    return out


if __name__ == "__main__":
    backtest_flow()
