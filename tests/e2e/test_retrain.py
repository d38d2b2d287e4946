"""Retraining and the shadow review against a real ``mlflow server`` on 127.0.0.1 and a real runner state file.

The review tests register two real LightGBM bundles per model (a champion and a challenger, exported with the
parity gate), fill a real :class:`~cryptoml.edge.state.StateStore` with labelled champion-slot and shadow-slot
predictions as the edge runner commits them, and check the decision and its MLflow tags: a better challenger is
promoted (auto-promotion on), a worse one never is, a short shadow period is insufficient, and with
auto-promotion off a better one waits for a person. Each test uses its own model names on the one server.

The flow test runs ``retrain`` twice in a temp project on a 2-day synthetic market (window 1 day, then 1.5 days):
the first version becomes the first champion, the second is registered as `challenger` with its reason and
window; the project's DVC outputs are never written; then ``shadow_review`` promotes it on shadow evidence.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryptoml.config import Params, params_from_dict
from cryptoml.edge.state import BarRecord, PortfolioSnapshot, Prediction, RealisedReturn, StateStore
from tests.e2e.conftest import subprocess_env, write_params
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.server

T0_MS = 1_704_067_200_000  # 2024-01-01T00:00Z
BAR_MS = 60_000
SYMBOL = "BTC/USDT:USDT"
FEATURES = ["a", "b", "c", "d"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow-retrain"), base_env=subprocess_env()) as server:
        yield server


@pytest.fixture(autouse=True)
def tracking_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def rest_get(server: MlflowServer, path: str, params: dict[str, str]) -> Any:
    url = f"{server.url}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def alias_version(server: MlflowServer, name: str, alias: str) -> str:
    return str(rest_get(server, "registered-models/alias", {"name": name, "alias": alias})["model_version"]["version"])


def version_tags(server: MlflowServer, name: str, version: str) -> dict[str, str]:
    mv = rest_get(server, "model-versions/get", {"name": name, "version": version})["model_version"]
    return {t["key"]: t["value"] for t in mv.get("tags", [])}


# --- a registered champion and challenger ---------------------------------------------------------------------


def lgbm_bundle(out: Path, name: str, rounds: int) -> Path:
    """A real ``lightgbm_regressor`` bundle (``rounds`` trees on 4 features) exported with the parity gate."""
    import lightgbm as lgb

    from cryptoml.export.convert import export_model

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    y = X[:, 0] * 1e-3 + rng.normal(0, 5e-4, 300)
    params = {"objective": "regression", "num_leaves": 7, "verbose": -1, "num_threads": 1, "seed": 0}
    booster = lgb.train(params, lgb.Dataset(X[:200], y[:200], feature_name=FEATURES), rounds)
    meta = {
        "label": {"name": "log_return_10m", "horizon_minutes": 10},
        "horizon_minutes": 10,
        "training_window": {"start_ms": T0_MS, "end_ms": T0_MS + 200 * BAR_MS},
        "data_hash": {"path": "data/toy", "md5": "cd" * 16, "origin": "computed"},
        "metrics": {"ic": 0.1},
        "git_commit": "0123456789abcdef",
    }
    holdout_rows = X[200:]
    export_model("lightgbm_regressor", booster, holdout_rows, out / f"{name}-{rounds}", name, meta)
    from cryptoml.models.holdout import Holdout, save_holdout

    save_holdout(
        out / f"{name}-{rounds}.holdout.npz",
        Holdout(X=holdout_rows, y=y[200:], ts_ms=T0_MS + BAR_MS * np.arange(200, 300), feature_names=tuple(FEATURES),
                metric="ic", label="log_return_10m"),
    )  # fmt: skip
    return out / f"{name}-{rounds}"


def champion_and_challenger(tmp_path: Path, name: str) -> tuple[str, str, str]:
    """Register v1 (becomes champion, the first) and v2 (challenger); returns (v1, v2, v2's sha256 prefix)."""
    from tasks import registry

    first, second = lgbm_bundle(tmp_path, name, 3), lgbm_bundle(tmp_path, name, 30)
    v1 = registry.register_bundle(first, Path(f"{first}.holdout.npz"), promote_first=True)
    v2 = registry.register_bundle(second, Path(f"{second}.holdout.npz"), promote_first=True)
    assert (v1.promoted_first, v2.promoted_first) == (True, False)
    sha = json.loads((second / "model_meta.json").read_text())["onnx_sha256"][:12]
    return v1.version, v2.version, sha


# --- the runner's state file ----------------------------------------------------------------------------------


def fill_state(
    path: Path,
    name: str,
    bars: int,
    *,
    champion_version: str,
    shadow_version: str,
    challenger_noise: float,
    champion_noise: float,
    start_bar: int = 0,
    seed: int = 0,
) -> None:
    """Commit ``bars`` 1-minute bars as the runner does: each bar's champion and shadow predictions, and the
    realised return labelling the previous bar (horizon one bar here). Predictions are the realised return plus
    noise of the given scale (in units of the return's own scale, 10 bp). Only the store's newest bar is unlabelled."""
    rng = np.random.default_rng(seed)
    realised = rng.normal(0, 1e-3, bars)
    champ = realised + rng.normal(0, champion_noise * 1e-3, bars)
    chall = realised + rng.normal(0, challenger_noise * 1e-3, bars)
    snapshot = PortfolioSnapshot(10_000.0, 10_000.0, 0.0, 0.0, 0.0, 0.0)
    with StateStore(path) as store:
        for i in range(bars):
            ts = T0_MS + (start_bar + i) * BAR_MS
            feats = [0.1, 0.2]
            # The label of the previous bar (a bar of an earlier call when i == 0: any value will do there).
            previous = realised[i - 1] if i else (rng.normal(0, 1e-3) if start_bar else None)
            store.commit_bar(
                BarRecord(
                    bar_ts_ms=ts,
                    portfolio=snapshot,
                    predictions=[
                        Prediction(SYMBOL, name, f"v{champion_version}", ["x", "y"], feats, float(champ[i])),
                        Prediction(SYMBOL, name, shadow_version, ["x", "y"], feats, float(chall[i]), slot="shadow"),
                    ],
                    realised_returns=[RealisedReturn(ts - BAR_MS, SYMBOL, name, float(previous))] if previous else [],
                )
            )


def review_params(*, auto_promote: bool, shadow_hours: float = 2.0, min_predictions: int = 100) -> Params:
    return params_from_dict(
        {
            "retrain": {
                "shadow_hours": shadow_hours,
                "min_shadow_predictions": min_predictions,
                "auto_promote": auto_promote,
            },
            "registry": {"margin": {"default": 0.05}},
            "live": {"symbols": [SYMBOL]},
        }
    )


def review(name: str, params: Params, state: Path) -> dict[str, Any]:
    from tasks.retrain import review_model

    store = StateStore(state, read_only=True) if state.is_file() else None
    try:
        return review_model(name, params, store, str(state), now_ms=T0_MS + 10 * 86_400_000)
    finally:
        if store is not None:
            store.close()


# --- the shadow review ----------------------------------------------------------------------------------------------


def test_a_better_challenger_is_promoted_when_auto_promotion_is_on(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    name = "toy_shadow_better"
    v1, v2, sha = champion_and_challenger(tmp_path, name)
    state = tmp_path / "live.sqlite"
    # An older challenger's shadow rows (terrible) come first; they must not count for v2.
    fill_state(state, name, 200, champion_version=v1, shadow_version="v9", challenger_noise=50, champion_noise=2)
    # v2 ran in shadow under its sha256 prefix (a bundles folder) for 200 bars, then under "v2" (the registry).
    fill_state(state, name, 200, champion_version=v1, shadow_version=sha, challenger_noise=0.3, champion_noise=2,
               start_bar=200, seed=1)  # fmt: skip
    fill_state(state, name, 100, champion_version=v1, shadow_version=f"v{v2}", challenger_noise=0.3, champion_noise=2,
               start_bar=400, seed=2)  # fmt: skip

    result = review(name, review_params(auto_promote=True), state)
    assert result["decision"] == "promoted", result
    comparison = result["comparison"]
    assert comparison["status"] == "better" and comparison["n"] == 299  # bars 200..498 labelled; v9's left out
    assert comparison["challenger"]["ic"] > comparison["champion"]["ic"] + 0.05
    assert alias_version(mlflow_server, name, "champion") == v2
    tags = version_tags(mlflow_server, name, v2)
    assert tags["promotion"] == "shadow" and tags["promotion_detail"].startswith("shadow: ic (higher is better)")
    assert (tags["shadow_status"], tags["shadow_decision"], tags["shadow_n"]) == ("better", "promoted", "299")
    assert (tags["shadow_metric"], float(tags["shadow_margin"]), tags["shadow_champion_version"]) == ("ic", 0.05, v1)
    assert json.loads(tags["shadow_challenger_metrics"])["ic"] == pytest.approx(comparison["challenger"]["ic"])
    assert json.loads(tags["shadow_champion_metrics"])["n"] == 299
    assert tags["shadow_reviewed_at"] == "2024-01-11T00:00:00Z" and tags["shadow_auto_promote"] == "true"
    # Reviewed again: the challenger is the champion now, nothing to decide.
    assert review(name, review_params(auto_promote=True), state)["decision"] == "skipped"


def test_a_worse_challenger_is_never_promoted(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    name = "toy_shadow_worse"
    v1, v2, _ = champion_and_challenger(tmp_path, name)
    state = tmp_path / "live.sqlite"
    fill_state(state, name, 400, champion_version=v1, shadow_version=f"v{v2}", challenger_noise=3, champion_noise=0.3)
    result = review(name, review_params(auto_promote=True), state)
    assert (result["decision"], result["comparison"]["status"]) == ("not_promoted", "not_better")
    assert alias_version(mlflow_server, name, "champion") == v1
    tags = version_tags(mlflow_server, name, v2)
    assert tags["shadow_status"] == "not_better" and tags["shadow_decision"] == "not_promoted"
    assert f"v{v1} stays champion" in tags["shadow_reason"] and "promotion" not in tags
    assert float(tags["shadow_gain"]) < 0


def test_a_short_shadow_period_is_insufficient(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    name = "toy_shadow_short"
    v1, v2, _ = champion_and_challenger(tmp_path, name)
    state = tmp_path / "live.sqlite"
    missing = review(name, review_params(auto_promote=True), state)  # the runner has not run yet
    assert missing["decision"] == "waiting" and "no state file" in missing["reason"]
    assert version_tags(mlflow_server, name, v2)["shadow_n"] == "0"

    fill_state(state, name, 90, champion_version=v1, shadow_version=f"v{v2}", challenger_noise=0.1, champion_noise=5)
    result = review(name, review_params(auto_promote=True), state)
    assert (result["decision"], result["comparison"]["status"]) == ("waiting", "insufficient")
    assert alias_version(mlflow_server, name, "champion") == v1
    tags = version_tags(mlflow_server, name, v2)
    assert tags["shadow_status"] == "insufficient" and tags["shadow_n"] == "89"
    assert "89 < 100 compared predictions" in tags["shadow_reason"] and "1.5 h < 2 h" in tags["shadow_reason"]


def test_with_auto_promotion_off_a_better_challenger_awaits_a_person(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    name = "toy_shadow_person"
    v1, v2, _ = champion_and_challenger(tmp_path, name)
    state = tmp_path / "live.sqlite"
    fill_state(state, name, 300, champion_version=v1, shadow_version=f"v{v2}", challenger_noise=0.3, champion_noise=3)
    result = review(name, review_params(auto_promote=False), state)
    assert (result["decision"], result["comparison"]["status"]) == ("awaiting_person", "better")
    assert alias_version(mlflow_server, name, "champion") == v1
    tags = version_tags(mlflow_server, name, v2)
    assert tags["shadow_decision"] == "awaiting_person" and tags["shadow_auto_promote"] == "false"
    assert "awaiting a person" in tags["shadow_reason"]
    assert f"cryptoml promote {name} --version {v2} --force" in tags["shadow_reason"]
    assert "promotion" not in tags


def test_move_champion_refuses_a_stale_comparison(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    from tasks import registry

    name = "toy_shadow_stale"
    v1, v2, _ = champion_and_challenger(tmp_path, name)
    assert not registry.move_champion(name, v2, expected_champion="7", tags={"x": "y"})
    assert alias_version(mlflow_server, name, "champion") == v1 and "x" not in version_tags(mlflow_server, name, v2)
    assert registry.move_champion(name, v2, expected_champion=v1, tags={"x": "y"})
    assert alias_version(mlflow_server, name, "champion") == v2 and version_tags(mlflow_server, name, v2)["x"] == "y"


# --- the retrain workspace -----------------------------------------------------------------------------------------


def test_the_retrain_store_is_topped_up_then_cut_to_the_newest_window(tmp_path: Path) -> None:
    from cryptoml.config import SyntheticParams
    from cryptoml.market.store import DatasetKey, ParquetStore
    from cryptoml.market.synthetic import write_market
    from tasks.retrain import cut_window_task, top_up_store_task

    workspace, retrain = ParquetStore(tmp_path / "workspace"), ParquetStore(tmp_path / "retrain")
    write_market(SyntheticParams(days=2), workspace)
    n = len(list(workspace.datasets()))
    candles = DatasetKey("binance", "BTC/USDT:USDT", "ohlcv", "1m")
    day_ms = 86_400_000
    retrain.write(candles, workspace.read(candles, end_ms=T0_MS + day_ms), workspace.metadata(candles))
    # Synthetic candles never enter the store of an exchange source.
    assert top_up_store_task.fn(str(workspace.root), str(retrain.root), synthetic=False)["skipped"] == n
    topped = top_up_store_task.fn(str(workspace.root), str(retrain.root), synthetic=True)
    assert (topped["copied"], topped["topped_up"], topped["rows_added"]) == (n - 1, 1, 1440)
    assert retrain.read(candles).equals(workspace.read(candles))
    assert top_up_store_task.fn(str(workspace.root), str(retrain.root), synthetic=True)["rows_added"] == 0

    window = cut_window_task.fn(str(retrain.root), str(tmp_path / "window"), 0.5, "1m")
    end_ms = T0_MS + 2 * day_ms  # the close of the newest candle
    assert (window["start_ms"], window["end_ms"], window["datasets"]) == (end_ms - day_ms // 2, end_ms, n)
    cut = ParquetStore(tmp_path / "window")
    assert len(cut.read(candles)) == 720
    for key in cut.datasets():
        ts = cut.read(key)["ts_ms"]
        assert ts.min() >= window["start_ms"] and ts.max() < end_ms, key.label()


def test_one_retrain_at_a_time_in_a_workspace_linked_to_the_projects_mlflow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from cryptoml.errors import TemporaryError
    from tasks.retrain import backfill_range, retrain_workspace

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store: sqlite:///mlruns/mlflow.db, cwd-relative
    params = params_from_dict({"market": {"data_dir": str(tmp_path / "elsewhere"), "reports_dir": "/tmp/r"}})
    (tmp_path / "state/retrain/raw").mkdir(parents=True)
    (tmp_path / "state/retrain/raw/.source").write_text("ccxt\n")
    (tmp_path / "state/retrain/raw/stale.parquet").write_bytes(b"candles of another source")
    with retrain_workspace(params, tmp_path) as ws:
        assert (ws.run / "mlruns").resolve() == (tmp_path / "mlruns").resolve()
        data = yaml.safe_load(ws.params_path.read_text())
        assert (data["market"]["data_dir"], data["market"]["reports_dir"]) == ("data/raw", "reports")
        assert not (ws.store / "stale.parquet").exists() and (ws.store / ".source").read_text() == "synthetic\n"
        with pytest.raises(TemporaryError, match="another retrain is running"), retrain_workspace(params, tmp_path):
            pass
    with retrain_workspace(params, tmp_path) as again:  # released
        assert again.run == ws.run and not (again.run / "data").exists()  # a fresh run folder
    # An exchange backfill asks for the newest window up to the open of the forming bar.
    now_ms = T0_MS + 10 * 86_400_000 + 90_500
    assert backfill_range("1m", 1.0, now_ms) == ("2024-01-10T00:01:00", "2024-01-11T00:01:00")


# --- the flows, end to end in a temp project -------------------------------------------------------------------------


def test_retrain_flow_registers_a_tagged_challenger_then_shadow_review_promotes_it(
    prefect_api: str, mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.retrain import retrain_flow, shadow_review_flow

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    small = {"synthetic.days": 2, "price_lgbm.n_estimators": 100, "retrain.families": ["price_lgbm"]}
    write_params(project, {**small, "retrain.window_days": 1.0})
    first = retrain_flow(params_path="params.yaml", reason="schedule")
    assert first["shadow_review"]["models"]["price_lgbm"]["decision"] == "skipped"  # nothing registered yet
    assert first["register"]["price_lgbm"]["champion"] is True  # the first version: champion, no shadow needed

    write_params(project, {**small, "retrain.window_days": 1.5})
    second = retrain_flow(params_path="params.yaml", reason="drift: psi ret_1 0.31")
    row = second["register"]["price_lgbm"]
    assert (row["version"], row["new_version"], row["champion"]) == ("2", True, False)
    window = second["window"]
    market_end_ms = T0_MS + 2 * 86_400_000
    assert (window["start_ms"], window["end_ms"]) == (market_end_ms - 36 * 3_600_000, market_end_ms)
    assert alias_version(mlflow_server, "price_lgbm", "challenger") == "2"
    assert alias_version(mlflow_server, "price_lgbm", "champion") == "1"
    tags = version_tags(mlflow_server, "price_lgbm", "2")
    assert tags["retrain_reason"] == "drift: psi ret_1 0.31" and tags["retrain_window_days"] == "1.5"
    assert tags["retrain_window_start_ms"] == str(window["start_ms"])
    assert tags["retrain_window_end_ms"] == str(window["end_ms"])
    assert tags["shadow_status"] == "pending" and tags["retrain_source"] == "synthetic" and tags["retrain_flow_run_id"]
    assert tags["retrain_git_commit"] == "unknown"  # the temp project is not a git repository
    # The bundle's own training window lies inside the retrain window (the train split of it).
    assert window["start_ms"] <= int(tags["training_start_ms"]) < int(tags["training_end_ms"]) < window["end_ms"]
    # Everything was written in the retrain workspace: the project's DVC outputs were never created.
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml", "state"]
    assert (project / "state/retrain/run/models/price_lgbm/model.onnx").is_file()

    # v2 in the runner's shadow slot for 3 hours, clearly better than v1: promoted when auto-promotion is on.
    fill_state(project / "state/live.sqlite", "price_lgbm", 200, champion_version="1", shadow_version="v2",
               challenger_noise=0.3, champion_noise=3)  # fmt: skip
    review_yaml = write_params(project, {**small, "retrain.auto_promote": True, "retrain.min_shadow_predictions": 150,
                                         "retrain.shadow_hours": 3.0})  # fmt: skip
    reviewed = shadow_review_flow(params_path=str(review_yaml))
    assert reviewed["state_found"] and reviewed["models"]["price_lgbm"]["decision"] == "promoted", reviewed
    assert alias_version(mlflow_server, "price_lgbm", "champion") == "2"
    assert version_tags(mlflow_server, "price_lgbm", "2")["shadow_status"] == "better"
