"""The MLflow registry against a real ``mlflow server`` on 127.0.0.1: register, champion / challenger, refusals.

Bundles are real exports (:func:`cryptoml.export.convert.export_model`) of tiny XGBoost models: a weak
one (2 trees) and a strong one (40 trees) fitted on the same rows, scored on one saved holdout. Each test
uses its own registered model names, so they share the one server of the session. Reads go through
MLflow's REST API with urllib where the issue says consumers do ("the alias is readable over REST").
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
from typer.testing import CliRunner

from cryptoml.errors import ConfigError, ModelContractError
from cryptoml.export.bundle import META_FILE, MODEL_FILE, read_meta
from cryptoml.models.holdout import Holdout, load_holdout, save_holdout
from tests.e2e.conftest import subprocess_env
from tests.support.mlflow_server import MlflowServer

pytestmark = pytest.mark.server

FEATURES = ["a", "b", "c", "d"]
T0_MS = 1_704_067_200_000


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real tracking server for the session (SQLite store + proxied artifacts in a temp folder)."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server"), base_env=subprocess_env()) as server:
        yield server


@pytest.fixture(autouse=True)
def tracking_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused request fails now, not in minutes


# --- data and bundles -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 5))
    y = X[:, 0] + 0.5 * X[:, 1] ** 2 + 0.1 * rng.normal(size=600)
    return {"X": X, "y": y, "won": (y > np.median(y)).astype(float)}


def export(
    out: Path,
    name: str,
    data: dict[str, np.ndarray],
    trees: int,
    *,
    kind: str = "xgboost_regressor",
    features: list[str] = FEATURES,
) -> Path:
    """A real bundle ``out/<name>-<trees>`` of an XGBoost model with ``trees`` rounds on the first 400 rows."""
    import xgboost as xgb

    from cryptoml.export.convert import export_model

    cols = [ord(f) - ord("a") for f in features]
    X, label = data["X"][:, cols], data["won" if kind == "xgboost_classifier" else "y"]
    objective = "binary:logistic" if kind == "xgboost_classifier" else "reg:squarederror"
    params = {"max_depth": 3, "nthread": 1, "seed": 0, "objective": objective}
    booster = xgb.train(params, xgb.DMatrix(X[:400], label[:400], feature_names=features), trees)
    meta = {
        "label": {"label": "y"},
        "training_window": {"start_ms": T0_MS, "end_ms": T0_MS + 400 * 60_000},
        "data_hash": {"path": "data/toy", "md5": "ab" * 16, "origin": "computed"},
        "metrics": {"rmse": 0.1},
        "git_commit": "0123456789abcdef",
    }
    return export_model(kind, booster, X[400:], out / f"{name}-{trees}", name, meta)


def holdout_file(out: Path, data: dict[str, np.ndarray], *, metric: str = "rmse", features: str = "abcde") -> Path:
    """The test rows 400..599 with columns ``features`` (a superset of the models' is fine)."""
    cols = [ord(f) - ord("a") for f in features]
    y = data["won"] if metric == "auc" else data["y"]
    h = Holdout(
        X=data["X"][400:, cols],
        y=y[400:],
        ts_ms=T0_MS + 60_000 * np.arange(400, 600),
        feature_names=tuple(features),
        metric=metric,
        label="won" if metric == "auc" else "y",
    )
    return save_holdout(out / f"holdout-{metric}-{features}.npz", h)


# --- REST helpers (what a consumer or the MLflow UI does) ----------------------------------------------


def rest(server: MlflowServer, path: str, params: dict[str, str] | None = None, body: Any = None) -> Any:
    url = f"{server.url}/api/2.0/mlflow/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def alias_version(server: MlflowServer, name: str, alias: str) -> str:
    got = rest(server, "registered-models/alias", {"name": name, "alias": alias})
    return str(got["model_version"]["version"])


def version_tags(server: MlflowServer, name: str, version: str) -> dict[str, str]:
    mv = rest(server, "model-versions/get", {"name": name, "version": version})["model_version"]
    return {t["key"]: t["value"] for t in mv.get("tags", [])}


def n_versions(server: MlflowServer, name: str) -> int:
    found = rest(server, "model-versions/search", {"filter": f"name = '{name}'"})
    return len(found.get("model_versions", []))


def run_artifact(server: MlflowServer, name: str, version: str, relative: str) -> Path:
    """The file of a version's run in the server's artifact store (to tamper with it)."""
    run_id = version_tags(server, name, version)["bundle_run_id"]
    (path,) = server.artifacts_dir.glob(f"*/{run_id}/artifacts/{relative}")
    return path


# --- the contract ---------------------------------------------------------------------------------------


def test_register_then_promote_only_a_better_challenger(
    mlflow_server: MlflowServer, data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    from tasks import registry

    name = "toy_profit"
    weak, strong = export(tmp_path, name, data, 2), export(tmp_path, name, data, 40)
    holdout = holdout_file(tmp_path, data)

    first = registry.register_bundle(weak, holdout, promote_first=True)
    assert (first.name, first.version, first.created, first.promoted_first) == (name, "1", True, True)
    assert alias_version(mlflow_server, name, "champion") == alias_version(mlflow_server, name, "challenger") == "1"
    tags = version_tags(mlflow_server, name, "1")
    assert tags["holdout_metric"] == "rmse" and tags["higher_is_better"] == "false"
    assert float(tags["holdout_value"]) == pytest.approx(first.holdout_value)
    assert tags["bundle_sha256"] == read_meta(weak)["onnx_sha256"]
    assert json.loads(tags["feature_names"]) == FEATURES
    assert tags["data_md5"] == "ab" * 16 and tags["training_start_ms"] == str(T0_MS)
    assert tags["promotion"] == "first"
    # The run holds exactly the bundle files the edge runner downloads, and the holdout.
    bundle_files = sorted(p.name for p in run_artifact(mlflow_server, name, "1", "bundle").iterdir())
    assert bundle_files == sorted([MODEL_FILE, META_FILE])
    assert (
        run_artifact(mlflow_server, name, "1", f"bundle/{MODEL_FILE}").read_bytes() == (weak / MODEL_FILE).read_bytes()
    )
    assert load_holdout(run_artifact(mlflow_server, name, "1", "holdout/holdout.npz")).feature_names == tuple("abcde")

    # The same bundle again: no new version.
    again = registry.register_bundle(weak, holdout, promote_first=True)
    assert (again.version, again.created, again.promoted_first) == ("1", False, False)
    assert n_versions(mlflow_server, name) == 1

    better = registry.register_bundle(strong, holdout, promote_first=True)
    assert (better.version, better.created, better.promoted_first) == ("2", True, False)
    assert better.holdout_value < first.holdout_value  # rmse: lower is better
    assert alias_version(mlflow_server, name, "challenger") == "2"
    assert alias_version(mlflow_server, name, "champion") == "1"

    # Better, but not by the margin: refused, with the numbers recorded.
    gain = first.holdout_value - better.holdout_value
    refused = registry.promote(name, margin=gain * 2)
    assert (refused.status, refused.promoted, refused.champion_version) == ("refused", False, "1")
    assert refused.champion_value == pytest.approx(first.holdout_value)
    assert alias_version(mlflow_server, name, "champion") == "1"
    assert f"margin {gain * 2:g}" in version_tags(mlflow_server, name, "2")["promotion_refused"]

    promoted = registry.promote(name, margin=gain / 2)
    assert (promoted.status, promoted.version, promoted.metric) == ("promoted", "2", "rmse")
    assert promoted.challenger_value == pytest.approx(better.holdout_value)
    assert alias_version(mlflow_server, name, "champion") == "2"
    tags = version_tags(mlflow_server, name, "2")
    assert tags["promotion"] == "metric" and "promotion_refused" not in tags
    assert registry.promote(name, margin=0.0).status == "already_champion"
    # Consumers resolve the alias: the project's fetch, and MLflow's own models:/ URI.
    fetched = registry.fetch_bundle(name, "champion", tmp_path / "fetched")
    assert fetched.meta["onnx_sha256"] == read_meta(strong)["onnx_sha256"]
    mlflow = registry.tracking._mlflow()
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "uri")))
    assert (logged / "model.onnx").read_bytes() == (strong / MODEL_FILE).read_bytes()

    # Re-registering the weak model after the strong one is a new version (a rollback candidate): it is
    # the challenger, and worse than the champion on its holdout.
    rollback = registry.register_bundle(weak, holdout, promote_first=True)
    assert (rollback.version, rollback.created) == ("3", True)
    worse = registry.promote(name, margin=0.0)
    assert (worse.status, worse.champion_version) == ("refused", "2")
    assert alias_version(mlflow_server, name, "champion") == "2"

    with pytest.raises(ConfigError, match="--reason"):
        registry.promote(name, margin=0.0, force=True)
    forced = registry.promote(name, margin=0.0, force=True, reason="roll back: v2 misbehaves live")
    assert forced.status == "forced" and alias_version(mlflow_server, name, "champion") == "3"
    tags = version_tags(mlflow_server, name, "3")
    assert tags["promotion"] == "forced" and tags["promotion_reason"] == "roll back: v2 misbehaves live"


def test_an_alias_moved_in_the_ui_is_the_champion(
    mlflow_server: MlflowServer, data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Consumers follow the alias: whoever moved it, promote compares against the version it points to."""
    from tasks import registry

    name = "toy_ui"
    holdout = holdout_file(tmp_path, data)
    registry.register_bundle(export(tmp_path, name, data, 40), holdout, promote_first=False)
    registry.register_bundle(export(tmp_path, name, data, 2), holdout, promote_first=False)
    assert "champion" not in registry._aliases(registry._client(), name)
    # The UI's request: champion -> v1 (the strong one).
    rest(mlflow_server, "registered-models/alias", body={"name": name, "alias": "champion", "version": "1"})
    decision = registry.promote(name, margin=0.0)  # the challenger v2 (weak) against the UI's champion
    assert (decision.status, decision.champion_version) == ("refused", "1")
    assert decision.challenger_value > (decision.champion_value or 0.0)


def test_higher_is_better_metric_promotes_the_higher_auc(
    mlflow_server: MlflowServer, data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    from tasks import registry

    name = "toy_success"
    holdout = holdout_file(tmp_path, data, metric="auc")
    kw: dict[str, Any] = {"kind": "xgboost_classifier"}
    weak = registry.register_bundle(export(tmp_path, name, data, 1, **kw), holdout, promote_first=True)
    strong = registry.register_bundle(export(tmp_path, name, data, 40, **kw), holdout, promote_first=True)
    assert strong.metric == "auc" and strong.holdout_value > weak.holdout_value
    assert version_tags(mlflow_server, name, strong.version)["higher_is_better"] == "true"
    assert registry.promote(name, margin=0.0).status == "promoted"

    rows = {r.field: r for r in registry.compare(name, weak.version, strong.version)}
    auc = rows["auc (higher is better)"]
    assert (auc.first, auc.second) == (pytest.approx(weak.holdout_value), pytest.approx(strong.holdout_value))
    assert auc.better == 2
    assert rows["aliases"].second == "challenger, champion"
    assert rows["data md5"].first == "ab" * 16


# --- refusals ---------------------------------------------------------------------------------------------


def test_corrupt_local_bundle_registers_nothing(
    mlflow_server: MlflowServer, data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    from tasks import registry

    bundle = export(tmp_path, "toy_never", data, 2)
    raw = bytearray((bundle / MODEL_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (bundle / MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelContractError, match="corrupt or was replaced"):
        registry.register_bundle(bundle, holdout_file(tmp_path, data), promote_first=True)
    assert n_versions(mlflow_server, "toy_never") == 0


@pytest.fixture()
def two_versions(mlflow_server: MlflowServer, data: dict[str, np.ndarray], tmp_path: Path, request: Any) -> str:
    """A fresh model with v1 (weak, champion) and v2 (strong, challenger); returns its name."""
    from tasks import registry

    name = f"toy_{request.node.name.removeprefix('test_')[:40]}"
    holdout = holdout_file(tmp_path, data)
    registry.register_bundle(export(tmp_path, name, data, 2), holdout, promote_first=True)
    registry.register_bundle(export(tmp_path, name, data, 40), holdout, promote_first=True)
    return name


def test_promote_refuses_a_bundle_corrupted_in_the_store(mlflow_server: MlflowServer, two_versions: str) -> None:
    from tasks import registry

    stored = run_artifact(mlflow_server, two_versions, "2", f"bundle/{MODEL_FILE}")
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    stored.write_bytes(bytes(raw))
    with pytest.raises(ModelContractError, match=r"v2: the registered bundle is unusable: .*corrupt or was replaced"):
        registry.promote(two_versions, margin=0.0)
    assert alias_version(mlflow_server, two_versions, "champion") == "1"


def test_promote_refuses_a_bundle_swapped_after_registration(
    mlflow_server: MlflowServer, two_versions: str, data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A whole valid bundle re-logged into the version's run: consistent with itself, not with the version."""
    from tasks import registry

    other = export(tmp_path / "swap", two_versions, data, 7)
    client = registry._client()
    run_id = version_tags(mlflow_server, two_versions, "2")["bundle_run_id"]
    for file in (MODEL_FILE, META_FILE):
        client.log_artifact(run_id, str(other / file), "bundle")
    with pytest.raises(ModelContractError, match="replaced after registration"):
        registry.promote(two_versions, margin=0.0)


def test_promote_refuses_a_feature_mismatched_bundle(
    mlflow_server: MlflowServer, two_versions: str, tmp_path: Path
) -> None:
    """The stored meta renames a feature: the bundle no longer matches the version's feature list."""
    from tasks import registry

    stored = run_artifact(mlflow_server, two_versions, "2", f"bundle/{META_FILE}")
    meta = json.loads(stored.read_text())
    meta["feature_names"] = ["a", "b", "c", "z"]
    stored.write_text(json.dumps(meta))
    with pytest.raises(ModelContractError, match=r"feature list differs .*lacks \['d'\] and has extra \['z'\]"):
        registry.promote(two_versions, margin=0.0)


def test_promote_refuses_versions_without_their_artifacts(mlflow_server: MlflowServer, two_versions: str) -> None:
    from tasks import registry

    run_artifact(mlflow_server, two_versions, "2", "holdout/holdout.npz").unlink()
    with pytest.raises(ModelContractError, match=r"v2 holdout: artifact holdout/holdout.npz not found"):
        registry.promote(two_versions, margin=0.0)
    # A version made outside cryptoml (here: from v1's logged model, without the tags) is not promotable.
    client = registry._client()
    v1 = client.get_model_version(two_versions, "1")
    bare = client.create_model_version(two_versions, v1.source, model_id=v1.source.removeprefix("models:/"))
    with pytest.raises(ModelContractError, match="not registered by cryptoml"):
        registry.promote(two_versions, str(bare.version), margin=0.0)


def test_champion_that_cannot_read_the_challengers_holdout(
    mlflow_server: MlflowServer, data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The champion needs feature d, the challenger's holdout has none: no comparison, unless forced."""
    from tasks import registry

    name = "toy_features"
    registry.register_bundle(export(tmp_path, name, data, 40), holdout_file(tmp_path, data), promote_first=True)
    narrow = holdout_file(tmp_path, data, features="abce")
    registry.register_bundle(
        export(tmp_path, name, data, 40, features=["a", "b", "c", "e"]), narrow, promote_first=True
    )
    with pytest.raises(
        ModelContractError, match=r"champion v1 cannot be scored on v2's holdout: .*lacks features \['d'\]"
    ):
        registry.promote(name, margin=0.0)
    forced = registry.promote(name, margin=0.0, force=True, reason="feature d is retired")
    assert forced.status == "forced" and forced.champion_value is None
    assert alias_version(mlflow_server, name, "champion") == "2"


# --- the CLI ------------------------------------------------------------------------------------------------


def test_cli_promote_and_compare(mlflow_server: MlflowServer, two_versions: str, tmp_path: Path) -> None:
    from flows.cli import app

    runner = CliRunner()
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  margin: {{default: 0.0, {two_versions}: 1000.0}}\n")
    refused = runner.invoke(app, ["promote", two_versions, "--params", str(params)])
    assert refused.exit_code == 0, refused.output
    assert "refused:" in refused.output and "margin 1000" in refused.output

    no_reason = runner.invoke(app, ["promote", two_versions, "--force"])
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output

    zero_margin = tmp_path / "zero_margin.yaml"
    zero_margin.write_text("registry:\n  margin: {default: 0.0}\n")
    promoted = runner.invoke(app, ["promote", two_versions, "--params", str(zero_margin)])
    assert promoted.exit_code == 0, promoted.output
    assert f"promoted: {two_versions} v2 is now the champion" in promoted.output

    table = runner.invoke(app, ["compare", two_versions, "1", "2"], terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "rmse (lower is better)" in table.output and "v2: y, 200 rows" in table.output

    run_artifact(mlflow_server, two_versions, "1", f"bundle/{MODEL_FILE}").write_bytes(b"not onnx")
    broken = runner.invoke(app, ["promote", two_versions, "--version", "1"])
    assert broken.exit_code == 4, broken.output
    assert "ModelContractError" in broken.output and "v1" in broken.output

    unknown = runner.invoke(app, ["compare", "toy_no_such_model", "1", "2"])
    assert unknown.exit_code == 2 and "toy_no_such_model" in unknown.output
