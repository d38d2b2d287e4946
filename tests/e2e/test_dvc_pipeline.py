"""The DVC pipeline of issue 2 on a fresh copy of the project: ``dvc repro`` runs, re-runs nothing, and a
changed parameter re-runs only the stages that read it.

The copy holds the files a commit of the working tree would hold (tracked and untracked-but-not-ignored,
without ``data/`` and ``reports/``), in a new git repository, with ``synthetic.days: 2``. ``PYTHONPATH``
points at the copy so the stages run the copied code (the venv's editable install maps the packages to the
repo). Later issues add stages after ``validate``; the test targets ``validate`` (and so ``backfill``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import CLI_TIMEOUT_S, ROOT, VENV_BIN, describe, write_params

pytestmark = pytest.mark.server

STAGES = ("backfill", "validate")  # issue 2's stages; `dvc repro validate` runs both
STORE = Path("data/raw")
Dvc = Callable[..., "subprocess.CompletedProcess[str]"]
GIT_IDENTITY = ["-c", "user.name=cryptoml tests", "-c", "user.email=tests@localhost", "-c", "commit.gpgsign=false"]


def project_files() -> list[str]:
    """Paths a commit of the working tree would hold, minus data/ and reports/ (outputs of the pipeline)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    paths = [p for p in out.stdout.split("\0") if p]
    return [p for p in paths if not p.startswith(("data/", "reports/")) and (ROOT / p).is_file()]


def store_digests(project: Path) -> dict[str, str]:
    """sha256 of every Parquet file of the store, by relative path."""
    root = project / STORE
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git repository holding a copy of the project, with a 2-day synthetic market."""
    return copy_project(tmp_path_factory.mktemp("project"), {"synthetic.days": 2})


def copy_project(copy: Path, overrides: dict[str, object]) -> Path:
    """Copy the project into ``copy`` with params overrides, as a fresh git repository."""
    for rel in project_files():
        target = copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    write_params(copy, overrides, source=copy / "params.yaml")
    for args in (["init", "-q"], ["add", "-A"], [*GIT_IDENTITY, "commit", "-q", "-m", "copy of the project"]):
        subprocess.run(["git", *args], cwd=copy, check=True, capture_output=True)
    return copy


@pytest.fixture(scope="module")
def dvc(project: Path, cli_env: dict[str, str]) -> Dvc:
    """``dvc(*args)`` -> the finished ``dvc`` command run in the copy (venv first on PATH, copied code)."""
    env = {**cli_env, "PYTHONPATH": os.pathsep.join([str(project), cli_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True,
            timeout=CLI_TIMEOUT_S, check=False,
        )  # fmt: skip

    return run


def test_repro_runs_backfill_and_validate_then_is_a_no_op_then_reruns_only_what_a_param_feeds(
    project: Path, dvc: Dvc
) -> None:
    # 1. A fresh copy: both stages run, the store and the validation report appear.
    first = dvc("repro", "validate")
    assert first.returncode == 0, describe(first)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, describe(first)
    digests = store_digests(project)
    lock_bytes = (project / "dvc.lock").read_bytes()
    assert len(digests) >= 2 * 3 * 2  # 2 exchanges x 3 bases x (spot + perp)
    assert (project / "reports" / "validation.json").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["backfill"]["params"]["params.yaml"]["synthetic"]["days"] == 2

    # 2. Nothing changed: nothing runs, DVC says so, the files keep their bytes.
    second = dvc("repro", "validate")
    assert second.returncode == 0, describe(second)
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout, describe(second)
    assert "Running stage" not in second.stdout, describe(second)
    status = dvc("status", *STAGES)
    assert status.returncode == 0, describe(status)
    assert "Data and pipelines are up to date." in status.stdout, describe(status)
    assert store_digests(project) == digests
    assert (project / "dvc.lock").read_bytes() == lock_bytes

    # 3. A validation threshold changed: only `validate` (which declares it) runs again.
    write_params(project, {"validation.max_abs_log_return": 0.3}, source=project / "params.yaml")
    stale = dvc("status", *STAGES)
    assert "validate" in stale.stdout and "backfill:" not in stale.stdout, describe(stale)
    third = dvc("repro", "validate")
    assert third.returncode == 0, describe(third)
    assert "Stage 'backfill' didn't change, skipping" in third.stdout, describe(third)
    assert "Running stage 'backfill'" not in third.stdout, describe(third)
    assert "Running stage 'validate'" in third.stdout, describe(third)
    assert store_digests(project) == digests
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["validate"]["params"]["params.yaml"]["validation"]["max_abs_log_return"] == 0.3


POSITION_COLUMNS = (
    "actual_hold_hours", "actual_profit_pct", "actual_profit_usd", "was_profitable", "peak_profit_pct",
    "max_drawdown_pct", "funding_payments_count", "total_funding_usd", "slippage_pct", "fees_usd",
)  # fmt: skip
BRANCH = ("snapshots", "simulate", "opportunity_features", "train_opportunity")
PRICE_BRANCH = ("price_features", "train_price_lgbm", "train_price_keras")
EXPORTS = ("export_opportunity", "export_price_lgbm", "export_price_keras")
BUNDLES = (
    "opportunity_profit", "opportunity_success", "opportunity_hold",
    "price_lgbm", "price_cnn_lstm", "price_cnn_lstm_sentiment",
)  # fmt: skip


@pytest.fixture(scope="module")
def full_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy with a 12-day market, a short hold grid and small models, for the whole DAG through register."""
    overrides = {
        "synthetic.days": 12,
        "simulate.hold_hours": [1, 4, 8, 24],
        "opportunity_model.n_estimators": 80,
        "price_lgbm.n_estimators": 60,
        "price_keras.epochs": 1,
        "price_keras.max_windows": 256,
        "price_keras.max_eval_windows": 128,
        "backtest.retrain_minutes": 360.0,
        "backtest.lgbm_rounds": 30,
    }
    return copy_project(tmp_path_factory.mktemp("full_project"), overrides)


def _bundle_bytes(project: Path) -> dict[str, bytes]:
    return {name: (project / "models" / name / "model.onnx").read_bytes() for name in BUNDLES}


def test_full_dag_is_stable_and_a_param_reruns_only_its_branch(full_project: Path, cli_env: dict[str, str]) -> None:
    import json

    import pyarrow.parquet as pq

    from cryptoml.export.bundle import load_bundle
    from cryptoml.models.holdout import load_holdout, predict_label

    env = {**cli_env, "PYTHONPATH": str(full_project)}

    def dvc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "dvc"), *args], cwd=full_project, env=env, capture_output=True, text=True,
            timeout=6 * CLI_TIMEOUT_S, check=False,
        )  # fmt: skip

    first = dvc("repro")
    assert first.returncode == 0, describe(first)
    for stage in (*STAGES, *BRANCH, *PRICE_BRANCH, *EXPORTS, "register", "backtest"):
        assert f"Running stage '{stage}'" in first.stdout, describe(first)
    for name in ("metrics.json", "trades.csv", "equity.png", "drawdown.png"):
        assert (full_project / "reports" / "backtest" / name).is_file(), name
    positions = full_project / "data" / "positions.parquet"
    assert set(POSITION_COLUMNS) <= set(pq.read_schema(positions).names)

    # Every model kind has a bundle; onnxruntime fed the features its meta names reproduces the holdout
    # predictions within the parity tolerance recorded at export.
    onnx_bytes = _bundle_bytes(full_project)
    native = full_project / "models" / "native"
    for name in BUNDLES:
        bundle = load_bundle(full_project / "models" / name)
        family = "opportunity" if name.startswith("opportunity") else name if name == "price_lgbm" else "price_keras"
        holdout = load_holdout(native / family / f"{name}.holdout.npz")
        assert list(bundle.feature_names) == list(holdout.feature_names)
        assert bundle.meta["parity"]["max_abs_diff"] <= bundle.meta["parity"]["tolerance"]
        assert bundle.meta["data_hash"]["md5"]
        assert len(predict_label(bundle, holdout.X[:16])) == 16
    registry = json.loads((full_project / "reports" / "registry.json").read_text())
    assert all(registry[name]["registered"] and registry[name]["version"] == 1 for name in BUNDLES), registry

    # Nothing changed: nothing runs, the ONNX files keep their bytes.
    second = dvc("repro")
    assert second.returncode == 0 and "Running stage" not in second.stdout, describe(second)
    assert "Data and pipelines are up to date." in dvc("status").stdout
    assert _bundle_bytes(full_project) == onnx_bytes

    # A forced re-export of the same native model writes the same bytes.
    forced = dvc("repro", "--force", "--single-item", "export_price_lgbm")
    assert forced.returncode == 0, describe(forced)
    assert _bundle_bytes(full_project) == onnx_bytes

    # The LightGBM horizon changed: only the LightGBM branch and what depends on it runs again.
    write_params(full_project, {"price.horizon_minutes": 5}, source=full_project / "params.yaml")
    third = dvc("repro")
    assert third.returncode == 0, describe(third)
    for stage in (*STAGES, *BRANCH, "price_features", "train_price_keras", "export_opportunity", "export_price_keras"):
        assert f"Stage '{stage}' didn't change, skipping" in third.stdout, describe(third)
    for stage in ("train_price_lgbm", "export_price_lgbm", "register", "backtest"):
        assert f"Running stage '{stage}'" in third.stdout, describe(third)
    after = _bundle_bytes(full_project)
    assert after["price_lgbm"] != onnx_bytes["price_lgbm"]
    assert {k: v for k, v in after.items() if k != "price_lgbm"} == {
        k: v for k, v in onnx_bytes.items() if k != "price_lgbm"
    }
    registry = json.loads((full_project / "reports" / "registry.json").read_text())
    assert registry["price_lgbm"]["version"] == 2 and registry["price_lgbm"]["new_version"]
    assert all(registry[n]["version"] == 1 and not registry[n]["new_version"] for n in BUNDLES if n != "price_lgbm")
    assert json.loads((full_project / "models" / "price_lgbm" / "model_meta.json").read_text())["horizon_minutes"] == 5

    # Every training is an MLflow run: metrics, feature list, data hash, plots and native models.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{full_project}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("opportunity")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 1  # the no-op repro and the horizon change trained no opportunity model
    run = runs[0]
    assert {"success.auc", "profit.r2"} <= set(run.data.metrics)
    assert run.data.tags["data_md5"] and run.data.tags["synthetic"] == "true"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "reports",
        "native_models",
        "feature_names.json",
    }
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/shap_summary.png", "reports/calibration.png", "reports/importance.csv"} <= reports
    assert len(client.search_runs([client.get_experiment_by_name("price_lgbm").experiment_id])) == 2
    for name in BUNDLES:
        assert client.get_model_version_by_alias(name, "challenger") is not None
