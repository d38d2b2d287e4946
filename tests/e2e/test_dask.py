"""The fan-out on Dask gives byte-identical files to the local run: simulation chunks and backtest folds.

A temp project is built by the real flows on a small synthetic market (6 days, BTC and ETH, holds of 1-24 h):
backfill -> snapshots -> simulate (local, threads) -> opportunity and price features. Then, with
``orchestration.task_runner: dask`` on 127.0.0.1:

- ``simulate`` on the 2-worker LocalCluster the task runner starts for the flow (``dask_address: ""``);
- ``backtest`` on an existing 2-worker LocalCluster this module starts, reached through
  ``orchestration.dask_address`` (the README's "existing cluster" path);

and every output file must keep the local run's bytes. The flows report to the session's real Prefect server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import ROOT

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHUNK_POSITIONS = 4000  # several simulation chunks on the small market
BACKTEST_FILES = (
    "metrics.json", "trades.csv", "equity.png", "drawdown.png",
    "refits.csv", "opportunity_backtest.json", "opportunity_backtest.png",
)  # fmt: skip


def project_params(**changes: Any) -> dict[str, Any]:
    """The repo's params.yaml on a 6-day BTC/ETH market, short holds and a 12-hour walk-forward."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["synthetic"].update({"days": 6, "bases": ["BTC", "ETH"]})
    data["simulate"].update({"hold_hours": [1, 8, 24], "chunk_positions": CHUNK_POSITIONS})
    data["price_keras"]["sentiment"] = "none"
    data["backtest"].update(
        {"train_hours": 3.0, "test_hours": 3.0, "max_days": 0.5, "lgbm_rounds": 10, "opportunity_top_k": 5}
    )
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backtest_digests(project: Path) -> dict[str, str]:
    return {name: digest(project / "reports" / "backtest" / name) for name in BACKTEST_FILES}


@pytest.fixture(scope="module")
def project(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The temp project after the upstream flows (simulate on threads); the working directory meanwhile."""
    from flows.backfill import backfill_flow
    from flows.opportunity import opportunity_features_flow, simulate_flow, snapshots_flow
    from flows.price import price_features_flow

    root = tmp_path_factory.mktemp("dask-project")
    for name, changes in (
        ("params.yaml", {}),
        ("params_one_chunk.yaml", {"simulate.chunk_positions": 10**9}),
        ("params_dask.yaml", {"orchestration.task_runner": "dask", "orchestration.dask_workers": 2}),
    ):
        (root / name).write_text(yaml.safe_dump(project_params(**changes), sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store under mlruns/
        backfill_flow(params_path="params.yaml")
        snapshots_flow(params_path="params.yaml")
        simulate_flow(params_path="params.yaml")
        opportunity_features_flow(params_path="params.yaml")
        price_features_flow(params_path="params.yaml")
        yield root


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[str]:
    """An existing 2-worker LocalCluster on 127.0.0.1 (one thread per worker process); its scheduler address."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield str(cluster.scheduler_address)


def test_simulation_chunks_cover_the_opportunities_in_order() -> None:
    from tasks.opportunity import simulation_chunks

    assert simulation_chunks(10, 3, 7) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert simulation_chunks(5, 3, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # at least one opportunity
    assert simulation_chunks(5, 3, 10**9) == [(0, 5)]
    assert simulation_chunks(0, 3, 7) == [(0, 0)]  # one empty chunk: the empty frame keeps its columns


def test_chunked_simulation_writes_the_bytes_of_one_chunk(project: Path) -> None:
    from cryptoml.config import load_params
    from flows.opportunity import simulate_flow
    from tasks.opportunity import load_simulation_inputs_task, simulation_chunks

    inputs = load_simulation_inputs_task.fn(load_params(project / "params.yaml"))
    chunks = simulation_chunks(len(inputs.opportunities), 3, CHUNK_POSITIONS)
    assert len(chunks) >= 3, chunks  # the module's runs really fan out
    chunked = {name: digest(project / name) for name in ("data/positions.parquet", "reports/simulate.json")}
    simulate_flow(params_path="params_one_chunk.yaml")
    assert {name: digest(project / name) for name in chunked} == chunked


def test_simulate_on_a_2_worker_dask_local_cluster_is_byte_identical(project: Path) -> None:
    from flows.opportunity import simulate_flow

    simulate_flow(params_path="params.yaml")
    local = {name: digest(project / name) for name in ("data/positions.parquet", "reports/simulate.json")}
    result = simulate_flow(params_path="params_dask.yaml")
    assert result["positions"] > 0
    assert {name: digest(project / name) for name in local} == local


def test_backtest_on_an_existing_dask_cluster_is_byte_identical(project: Path, dask_cluster: str) -> None:
    from flows.backtest import backtest_flow

    backtest_flow(params_path="params.yaml")
    local = backtest_digests(project)
    on_cluster = project_params(**{"orchestration.task_runner": "dask", "orchestration.dask_address": dask_cluster})
    (project / "params_cluster.yaml").write_text(yaml.safe_dump(on_cluster, sort_keys=False))
    result = backtest_flow(params_path="params_cluster.yaml")
    assert result["folds"] >= 2
    assert backtest_digests(project) == local
