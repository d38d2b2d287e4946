"""Prefect flows of the funding-arbitrage branch, one per DVC stage (same names)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prefect import Task, flow

from cryptoml.config import Params
from flows.common import params_with, task_runner_for
from tasks.opportunity import (
    build_snapshots_task,
    features_task,
    load_simulation_inputs_task,
    simulate_chunk_task,
    simulation_chunks,
    train_task,
    write_positions_task,
)


def fan_out(params: Params, task: Task[..., Any], calls: Sequence[dict[str, Any]]) -> list[Any]:
    """Run ``task`` once per parameter dict on the ``orchestration.task_runner``; results in ``calls`` order.

    The runner (threads, or Dask workers) lives only for the fan-out, inside the current flow run, so the
    task runs show up under it; a failed task raises here.
    """
    with task_runner_for(params) as runner:
        futures = [runner.submit(task, parameters=call) for call in calls]
        return [future.result() for future in futures]


@flow(name="snapshots", log_prints=True)
def snapshots_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return build_snapshots_task(params_with(params_path))


@flow(name="simulate", log_prints=True)
def simulate_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """Simulate every opportunity at every hold: chunks of ``simulate.chunk_positions`` positions fan out."""
    params = params_with(params_path)
    inputs = load_simulation_inputs_task(params)
    chunks = simulation_chunks(
        len(inputs.opportunities), len(params.simulate.hold_hours), params.simulate.chunk_positions
    )
    calls = [
        {
            "opportunities": inputs.opportunities.iloc[lo:hi],
            "prices": inputs.prices,
            "funding": inputs.funding,
            "simulate": params.simulate,
        }
        for lo, hi in chunks
    ]
    started = time.perf_counter()
    parts = fan_out(params, simulate_chunk_task, calls)
    return write_positions_task(params, parts, elapsed_s=time.perf_counter() - started)


@flow(name="opportunity_features", log_prints=True)
def opportunity_features_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return features_task(params_with(params_path))


@flow(name="train_opportunity", log_prints=True)
def train_opportunity_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    return train_task(params_with(params_path))
