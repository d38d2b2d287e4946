"""ONNX export: parity per model kind, byte-stable output, and bundles that refuse to load when wrong.

Models are tiny and fitted on generated rows (a few hundred rows, tens of trees, one Keras epoch), so
the file runs in well under a minute; importing tensorflow is the largest single cost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import ModelContractError
from cryptoml.export.bundle import META_FILE, MODEL_FILE, REQUIRED_KEYS, load_bundle, write_bundle
from cryptoml.export.convert import export_model, keras_to_onnx, xgboost_to_onnx
from cryptoml.export.parity import NETWORK_TOLERANCE, TREE_TOLERANCE, check_parity, onnx_predict

ROOT = Path(__file__).resolve().parents[2]
N_FEATURES = 6
FEATURES = [f"feat_{c}" for c in "abcdef"]
CHANNELS = ["open", "high", "low", "close", "volume"]
STEPS = 30
TREE_KINDS = ("xgboost_regressor", "xgboost_classifier", "xgboost_multiclass", "lightgbm_regressor")
ALL_KINDS = (*TREE_KINDS, "keras_sequence")


def _meta_extra(**extra: Any) -> dict[str, Any]:
    return {
        "label": {"label": "fwd_return", "horizon_minutes": 10},
        "training_window": {"start_ms": 1_704_067_200_000, "end_ms": 1_704_153_600_000},
        "data_hash": {"path": "data/features", "md5": "0" * 32, "origin": "computed"},
        "git_commit": "0123456789abcdef",
        "metrics": {"rmse": 0.5},
        **extra,
    }


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    X = rng.normal(size=(400, N_FEATURES))
    X[rng.random(X.shape) < 0.03] = np.nan  # missing values must follow the same branch in both runtimes
    return pd.DataFrame(X, columns=FEATURES)


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(64, STEPS, len(CHANNELS))).astype(np.float32)


def _fit_keras(windows: np.ndarray) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((STEPS, len(CHANNELS))),
            keras.layers.Conv1D(4, 3, activation="relu"),
            keras.layers.LSTM(4),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.fit(windows, windows[:, -1, 3], epochs=1, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def models(rows: pd.DataFrame, windows: np.ndarray) -> dict[str, Any]:
    """One fitted model per kind; the XGBoost boosters carry feature names (the onnxmltools pitfall)."""
    import lightgbm as lgb
    import xgboost as xgb

    X = rows.to_numpy()
    a, b = np.nan_to_num(X[:, 0]), np.nan_to_num(X[:, 1])
    y_reg = a + b**2 + 0.1 * np.random.default_rng(1).normal(size=len(X))
    params = {"max_depth": 3, "nthread": 1, "seed": 0, "tree_method": "hist"}

    def train(objective: str, y: np.ndarray, **extra: Any) -> xgb.Booster:
        dtrain = xgb.DMatrix(X, label=y, feature_names=FEATURES)
        return xgb.train({**params, "objective": objective, **extra}, dtrain, num_boost_round=30)

    lgbm = lgb.LGBMRegressor(n_estimators=30, num_leaves=8, n_jobs=1, random_state=0, verbose=-1)
    return {
        "xgboost_regressor": train("reg:squarederror", y_reg),
        "xgboost_classifier": train("binary:logistic", (a > 0).astype(float)),
        "xgboost_multiclass": train("multi:softprob", ((a > 0).astype(int) + (b > 0)).astype(float), num_class=3),
        "lightgbm_regressor": lgbm.fit(rows, y_reg),
        "keras_sequence": _fit_keras(windows),
    }


def _inputs(kind: str, rows: pd.DataFrame, windows: np.ndarray) -> Any:
    return windows if kind == "keras_sequence" else rows


def _extra(kind: str) -> dict[str, Any]:
    if kind == "keras_sequence":
        return _meta_extra(feature_names=CHANNELS, scaler={"kind": "minmax", "min": [0.0] * 5, "max": [1.0] * 5})
    return _meta_extra()


def _native(kind: str, model: Any, X: np.ndarray) -> np.ndarray:
    if kind == "keras_sequence":
        return np.asarray(model(X, training=False), dtype=np.float64)[:, 0]
    if kind == "lightgbm_regressor":
        return np.asarray(model.booster_.predict(X), dtype=np.float64)
    return np.asarray(model.inplace_predict(X), dtype=np.float64)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_export_matches_native_predictions(
    kind: str, models: dict[str, Any], rows: pd.DataFrame, windows: np.ndarray, tmp_path: Path
) -> None:
    X_test = _inputs(kind, rows, windows)
    path = export_model(kind, models[kind], X_test, tmp_path / kind, kind, _extra(kind))
    bundle = load_bundle(path, expected_features=CHANNELS if kind == "keras_sequence" else FEATURES)
    X32 = np.asarray(X_test, dtype=np.float32)
    native = _native(kind, models[kind], X32)
    served = bundle.predict(X32)
    tolerance = NETWORK_TOLERANCE if kind == "keras_sequence" else TREE_TOLERANCE
    assert served.dtype == np.float64
    assert served.shape == native.shape
    assert np.max(np.abs(served - native)) <= tolerance
    meta = bundle.meta
    assert meta["parity"]["rows"] == len(X32)
    assert meta["parity"]["max_abs_diff"] <= meta["parity"]["tolerance"] == tolerance
    assert set(REQUIRED_KEYS) <= set(meta)
    assert meta["input_shape"] == [None, *X32.shape[1:]]
    assert meta["opset"] == (17 if kind == "keras_sequence" else 15)
    assert meta["label"] == {"label": "fwd_return", "horizon_minutes": 10}
    assert "onnxruntime" in meta["library_versions"]
    if kind == "xgboost_multiclass":
        assert meta["classes"] == [0, 1, 2]
        assert np.allclose(served.sum(axis=1), 1.0, atol=1e-5)
    # One sample without its batch axis is a batch of one.
    assert np.allclose(bundle.predict(X32[0]), served[:1])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_two_exports_of_one_model_are_byte_identical(
    kind: str, models: dict[str, Any], rows: pd.DataFrame, windows: np.ndarray, tmp_path: Path
) -> None:
    X_test = _inputs(kind, rows, windows)
    first = export_model(kind, models[kind], X_test, tmp_path / "a", "m", _extra(kind))
    second = export_model(kind, models[kind], X_test, tmp_path / "b", "m", _extra(kind))
    for file in (MODEL_FILE, META_FILE):
        assert (first / file).read_bytes() == (second / file).read_bytes(), file
    meta_text = (first / META_FILE).read_text()
    assert meta_text == json.dumps(json.loads(meta_text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def test_keras_export_ignores_layer_and_tensor_names(windows: np.ndarray) -> None:
    """Refitting the same seeded model gives new auto-generated layer names (sequential_2...) and tf2onnx
    numbers its tensors from a process-wide counter: after renaming the bytes must still match."""
    a = keras_to_onnx(_fit_keras(windows), (None, STEPS, len(CHANNELS)), "seq")
    b = keras_to_onnx(_fit_keras(windows), (None, STEPS, len(CHANNELS)), "seq")
    assert a == b


class _BoosterHolder:
    """A wrapper in the house style: the fitted LightGBM booster in ``booster_``."""

    def __init__(self, booster: Any) -> None:
        self.booster_ = booster

    def predict(self, X: Any) -> Any:
        return self.booster_.predict(X)


def test_lightgbm_booster_and_wrapper_export_alike(models: dict[str, Any], rows: pd.DataFrame, tmp_path: Path) -> None:
    booster = models["lightgbm_regressor"].booster_
    served = []
    for label, model in (("booster", booster), ("wrapper", _BoosterHolder(booster))):
        path = export_model("lightgbm_regressor", model, rows, tmp_path / label, "lgbm", _meta_extra())
        served.append(load_bundle(path, FEATURES).predict(rows.to_numpy()))
    assert (tmp_path / "booster" / MODEL_FILE).read_bytes() == (tmp_path / "wrapper" / MODEL_FILE).read_bytes()
    assert np.max(np.abs(served[0] - booster.predict(rows.to_numpy(dtype=np.float32)))) <= TREE_TOLERANCE


def test_named_booster_is_left_untouched(models: dict[str, Any]) -> None:
    booster = models["xgboost_regressor"]
    xgboost_to_onnx(booster, N_FEATURES, "m")
    assert booster.feature_names == FEATURES


def test_opportunity_models_export(tmp_path: Path) -> None:
    from cryptoml.features.opportunity import ENTRY_FEATURE_NAMES, FEATURE_NAMES, opportunity_features
    from cryptoml.models.opportunity import HoldDurationModel, ProfitRegressor, SuccessClassifier
    from tests.models.conftest import TEST_HOLDS, make_positions

    positions = make_positions(days=3)
    X = opportunity_features(positions)
    fit, valid = slice(0, 1400), slice(1400, None)
    small: dict[str, Any] = {
        "n_estimators": 40,
        "max_depth": 3,
        "learning_rate": 0.2,
        "early_stopping_rounds": 5,
        "n_jobs": 1,
    }
    profit_y = positions["actual_profit_pct"].to_numpy()
    won_y = positions["was_profitable"].to_numpy().astype(float)
    profit = ProfitRegressor(**small).fit(X.iloc[fit], profit_y[fit], eval_set=[(X.iloc[valid], profit_y[valid])])
    success = SuccessClassifier(**small).fit(X.iloc[fit], won_y[fit], eval_set=[(X.iloc[valid], won_y[valid])])
    entries = X[list(ENTRY_FEATURE_NAMES)]
    hold_y = positions["hold_hours"].to_numpy()  # any grid hold works as a label for the export check
    hold = HoldDurationModel(**small, holds=TEST_HOLDS).fit(entries.iloc[fit], hold_y[fit])

    X_test = X.iloc[valid]
    cases = [
        ("xgboost_regressor", profit, X_test, FEATURE_NAMES, profit.predict(X_test)),
        ("xgboost_classifier", success, X_test, FEATURE_NAMES, success.predict_proba(X_test)[:, 1]),
        ("xgboost_multiclass", hold, entries.iloc[valid], ENTRY_FEATURE_NAMES, hold.predict_proba(entries.iloc[valid])),
    ]
    for kind, model, X_kind, names, native in cases:
        bundle = load_bundle(export_model(kind, model, X_kind, tmp_path / kind, kind, _meta_extra()), names)
        assert bundle.feature_names == tuple(names)
        assert np.max(np.abs(bundle.predict(X_kind.to_numpy()) - native)) <= TREE_TOLERANCE
    hold_meta = load_bundle(tmp_path / "xgboost_multiclass").meta
    assert hold_meta["classes"] == list(TEST_HOLDS)
    assert load_bundle(tmp_path / "xgboost_classifier").meta["classes"] == [0, 1]


# --- refusals ------------------------------------------------------------------------------------


@pytest.fixture()
def bundle_dir(models: dict[str, Any], rows: pd.DataFrame, tmp_path: Path) -> Path:
    return export_model("xgboost_regressor", models["xgboost_regressor"], rows, tmp_path / "b", "reg", _meta_extra())


def test_flipped_byte_in_model_is_refused(bundle_dir: Path) -> None:
    data = bytearray((bundle_dir / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_dir / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelContractError, match="corrupt or was replaced"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("key", ["data_hash", "parity", "feature_names", "onnx_sha256"])
def test_missing_meta_key_is_refused(bundle_dir: Path, key: str) -> None:
    meta = json.loads((bundle_dir / META_FILE).read_text())
    del meta[key]
    (bundle_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelContractError, match=rf"missing keys \['{key}'\]"):
        load_bundle(bundle_dir)


def test_feature_list_other_than_expected_is_refused(bundle_dir: Path) -> None:
    load_bundle(bundle_dir, FEATURES)
    with pytest.raises(ModelContractError, match=r"lacks \['feat_z'\] and has extra \['feat_f'\]"):
        load_bundle(bundle_dir, [*FEATURES[:-1], "feat_z"])
    with pytest.raises(ModelContractError, match="another order"):
        load_bundle(bundle_dir, FEATURES[::-1])


def test_meta_width_other_than_model_input_is_refused(bundle_dir: Path) -> None:
    meta = json.loads((bundle_dir / META_FILE).read_text())
    meta["feature_names"] = FEATURES[:-1]
    meta["input_shape"] = [None, N_FEATURES - 1]
    (bundle_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelContractError, match="input axis 1 has size 6, the meta says 5"):
        load_bundle(bundle_dir)


def test_predict_refuses_rows_of_the_wrong_width(bundle_dir: Path) -> None:
    with pytest.raises(ModelContractError, match="does not fit the model's input"):
        load_bundle(bundle_dir).predict(np.zeros((2, N_FEATURES + 1)))


def test_parity_failure_is_reported_with_numbers(models: dict[str, Any], rows: pd.DataFrame) -> None:
    X = rows.to_numpy(dtype=np.float32)
    onnx_bytes = xgboost_to_onnx(models["xgboost_regressor"], N_FEATURES, "reg")
    served = onnx_predict(onnx_bytes, X)
    native = _native("xgboost_regressor", models["xgboost_regressor"], X)
    ok = check_parity(native, served, TREE_TOLERANCE, name="reg")
    assert ok["rows"] == len(X) and ok["max_abs_diff"] <= TREE_TOLERANCE
    with pytest.raises(ModelContractError, match=r"reg: .* by 0\.001 > tolerance 1e-05 over 400 rows"):
        check_parity(native + 1e-3, served, TREE_TOLERANCE, name="reg")
    with pytest.raises(ModelContractError, match="NaN on one side only"):
        check_parity(np.where(np.arange(len(X)) == 3, np.nan, native), served, TREE_TOLERANCE, name="reg")


def test_failed_or_missing_parity_blocks_write_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    onnx_bytes = (bundle_dir / MODEL_FILE).read_bytes()
    meta = json.loads((bundle_dir / META_FILE).read_text())
    failed = {**meta, "parity": {"max_abs_diff": 1e-3, "tolerance": TREE_TOLERANCE, "rows": 400}}
    with pytest.raises(ModelContractError, match="parity check is missing or failed"):
        write_bundle(tmp_path / "failed", onnx_bytes, failed)
    without = {k: v for k, v in meta.items() if k != "parity"}
    with pytest.raises(ModelContractError, match=r"missing keys \['parity'\]"):
        write_bundle(tmp_path / "without", onnx_bytes, without)
    assert not (tmp_path / "failed").exists() and not (tmp_path / "without").exists()


class _DriftingRegressor:
    """A real booster whose wrapper adds 1e-3 to every prediction: its ONNX export cannot match."""

    def __init__(self, booster: Any) -> None:
        self.booster_ = booster

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster_.inplace_predict(X)) + 1e-3


def test_export_model_writes_nothing_when_parity_fails(
    models: dict[str, Any], rows: pd.DataFrame, tmp_path: Path
) -> None:
    drifting = _DriftingRegressor(models["xgboost_regressor"])
    with pytest.raises(ModelContractError, match=r"drift \(xgboost_regressor\): ONNX predictions differ"):
        export_model("xgboost_regressor", drifting, rows, tmp_path / "drift", "drift", _meta_extra())
    assert not (tmp_path / "drift").exists()


def test_export_model_refuses_incomplete_meta_and_mismatched_columns(
    models: dict[str, Any], rows: pd.DataFrame, tmp_path: Path
) -> None:
    booster = models["xgboost_regressor"]
    with pytest.raises(ModelContractError, match=r"lacks \['data_hash'\]"):
        extra = {k: v for k, v in _meta_extra().items() if k != "data_hash"}
        export_model("xgboost_regressor", booster, rows, tmp_path / "x", "x", extra)
    with pytest.raises(ModelContractError, match="feature names from X_test columns differ"):
        export_model("xgboost_regressor", booster, rows[FEATURES[::-1]], tmp_path / "x", "x", _meta_extra())
    with pytest.raises(ModelContractError, match="does not fit an XGBoost model with objective reg:squarederror"):
        export_model("xgboost_classifier", booster, rows, tmp_path / "x", "x", _meta_extra())
    with pytest.raises(ModelContractError, match="needs meta_extra\\['feature_names'\\]"):
        export_model("keras_sequence", object(), np.zeros((2, 3, 4)), tmp_path / "x", "x", _meta_extra())
    assert not (tmp_path / "x").exists()


def test_bundle_module_imports_without_pandas_or_tensorflow() -> None:
    code = (
        "import sys\n"
        "import cryptoml.export.bundle, cryptoml.export.parity\n"
        "heavy = [m for m in ('pandas', 'tensorflow', 'keras', 'tf2onnx', 'onnxmltools', 'xgboost', 'lightgbm',"
        " 'mlflow', 'prefect') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_opset_import_order_does_not_change_the_exported_bytes() -> None:
    """The converters list opset domains in no fixed order (seen: a re-export of the same LightGBM booster in
    another process came out with ai.onnx.ml and the default domain swapped); the export sorts them."""
    import onnx

    from cryptoml.export.convert import _finish

    def model(domains: list[tuple[str, int]]) -> onnx.ModelProto:
        node = onnx.helper.make_node("Identity", ["input"], ["y"])
        graph = onnx.helper.make_graph(
            [node], "g", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, 2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 2])],
        )  # fmt: skip
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in domains])

    forward = _finish(model([("", 15), ("ai.onnx.ml", 1)]), "m")
    backward = _finish(model([("ai.onnx.ml", 1), ("", 15)]), "m")
    assert forward == backward
