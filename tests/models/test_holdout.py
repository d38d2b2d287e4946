"""Holdout files (byte-stable, refused when broken), holdout metrics vs sklearn / scipy, and bundle scoring.

Bundles here are tiny hand-built ONNX graphs (a linear layer, a softmax, a mean over time steps), so the
file needs neither a tree library nor a Keras fit; only the MinMaxScaling check imports keras.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

from cryptoml.errors import DataValidationError, ModelContractError
from cryptoml.export.bundle import Bundle, load_bundle, write_bundle
from cryptoml.models.holdout import (
    HOLDOUT_METRICS,
    Holdout,
    applicable_metrics,
    average_ranks,
    holdout_bytes,
    load_holdout,
    metric_value,
    predict_label,
    save_holdout,
    score_bundle,
)

ROOT = Path(__file__).resolve().parents[2]
T0_MS = 1_704_067_200_000


# --- tiny bundles ------------------------------------------------------------------------------------


def _graph_bytes(kind: str, weights: np.ndarray, steps: int | None = None) -> bytes:
    """ONNX bytes: rows (n, f) @ W -> "variable" (value) or softmax -> "probabilities"; or windows
    (n, steps, c) -> mean over steps @ W -> "y" (a stand-in for the Keras sequence model)."""
    W = numpy_helper.from_array(weights.astype(np.float32), "W")
    n_in, n_out = weights.shape
    nodes: list[onnx.NodeProto] = []
    if kind == "keras_sequence":
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, steps, n_in])
        nodes.append(helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=0))
        nodes.append(helper.make_node("MatMul", ["m", "W"], ["y"]))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n_out])
    else:
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_in])
        if kind.endswith("regressor"):
            nodes.append(helper.make_node("MatMul", ["input", "W"], ["variable"]))
            out = helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, n_out])
        else:
            nodes.append(helper.make_node("MatMul", ["input", "W"], ["z"]))
            nodes.append(helper.make_node("Softmax", ["z"], ["probabilities"], axis=-1))
            out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_out])
    graph = helper.make_graph(nodes, "g", [x], [out], initializer=[W])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def make_bundle(
    path: Path,
    kind: str,
    names: list[str],
    weights: np.ndarray,
    *,
    steps: int | None = None,
    classes: list[Any] | None = None,
    scaler: dict[str, Any] | None = None,
) -> Bundle:
    output, pred_type, column = {
        "xgboost_regressor": ("variable", "value", None),
        "keras_sequence": ("y", "value", None),
        "xgboost_classifier": ("probabilities", "probability_class_1", 1),
        "xgboost_multiclass": ("probabilities", "class_probabilities", None),
    }[kind]
    meta = {
        "name": path.name,
        "kind": kind,
        "feature_names": names,
        "input_name": "input",
        "input_shape": [None, steps, len(names)] if steps else [None, len(names)],
        "outputs": [output],
        "prediction": {"output": output, "type": pred_type, "column": column},
        "classes": classes,
        "label": {"label": "y"},
        "scaler": scaler,
        "training_window": {"start_ms": T0_MS, "end_ms": T0_MS + 1},
        "data_hash": {"md5": "0" * 32},
        "git_commit": "0" * 12,
        "metrics": {},
        "opset": 17,
        "library_versions": {},
        "parity": {"max_abs_diff": 0.0, "tolerance": 1e-5, "rows": 1},
    }
    return load_bundle(write_bundle(path, _graph_bytes(kind, weights, steps), meta))


def make_holdout(n: int = 50, names: tuple[str, ...] = ("a", "b", "c"), seed: int = 0, **kw: Any) -> Holdout:
    rng = np.random.default_rng(seed)
    return Holdout(
        X=rng.normal(size=(n, len(names))),
        y=rng.normal(size=n),
        ts_ms=T0_MS + 60_000 * np.arange(n),
        feature_names=names,
        metric=kw.pop("metric", "rmse"),
        label=kw.pop("label", "actual_profit_pct"),
        **kw,
    )


# --- the file ----------------------------------------------------------------------------------------


def test_save_is_byte_stable_and_round_trips(tmp_path: Path) -> None:
    h = make_holdout()
    a, b = save_holdout(tmp_path / "a" / "holdout.npz", h), save_holdout(tmp_path / "b.npz", make_holdout())
    assert a.read_bytes() == b.read_bytes() == holdout_bytes(h)
    back = load_holdout(a)
    assert back.X.dtype == np.float32 and back.y.dtype == np.float64 and back.ts_ms.dtype == np.int64
    assert np.array_equal(back.X, h.X) and np.array_equal(back.y, h.y) and np.array_equal(back.ts_ms, h.ts_ms)
    assert (back.feature_names, back.metric, back.label) == (h.feature_names, h.metric, h.label)
    with np.load(a) as npz:  # plain numpy reads the arrays too
        assert np.array_equal(npz["X"], h.X)
    assert save_holdout(tmp_path / "c.npz", make_holdout(seed=1)).read_bytes() != a.read_bytes()


def test_windows_round_trip(tmp_path: Path) -> None:
    X = np.random.default_rng(2).normal(size=(7, 4, 2))
    h = Holdout(X=X, y=np.arange(7.0), ts_ms=np.arange(7), feature_names=("close", "volume"), metric="mse", label="r")
    back = load_holdout(save_holdout(tmp_path / "w.npz", h))
    assert back.X.shape == (7, 4, 2) and np.array_equal(back.X, X.astype(np.float32))


def _rewrite(src: Path, dst: Path, drop: str | None = None, replace: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name != drop:
                zout.writestr(name, (replace or {}).get(name, zin.read(name)))
    return dst


def _meta_with(**changes: Any) -> dict[str, bytes]:
    meta = {"format_version": 1, "feature_names": ["a", "b", "c"], "metric": "rmse", "label": "x", **changes}
    return {"holdout.json": json.dumps(meta).encode()}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("drop", "replace", "match"),
    [
        ("y.npy", None, r"missing members \['y.npy'\]"),
        ("holdout.json", None, "missing members"),
        (None, {"holdout.json": b"{not json"}, "not valid JSON"),
        (None, _meta_with(format_version=9), "format_version 9"),
        (None, _meta_with(metric="sharpe"), "unknown metric 'sharpe'"),
        (None, _meta_with(feature_names=["a", "b"]), "2 feature_names"),
        (None, {"y.npy": _npy(np.array([np.nan] * 50))}, "50 non-finite"),
        (None, {"y.npy": _npy(np.arange(3.0))}, "50 rows but y has shape"),
        (None, {"ts_ms.npy": _npy(np.array([{}] * 50, dtype=object))}, "malformed"),
        (None, {"X.npy": b"garbage"}, "malformed"),
    ],
)
def test_broken_files_are_refused_naming_the_file(
    tmp_path: Path, drop: str | None, replace: dict[str, bytes] | None, match: str
) -> None:
    good = save_holdout(tmp_path / "good.npz", make_holdout())
    bad = _rewrite(good, tmp_path / "bad.npz", drop, replace)
    with pytest.raises(DataValidationError, match=match) as err:
        load_holdout(bad)
    assert str(bad) in str(err.value)


def test_missing_and_non_zip_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="not found"):
        load_holdout(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataValidationError, match="not a readable holdout zip"):
        load_holdout(tmp_path / "text.npz")


def test_bad_holdouts_are_refused_on_construction() -> None:
    with pytest.raises(DataValidationError, match="integer epoch milliseconds"):
        Holdout(X=np.zeros((3, 1)), y=np.zeros(3), ts_ms=np.zeros(3), feature_names=("a",), metric="mae", label="x")
    with pytest.raises(DataValidationError, match="no rows"):
        Holdout(
            X=np.zeros((0, 1)),
            y=np.zeros(0),
            ts_ms=np.zeros(0, np.int64),
            feature_names=("a",),
            metric="mae",
            label="x",
        )
    with pytest.raises(DataValidationError, match="distinct"):
        make_holdout(names=("a", "a", "b"))


# --- metrics ------------------------------------------------------------------------------------------


def test_metrics_match_sklearn_and_scipy() -> None:
    rng = np.random.default_rng(11)
    y, p = rng.normal(size=400), rng.normal(size=400)
    assert metric_value("mse", y, p) == pytest.approx(mean_squared_error(y, p), rel=1e-12)
    assert metric_value("rmse", y, p) == pytest.approx(np.sqrt(mean_squared_error(y, p)), rel=1e-12)
    assert metric_value("mae", y, p) == pytest.approx(mean_absolute_error(y, p), rel=1e-12)
    assert metric_value("mae_hours", y, p) == metric_value("mae", y, p)
    # Ties on both sides: rounding makes many equal values.
    yr, pr = np.round(y, 1), np.round(p + 0.5 * y, 1)
    assert metric_value("ic", yr, pr) == pytest.approx(spearmanr(yr, pr).statistic, rel=1e-12)
    won, score = (y > 0).astype(float), np.round(1 / (1 + np.exp(-(y + p))), 1)
    assert metric_value("auc", won, score) == pytest.approx(roc_auc_score(won, score), rel=1e-12)
    moved = y != 0
    expected_da = np.mean(np.sign(p[moved]) == np.sign(y[moved]))
    assert metric_value("directional_accuracy", y, p) == pytest.approx(expected_da)
    assert {name for name, (_, higher) in HOLDOUT_METRICS.items() if higher} == {"auc", "ic", "directional_accuracy"}


def test_metrics_agree_with_the_training_code() -> None:
    from cryptoml.models.price_lgbm import directional_accuracy, information_coefficient

    rng = np.random.default_rng(5)
    y, p = np.round(rng.normal(size=300), 1), np.round(rng.normal(size=300), 1)
    y[:20] = 0.0
    assert metric_value("ic", y, p) == pytest.approx(information_coefficient(y, p), rel=1e-12)
    assert metric_value("directional_accuracy", y, p) == pytest.approx(directional_accuracy(y, p))


def test_undefined_metrics_are_nan_and_ranks_average_ties() -> None:
    assert np.isnan(metric_value("auc", np.ones(5), np.arange(5.0)))
    assert np.isnan(metric_value("ic", np.arange(5.0), np.ones(5)))
    assert np.isnan(metric_value("directional_accuracy", np.zeros(5), np.arange(5.0)))
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    with pytest.raises(ModelContractError, match="unknown holdout metric"):
        metric_value("sharpe", [1.0], [1.0])
    assert applicable_metrics("probability_class_1", "auc") == ("auc", "mse")
    assert applicable_metrics("value", "ic")[0] == "ic"


# --- bundles -----------------------------------------------------------------------------------------


def test_score_bundle_picks_columns_by_name(tmp_path: Path) -> None:
    w = np.array([[1.0], [-2.0], [0.5]])
    bundle = make_bundle(tmp_path / "reg", "xgboost_regressor", ["a", "b", "c"], w)
    # The holdout holds the model's features in another order, plus one it does not use.
    h = make_holdout(names=("c", "extra", "a", "b"))
    expected_pred = h.X[:, [2, 3, 0]].astype(np.float64) @ w[:, 0]
    assert np.allclose(predict_label(bundle, h.columns(bundle.feature_names)), expected_pred, atol=1e-5)
    rmse = float(np.sqrt(np.mean((h.y - expected_pred) ** 2)))
    assert score_bundle(bundle, h) == pytest.approx(rmse, rel=1e-5)
    assert score_bundle(bundle, h, "mae") == pytest.approx(np.mean(np.abs(h.y - expected_pred)), rel=1e-5)
    with pytest.raises(ModelContractError, match=r"lacks features \['b'\]"):
        score_bundle(bundle, make_holdout(names=("a", "c")))


def test_classifiers_predict_in_label_units(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 2)).astype(np.float32)
    w2 = np.array([[1.0, -1.0], [0.0, 2.0]])
    binary = make_bundle(tmp_path / "bin", "xgboost_classifier", ["a", "b"], w2, classes=[0, 1])
    z = X.astype(np.float64) @ w2
    proba1 = np.exp(z[:, 1]) / np.exp(z).sum(axis=1)
    assert np.allclose(predict_label(binary, X), proba1, atol=1e-6)
    w3 = rng.normal(size=(2, 3))
    holds = make_bundle(tmp_path / "hold", "xgboost_multiclass", ["a", "b"], w3, classes=[1.0, 8.0, 24.0])
    expected_hours = np.array([1.0, 8.0, 24.0])[np.argmax(X.astype(np.float64) @ w3, axis=1)]
    assert np.array_equal(predict_label(holds, X), expected_hours)
    h = Holdout(X=X, y=expected_hours, ts_ms=np.arange(40), feature_names=("a", "b"), metric="mae_hours", label="h")
    assert score_bundle(holds, h) == 0.0


def test_multiclass_picks_the_likeliest_candidate_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 2)).astype(np.float32)
    w3 = rng.normal(size=(2, 3))
    holds = make_bundle(tmp_path / "hold", "xgboost_multiclass", ["a", "b"], w3, classes=[1.0, 8.0, 24.0])
    candidates = np.ones((60, 3), dtype=bool)
    candidates[:30, 2] = False  # entries near the data's end: the 24 h hold was not simulated
    z = X.astype(np.float64) @ w3
    z[~candidates] = -np.inf
    expected = np.array([1.0, 8.0, 24.0])[np.argmax(z, axis=1)]
    assert np.array_equal(predict_label(holds, X, candidates), expected)
    assert (predict_label(holds, X, candidates)[:30] != 24.0).all()
    h = Holdout(X=X, y=expected, ts_ms=np.arange(60), feature_names=("a", "b"), metric="mae_hours", label="h",
                candidates=candidates)  # fmt: skip
    assert score_bundle(holds, h) == 0.0
    path = save_holdout(tmp_path / "h.npz", h)
    loaded = load_holdout(path)
    assert loaded.candidates is not None and np.array_equal(loaded.candidates, candidates)
    assert save_holdout(tmp_path / "again.npz", loaded).read_bytes() == path.read_bytes()
    with pytest.raises(DataValidationError, match="candidates"):
        Holdout(X=X, y=expected, ts_ms=np.arange(60), feature_names=("a", "b"), metric="mae_hours", label="h",
                candidates=np.zeros((60, 3), dtype=bool))  # fmt: skip


def test_predict_raw_applies_the_stored_minmax_scaling(tmp_path: Path) -> None:
    from cryptoml.models.price_keras import MinMaxScaling

    channels = ["open", "close", "volume"]
    scaling = MinMaxScaling(
        feature_names=tuple(channels),
        feature_min=(100.0, 90.0, 5.0),
        feature_max=(200.0, 210.0, 5.0),  # volume constant in the fit window: span taken as 1
        target_mean=0.001,
        target_std=0.02,
        fit_first_ts_ms=T0_MS,
        fit_last_ts_ms=T0_MS + 60_000,
    )
    w = np.array([[0.3], [-0.7], [0.2]])
    bundle = make_bundle(tmp_path / "seq", "keras_sequence", channels, w, steps=4, scaler=scaling.to_dict())
    raw = np.random.default_rng(4).uniform(80, 220, size=(6, 4, 3))
    expected = scaling.target_from_scaled(bundle.predict(scaling.transform(raw)))
    assert np.allclose(bundle.predict_raw(raw), expected, atol=1e-7)
    assert np.allclose(predict_label(bundle, raw), expected, atol=1e-7)
    by_hand = (((raw - [100.0, 90.0, 5.0]) / [100.0, 120.0, 1.0]).mean(axis=1) @ w[:, 0]) * 0.02 + 0.001
    assert np.allclose(bundle.predict_raw(raw), by_hand, atol=1e-6)
    # Without a scaler predict_raw is predict.
    plain = make_bundle(tmp_path / "plain", "keras_sequence", channels, w, steps=4)
    assert np.array_equal(plain.predict_raw(raw), plain.predict(raw))


def test_predict_raw_refuses_an_unusable_scaler(tmp_path: Path) -> None:
    w = np.ones((2, 1))
    for scaler, match in (
        ({"kind": "zscore"}, "unknown kind 'zscore'"),
        ({"kind": "minmax", "feature_min": [0.0], "feature_max": [1.0]}, "1 minima"),
        ({"kind": "minmax", "feature_min": [0, 0], "feature_max": [1, 1], "feature_names": ["b", "a"]}, "order"),
    ):
        bundle = make_bundle(tmp_path / scaler["kind"], "keras_sequence", ["a", "b"], w, steps=2, scaler=scaler)
        with pytest.raises(ModelContractError, match=match):
            bundle.predict_raw(np.zeros((1, 2, 2)))


def test_holdout_module_stays_light() -> None:
    code = (
        "import sys, cryptoml.models.holdout\n"
        "print([m for m in ('pandas', 'onnxruntime', 'sklearn', 'mlflow', 'tensorflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
