"""The ``backtest`` flow end to end in a temporary project: the contract files, MLflow, and Dask = local.

The project is built by the real upstream code on a small synthetic market (6 days, BTC only, holds of
1-24 h, low fees): the ``price_features`` task for the bars; snapshots -> opportunities -> simulated
positions and the ``opportunity_features`` task for the opportunity scorer. The walk-forward is cut to the
last 12 h (3 h training, 3 h folds, hourly refits of 10 rounds); the same flow with
``orchestration.task_runner: dask`` (a 2-worker LocalCluster on 127.0.0.1) must write byte-identical files.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cryptoml.config import load_params
from cryptoml.frames import write_frame
from cryptoml.market.store import ParquetStore
from cryptoml.market.synthetic import write_market
from cryptoml.simulate.opportunities import detect_opportunities
from cryptoml.simulate.positions import build_funding_events, build_price_paths, simulate_positions
from cryptoml.simulate.snapshots import build_snapshots, load_market_frames
from flows.backtest import backtest_flow
from tasks.opportunity import POSITIONS, features_task
from tasks.price import price_features_task

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ("metrics.json", "trades.csv", "equity.png", "drawdown.png")
EXTRA = ("refits.csv", "opportunity_backtest.json", "opportunity_backtest.png")


def _params(**orchestration: Any) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["synthetic"].update({"days": 6, "bases": ["BTC"]})
    data["simulate"].update({"hold_hours": [1, 8, 24], "taker_fee_bps": {"default": 1.0}})
    data["price_keras"]["sentiment"] = "none"
    data["backtest"].update(
        {
            "train_hours": 3.0,
            "test_hours": 3.0,
            "retrain_minutes": 60.0,
            "max_days": 0.5,
            "lgbm_rounds": 10,
            "opportunity_top_k": 5,
        }
    )
    data["orchestration"].update(orchestration)
    return data


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project folder holding the upstream stages' outputs; the working directory while the module runs."""
    root = tmp_path_factory.mktemp("backtest-project")
    (root / "params.yaml").write_text(yaml.safe_dump(_params()))
    (root / "params_dask.yaml").write_text(yaml.safe_dump(_params(task_runner="dask", dask_workers=2)))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        params = load_params("params.yaml")
        store = ParquetStore(params.market.data_dir)
        write_market(params.synthetic, store)
        price_features_task.fn(params)
        syn = params.synthetic
        snaps = build_snapshots(store, list(syn.exchanges), list(syn.bases), syn.quote, params.snapshots)
        opps = detect_opportunities(snaps, params.opportunities, params.simulate)
        frames = load_market_frames(store, list(syn.exchanges), list(syn.bases), syn.quote)
        prices = build_price_paths(frames, snaps)
        sim = simulate_positions(opps, prices, build_funding_events(frames, prices), params.simulate)
        write_frame(sim.positions, POSITIONS)
        features_task.fn(params)
        yield root


@pytest.fixture(scope="module")
def local_run(project: Path, prefect_harness: None) -> dict[str, Any]:
    out = backtest_flow(params_path="params.yaml")
    saved = project / "local_reports"
    saved.mkdir()
    for name in (*CONTRACT, *EXTRA):
        (saved / name).write_bytes((project / "reports" / "backtest" / name).read_bytes())
    return out


def test_backtest_writes_the_contract_files_and_tracks_the_run(project: Path, local_run: dict[str, Any]) -> None:
    folder = project / "reports" / "backtest"
    for name in (*CONTRACT, *EXTRA):
        assert (folder / name).stat().st_size > 0, name
    doc = json.loads((folder / "metrics.json").read_text())
    overall, folds = doc["overall"], doc["folds"]
    assert len(folds) == overall["folds"] == 3 == local_run["folds"]
    assert overall["refits"] == 9  # 3 folds x hourly refits
    for key in (
        "total_return",
        "cagr",
        "sharpe",
        "sortino",
        "calmar",
        "max_drawdown",
        "max_drawdown_duration_hours",
        "win_rate",
        "profit_factor",
        "expectancy",
        "exposure",
        "n_trades",
        "avg_win",
        "avg_loss",
        "best_trade",
        "worst_trade",
        "buy_hold_total_return",
        "sharpe_in_sample",
        "sharpe_out_of_sample",
        "deflated_sharpe",
    ):
        assert key in overall, key
    assert overall["dsr_trials"] == 3  # backtest.dsr_trials = 0 -> the number of folds
    pnl = overall["pnl"]
    assert pnl["net_pnl"] == pytest.approx(pnl["equity_change"], abs=1e-6)
    assert pnl["net_pnl"] == pytest.approx(pnl["gross_pnl"] - pnl["slippage_cost"] - pnl["fees"] - pnl["funding"])
    for fold, after in itertools.pairwise(folds):
        assert fold["test_end_ms"] == after["test_start_ms"]  # consecutive folds; the last one may be shorter
        assert fold["test_end_ms"] - fold["test_start_ms"] == 3 * 3_600_000
    for fold in folds:
        assert fold["train_end_ms"] + 10 * 60_000 <= fold["test_start_ms"]  # purged by the 10-minute horizon
    trades = pd.read_csv(folder / "trades.csv")
    assert {"side", "entry_ts_ms", "exit_ts_ms", "fees", "slippage_cost", "funding", "net_pnl"} <= set(trades.columns)
    assert len(trades) == overall["n_trades"]
    refits = pd.read_csv(folder / "refits.csv")
    assert (refits["last_label_ms"] <= refits["start_ms"]).all()
    opportunity = json.loads((folder / "opportunity_backtest.json").read_text())
    assert opportunity["overall"]["folds"] >= 2 and local_run["opportunity"]["ml"]["picks"] > 0
    assert local_run["mlflow_run_id"] and (project / "mlruns" / "mlflow.db").is_file()


@pytest.mark.server
def test_dask_fan_out_writes_byte_identical_files(project: Path, local_run: dict[str, Any]) -> None:
    pytest.importorskip("prefect_dask")
    backtest_flow(params_path="params_dask.yaml")
    for name in (*CONTRACT, *EXTRA):
        local = (project / "local_reports" / name).read_bytes()
        assert (project / "reports" / "backtest" / name).read_bytes() == local, name
