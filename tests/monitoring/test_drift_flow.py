"""The ``drift_check`` flow on a real StateStore file and a real LightGBM bundle: reports, triggers, the retrain.

The project folder (module fixture) holds ``data/price_features.parquet`` (a seeded random walk's bars
with their 19 technical features) and ``models/price_lgbm`` (a LightGBM bundle exported with the parity
gate, trained on the first rows, its ``training_window`` naming them). Each test fills its own state file
with constructed :class:`BarRecord` s: recent features drawn from the training rows (no drift) or with
``rsi_14`` moved up 20 points (drift), predictions that get the sign right or wrong, a rising or falling
equity. ``drift.min_samples`` is 300 here so 400 bars suffice (the calibration is in test_drift.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from cryptoml.config import load_params
from cryptoml.edge.state import BarRecord, PortfolioSnapshot, Prediction, RealisedReturn, StateStore
from cryptoml.export.convert import export_model
from cryptoml.features.technical import TECHNICAL_FEATURES, technical_features
from cryptoml.frames import write_frame
from cryptoml.models.holdout import Holdout, save_holdout
from tasks.drift import check_drift, drift_check_task

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "BTC/USDT:USDT"
T0_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC
MINUTE = 60_000
HORIZON = 10
TRAIN_ROWS = 2500
NAMES = list(TECHNICAL_FEATURES)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/price_features.parquet + models/price_lgbm, as the training stages leave them."""
    root = tmp_path_factory.mktemp("project")
    rng = np.random.default_rng(11)
    n = 3200
    close = 40_000.0 * np.exp(np.cumsum(rng.normal(0, 8e-4, n)))
    spread = np.abs(rng.normal(0, 4e-4, n)) * close
    bars = pd.DataFrame(
        {
            "ts_ms": T0_MS + MINUTE * np.arange(n, dtype=np.int64),
            "open": np.r_[close[0], close[:-1]],
            "high": close + spread,
            "low": close - spread,
            "close": close,
            "volume": rng.gamma(2.0, 5.0, n),
        }
    )
    feats = technical_features(bars)
    table = bars.join(feats[["is_warmup", *NAMES]])
    write_frame(table, root / "data" / "price_features.parquet")

    import lightgbm as lgb

    train = table.iloc[60:TRAIN_ROWS]
    y = np.log(close[60 + HORIZON : TRAIN_ROWS + HORIZON] / close[60:TRAIN_ROWS])
    model = lgb.LGBMRegressor(n_estimators=20, num_leaves=8, learning_rate=0.2, verbose=-1, deterministic=True)
    model.fit(train[NAMES], y)
    extra = {
        "label": {"name": f"log_return_{HORIZON}m", "horizon_minutes": HORIZON},
        "horizon_minutes": HORIZON,
        "training_window": {"start_ms": int(train["ts_ms"].iloc[0]), "end_ms": int(train["ts_ms"].iloc[-1])},
        "data_hash": {"md5": "test"},
        "metrics": {"directional_accuracy": 0.55, "ic": 0.05},
        "symbol": f"binance {SYMBOL}",
        "git_commit": "test",
    }
    export_model(
        "lightgbm_regressor", model.booster_, train[NAMES], root / "models" / "price_lgbm", "price_lgbm", extra
    )
    return root


@pytest.fixture
def workdir(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A test's own copy of the project as the working directory, with a params.yaml for small windows."""
    work = tmp_path / "work"
    shutil.copytree(project, work)
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["drift"].update({"min_samples": 300, "min_outcomes": 200})
    (work / "params.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(work)
    return work


def reference_rows(project: Path) -> np.ndarray:
    table = pd.read_parquet(project / "data" / "price_features.parquet")
    return table.iloc[60:TRAIN_ROWS][NAMES].to_numpy()


def fill_state(
    path: Path,
    X: np.ndarray,
    *,
    right: bool,
    drift_per_bar: float,
    shadow_last: bool = False,
    seed: int = 0,
) -> None:
    """One committed bar per row of ``X``: the champion prediction (sign right or wrong), its label
    ``HORIZON`` bars later, and an equity drifting by ``drift_per_bar`` (a fraction) with noise."""
    rng = np.random.default_rng(seed)
    n = len(X)
    realised = rng.normal(0, 1e-3, n)
    predicted = (1.0 if right else -1.0) * realised * rng.uniform(0.5, 1.5, n)  # the sign is all right or wrong
    equity = 10_000.0 * np.cumprod(1.0 + rng.normal(drift_per_bar, 5e-4, n))
    with StateStore(path) as store:
        for i in range(n):
            ts = T0_MS + i * MINUTE
            predictions = [Prediction(SYMBOL, "price_lgbm", "v1", NAMES, X[i], float(predicted[i]))]
            if shadow_last and i == n - 1:
                predictions.append(Prediction(SYMBOL, "price_lgbm", "v2", NAMES, X[i], 0.0, slot="shadow"))
            labels = [RealisedReturn(ts - HORIZON * MINUTE, SYMBOL, "price_lgbm", float(realised[i - HORIZON]))]
            store.commit_bar(
                BarRecord(
                    bar_ts_ms=ts,
                    portfolio=PortfolioSnapshot(equity[i], equity[i], 0.0, 0.0, 0.0, 0.0),
                    predictions=predictions,
                    metrics={"equity": float(equity[i])},
                    realised_returns=labels if i >= HORIZON else [],
                )
            )


def recent_rows(project: Path, n: int = 400, shift_rsi: float = 0.0, seed: int = 1) -> np.ndarray:
    ref = reference_rows(project)
    X = ref[np.random.default_rng(seed).choice(len(ref), size=n, replace=False)].copy()
    X[:, NAMES.index("rsi_14")] += shift_rsi
    return X


def run_task(workdir: Path, state: Path) -> dict[str, Any]:
    params = load_params(workdir / "params.yaml")
    return drift_check_task.fn(params, str(state), "models")


def test_no_drift_and_a_good_model_fire_nothing(project: Path, workdir: Path) -> None:
    state = workdir / "state" / "live.sqlite"
    fill_state(state, recent_rows(project), right=True, drift_per_bar=2e-4)
    result = run_task(workdir, state)
    assert result["status"] == "ok" and result["fired"] == [] and result["reason"] == ""
    assert [f["feature"] for f in result["features"]] == NAMES
    assert all(f["status"] == "ok" and f["n_recent"] == 400 for f in result["features"])
    assert max(f["psi"] for f in result["features"]) < 0.25
    assert {t["name"]: t["status"] for t in result["triggers"]} == {
        "rolling_sharpe": "ok",
        "directional_accuracy": "ok",
        "accuracy_ratio": "ok",
    }
    ctx = result["context"]
    assert ctx["reference"]["source"] == "training_window" and ctx["reference"]["rows"] == TRAIN_ROWS - 60
    assert ctx["window"]["end_ms"] == T0_MS + 399 * MINUTE and ctx["labelled_predictions"] == 390
    assert ctx["model"]["historical_directional_accuracy"] == 0.55 and ctx["shadow_active"] is False
    body = json.loads((workdir / "reports" / "drift" / "drift.json").read_text())
    assert body["status"] == "ok" and body["features"][0]["reference_block_p99"] is not None
    assert (workdir / "reports" / "drift" / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drift_and_a_bad_model_fire_and_the_files_are_byte_stable(project: Path, workdir: Path) -> None:
    state = workdir / "state" / "live.sqlite"
    fill_state(state, recent_rows(project, shift_rsi=20.0), right=False, drift_per_bar=-2e-4)
    result = run_task(workdir, state)
    assert result["status"] == "fired"
    fired_features = [f["feature"] for f in result["features"] if f["status"] == "fired"]
    assert fired_features == ["rsi_14"]
    assert result["fired"][0].startswith("psi rsi_14=")
    assert {"directional_accuracy=0<0.6", "accuracy_ratio=0<0.9"} <= set(result["fired"])
    assert any(f.startswith("rolling_sharpe=") for f in result["fired"])
    assert result["reason"] == "drift: " + ", ".join(result["fired"])
    out = workdir / "reports" / "drift"
    first = (out / "drift.json").read_bytes(), (out / "drift.png").read_bytes()
    run_task(workdir, state)
    assert ((out / "drift.json").read_bytes(), (out / "drift.png").read_bytes()) == first


def test_missing_inputs_give_an_insufficient_data_report(project: Path, workdir: Path) -> None:
    params = load_params(workdir / "params.yaml")
    missing = check_drift(params, workdir / "state" / "nope.sqlite", Path("models"))
    assert missing.status == "insufficient data" and "nope.sqlite not found" in missing.notes[0]

    no_bundle = check_drift(params, workdir / "state" / "nope.sqlite", workdir / "empty_models")
    assert no_bundle.status == "insufficient data" and "no champion bundle" in no_bundle.notes[0]

    state = workdir / "state" / "live.sqlite"
    with StateStore(state) as store:  # bars (warm-up) but no predictions yet
        for i in range(5):
            store.commit_bar(BarRecord(T0_MS + i * MINUTE, PortfolioSnapshot(1e4, 1e4, 0.0, 0.0, 0.0, 0.0)))
    result = run_task(workdir, state)
    assert result["status"] == "insufficient data" and "no champion price_lgbm predictions" in result["notes"][0]
    assert result["features"] == [] and result["triggers"] == []
    assert (workdir / "reports" / "drift" / "drift.png").is_file()

    empty = workdir / "state" / "empty.sqlite"
    StateStore(empty).close()
    assert "holds no bars" in check_drift(params, empty, Path("models")).notes[0]

    # Too few recent rows: reported, nothing fires (even with drift and a wrong model).
    short = workdir / "state" / "short.sqlite"
    fill_state(short, recent_rows(project, n=150, shift_rsi=20.0), right=False, drift_per_bar=-2e-4)
    report = check_drift(params, short, Path("models"))
    assert report.status == "insufficient data" and report.fired == []


def test_reference_falls_back_to_the_holdout(project: Path, workdir: Path) -> None:
    state = workdir / "state" / "live.sqlite"
    fill_state(state, recent_rows(project), right=True, drift_per_bar=2e-4)
    (workdir / "data" / "price_features.parquet").unlink()
    params = load_params(workdir / "params.yaml")
    report = check_drift(params, state, Path("models"))
    assert report.features == () and "no reference rows" in report.notes[0]
    assert report.status == "ok"  # the performance triggers still ran

    ref = reference_rows(project)
    holdout = Holdout(
        X=ref[-1000:],
        y=np.zeros(1000),
        ts_ms=T0_MS + MINUTE * np.arange(1000),
        feature_names=tuple(NAMES),
        metric="ic",
        label="log_return_10m",
    )
    save_holdout(workdir / "models" / "native" / "price_lgbm" / "price_lgbm.holdout.npz", holdout)
    report = check_drift(params, state, Path("models"))
    assert report.context["reference"]["source"] == "holdout" and report.context["reference"]["rows"] == 1000
    assert "not found" in report.context["reference"]["why"] and len(report.features) == 19


@pytest.fixture
def retrain_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace only ``flows.retrain.retrain_flow`` (the real one backfills and trains for minutes)."""
    calls: list[dict[str, Any]] = []

    def fake_retrain_flow(params_path: str = "params.yaml", reason: str = "schedule") -> dict[str, Any]:
        calls.append({"params_path": params_path, "reason": reason})
        return {"retrained": True}

    try:
        import flows.retrain as module
    except ImportError:  # the retrain flow is written elsewhere; drift_check only needs this one name
        module = types.ModuleType("flows.retrain")
        monkeypatch.setitem(sys.modules, "flows.retrain", module)
    monkeypatch.setattr(module, "retrain_flow", fake_retrain_flow, raising=False)
    return calls


def test_flow_starts_the_retrain_when_something_fires(
    project: Path, workdir: Path, prefect_harness: None, retrain_calls: list[dict[str, Any]]
) -> None:
    from flows.drift import drift_check_flow

    state = workdir / "state" / "live.sqlite"
    fill_state(state, recent_rows(project, shift_rsi=20.0), right=True, drift_per_bar=2e-4)
    result = drift_check_flow(params_path="params.yaml", state_path=str(state), models_dir="models")
    assert result["fired"] and result["fired"][0].startswith("psi rsi_14=")
    assert retrain_calls == [{"params_path": "params.yaml", "reason": result["reason"]}]
    assert result["retrain"]["started"] is True and result["retrain"]["result"] == {"retrained": True}

    retrain_calls.clear()
    off = drift_check_flow(params_path="params.yaml", state_path=str(state), models_dir="models", retrain=False)
    assert retrain_calls == [] and off["retrain"] == {
        "started": False,
        "reason": off["reason"],
        "skipped": "retrain=False",
    }

    shadowed = workdir / "state" / "shadow.sqlite"
    fill_state(shadowed, recent_rows(project, shift_rsi=20.0), right=True, drift_per_bar=2e-4, shadow_last=True)
    busy = drift_check_flow(params_path="params.yaml", state_path=str(shadowed), models_dir="models")
    assert retrain_calls == [] and "shadow slot" in busy["retrain"]["skipped"]

    calm = workdir / "state" / "calm.sqlite"
    fill_state(calm, recent_rows(project), right=True, drift_per_bar=2e-4)
    quiet = drift_check_flow(params_path="params.yaml", state_path=str(calm), models_dir="models")
    assert quiet["status"] == "ok" and retrain_calls == [] and quiet["retrain"]["started"] is False
