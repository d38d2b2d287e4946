"""Convert fitted models to ONNX bytes, byte-stable, and export them as parity-checked bundles.

Converters (recipes verified in ``../shared/STACK.md``): XGBoost and LightGBM through onnxmltools at
opset 15 (its cap), Keras 3 through ``tf.function`` + ``tf2onnx.convert.from_function`` at opset 17
(native ONNX LSTM ops). Every graph's internal node and tensor names are then rewritten in graph order
(inputs and outputs kept), because tf2onnx numbers them from a process-wide counter: the same fitted
model must give the same bytes in any process, or ``dvc repro`` would never be a no-op.

The heavy libraries (tensorflow, tf2onnx, onnxmltools) are imported inside the function that needs
them. Every graph has one float32 input named ``input``.

:func:`export_model` converts, scores the native model and the ONNX graph on the same float32-cast
test rows, refuses the export when they differ by more than the kind's tolerance, and writes the
bundle (see :mod:`cryptoml.export.bundle` for its meta).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cryptoml.errors import ModelContractError
from cryptoml.export.bundle import KINDS, Bundle, open_session, write_bundle
from cryptoml.export.parity import NETWORK_TOLERANCE, TREE_TOLERANCE, check_parity

INPUT_NAME = "input"
TREE_OPSET = 15  # onnxmltools' highest supported opset
NETWORK_OPSET = 17
KERAS_OUTPUT = "y"
PARITY_SAMPLE_ROWS = 4

# Per kind: ONNX output holding the prediction, how to read it, parity tolerance.
_PREDICTION = {
    "xgboost_regressor": ("variable", "value", TREE_TOLERANCE),
    "xgboost_classifier": ("probabilities", "probability_class_1", TREE_TOLERANCE),
    "xgboost_multiclass": ("probabilities", "class_probabilities", TREE_TOLERANCE),
    "lightgbm_regressor": ("variable", "value", TREE_TOLERANCE),
    "keras_sequence": (KERAS_OUTPUT, "value", NETWORK_TOLERANCE),
}
# Meta keys export_model computes; meta_extra may not set them.
_COMPUTED_KEYS = (
    "name",
    "kind",
    "input_name",
    "input_shape",
    "outputs",
    "prediction",
    "opset",
    "opset_imports",
    "library_versions",
    "parity",
    "onnx_sha256",
)
_REQUIRED_EXTRA = ("label", "training_window", "data_hash", "metrics")


def canonicalize_names(model: onnx.ModelProto, graph_name: str) -> onnx.ModelProto:
    """Rename internal nodes (``<OpType>_<i>``), tensors (``t_<i>``), initializers (``const_<i>``) and
    subgraphs (``graph_<i>``) in order of first use, sort initializers that way, drop value_info and doc
    strings; the main graph's inputs and outputs keep their names, symbolic sizes become ``batch`` (axis
    0) or ``dim_<i>``. The model computes exactly the same; only names and order change."""
    graph = model.graph
    mapping: dict[str, str] = {"": ""}
    for value in (*graph.input, *graph.output):
        mapping[value.name] = value.name
    counters = {"node": 0, "tensor": 0, "const": 0, "graph": 0}
    graphs: list[onnx.GraphProto] = []

    def fresh(kind: str) -> str:
        counters[kind] += 1
        return f"{'t' if kind == 'tensor' else kind}_{counters[kind] - 1}"

    def rename(g: onnx.GraphProto, top: bool) -> None:
        graphs.append(g)
        consts = {init.name for init in g.initializer}
        if not top:  # a subgraph (Loop / If / Scan body): tf2onnx numbers its name; its inputs are new tensors
            g.name = fresh("graph")
            for value in g.input:
                mapping.setdefault(value.name, fresh("tensor"))
                value.name = mapping[value.name]
        for node in g.node:
            for i, name in enumerate(node.input):
                if name not in mapping:
                    mapping[name] = fresh("const" if name in consts else "tensor")
                node.input[i] = mapping[name]
            for attr in node.attribute:
                for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                    rename(sub, top=False)
            for i, name in enumerate(node.output):
                if name not in mapping:
                    mapping[name] = fresh("tensor")
                node.output[i] = mapping[name]
            node.name = f"{node.op_type}_{counters['node']}"
            counters["node"] += 1
            node.doc_string = ""
        if not top:
            for value in g.output:
                value.name = mapping[value.name]
        for init in g.initializer:
            if init.name not in mapping:  # unused: keep it, named after the used ones
                mapping[init.name] = fresh("const")
            init.name = mapping[init.name]
        ordered = sorted(
            g.initializer, key=lambda t: int(t.name.rsplit("_", 1)[1]) if t.name.startswith("const_") else -1
        )
        inits = [onnx.TensorProto.FromString(t.SerializeToString()) for t in ordered]
        del g.initializer[:]
        g.initializer.extend(inits)
        del g.value_info[:]
        g.doc_string = ""

    rename(graph, top=True)
    # Symbolic sizes too ("unk__93": another tf2onnx counter): the batch axis is "batch", others in order.
    symbols: dict[str, str] = {}
    for value in (v for g in graphs for v in (*g.input, *g.output)):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param"):
                default = "batch" if axis == 0 else f"dim_{len(symbols)}"
                dim.dim_param = symbols.setdefault(dim.dim_param, default)
    graph.name = graph_name
    model.doc_string = ""
    return model


def _finish(model: onnx.ModelProto, name: str) -> bytes:
    canonicalize_names(model, name)
    # onnxmltools collects opset domains in a set: their order follows the process's string hash seed,
    # so two exports of the same model would differ by the order of opset_import. Sort it by domain.
    opsets = sorted(((o.domain, o.version) for o in model.opset_import), key=lambda dv: dv[0])
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.add(domain=domain, version=version)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ModelContractError(f"{name}: the converted ONNX graph is invalid: {e}") from e
    return bytes(model.SerializeToString())


def _xgb_booster(model: Any) -> Any:
    """The Booster behind an xgboost Booster, a cryptoml wrapper (``booster_``) or an sklearn wrapper."""
    import xgboost as xgb

    if isinstance(model, xgb.Booster):
        return model
    if isinstance(getattr(model, "booster_", None), xgb.Booster):
        return model.booster_
    if hasattr(model, "get_booster"):
        booster = model.get_booster()
        best = getattr(model, "best_iteration", None)
        # The sklearn wrapper predicts with the best iteration only; the export must hold the same trees.
        return booster[: best + 1] if best is not None and best + 1 < booster.num_boosted_rounds() else booster
    raise ModelContractError(f"xgboost_to_onnx: {type(model).__name__} is neither an xgboost Booster nor a wrapper")


_XGB_OBJECTIVE_PREFIX = {"xgboost_regressor": "reg:", "xgboost_classifier": "binary:", "xgboost_multiclass": "multi:"}


def _check_xgb_objective(kind: str, model: Any, name: str) -> None:
    """A booster's objective must match ``kind``: else the outputs would be read the wrong way."""
    import json

    objective = str(json.loads(_xgb_booster(model).save_config())["learner"]["objective"]["name"])
    if not objective.startswith(_XGB_OBJECTIVE_PREFIX[kind]):
        raise ModelContractError(
            f"export_model {name}: kind {kind} does not fit an XGBoost model with objective {objective}"
        )


def xgboost_to_onnx(booster_or_wrapper: Any, n_features: int, name: str) -> bytes:
    """ONNX bytes (opset 15) of an XGBoost regressor, binary or multi-class classifier.

    Classifiers get outputs ``label`` and ``probabilities`` (no ZipMap); a regressor ``variable`` of
    shape (n, 1). onnxmltools refuses feature names other than ``f0, f1...``, so a copy of the booster
    with its names cleared is converted (the caller's model is left untouched); the ordered names go
    into the bundle meta instead.
    """
    import onnxmltools

    booster = _xgb_booster(booster_or_wrapper)
    if booster.num_features() != n_features:
        raise ModelContractError(f"{name}: the booster has {booster.num_features()} features, not {n_features}")
    unnamed = booster.copy()
    unnamed.feature_names = None
    return _convert_trees(onnxmltools.convert_xgboost, unnamed, n_features, name, "XGBoost")


def _convert_trees(convert: Any, model: Any, n_features: int, name: str, library: str) -> bytes:
    """Run an onnxmltools tree converter with the bundle's input name and opset; errors -> ModelContractError."""
    from onnxmltools.convert.common.data_types import FloatTensorType

    try:
        proto = convert(
            model,
            name=name,
            initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
            target_opset=TREE_OPSET,
        )
    except (RuntimeError, ValueError, NotImplementedError, KeyError) as e:
        raise ModelContractError(f"{name}: onnxmltools cannot convert this {library} model: {e}") from e
    return _finish(proto, name)


def lightgbm_to_onnx(model: Any, n_features: int, name: str) -> bytes:
    """ONNX bytes (opset 15) of a LightGBM regressor: a ``lightgbm.Booster`` or any model holding one in
    ``booster_`` (``LGBMRegressor``, cryptoml's wrappers); output ``variable`` of shape (n, 1)."""
    import onnxmltools

    booster = getattr(model, "booster_", model)
    if booster.num_feature() != n_features:
        raise ModelContractError(f"{name}: the LightGBM model has {booster.num_feature()} features, not {n_features}")
    return _convert_trees(onnxmltools.convert_lightgbm, booster, n_features, name, "LightGBM")


def keras_to_onnx(model: Any, input_shape: tuple[int | None, ...], name: str) -> bytes:
    """ONNX bytes (opset 17) of a single-output Keras 3 model; input ``input`` of ``input_shape`` (batch
    axis None), output ``y`` = ``model(x, training=False)``.

    ``tf2onnx.convert.from_keras`` fails on Keras 3 (``KeyError: 'keras_tensor_…'``), hence the
    ``tf.function`` route.
    """
    import tensorflow as tf
    import tf2onnx

    if len(input_shape) < 2 or input_shape[0] is not None:
        raise ModelContractError(f"{name}: input_shape must start with a None batch axis, got {input_shape}")
    spec = (tf.TensorSpec(input_shape, tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(x: Any) -> dict[str, Any]:
        return {KERAS_OUTPUT: model(x, training=False)}

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=NETWORK_OPSET)
    except (TypeError, ValueError, KeyError, NotImplementedError) as e:
        raise ModelContractError(f"{name}: tf2onnx cannot convert this Keras model: {e}") from e
    return _finish(proto, name)


# --- export with the parity gate ----------------------------------------------------------------


def _model_feature_names(kind: str, model: Any) -> list[str] | None:
    """Ordered input names a fitted tree model carries, or None when it has only positional ones."""
    if kind.startswith("xgboost"):
        names = getattr(model, "feature_names_", None) or _xgb_booster(model).feature_names
    elif kind == "lightgbm_regressor":
        names = getattr(model, "booster_", model).feature_name()
    else:
        return None
    if not names or all(n in (f"f{i}", f"Column_{i}") for i, n in enumerate(names)):
        return None
    return [str(n) for n in names]


def _native_predict(kind: str, model: Any, X: np.ndarray) -> np.ndarray:
    """The native model's prediction of float32 rows ``X``, in the shape :meth:`Bundle.predict` gives."""
    if kind == "keras_sequence":
        out = np.asarray(model(X, training=False), dtype=np.float64).reshape(len(X), -1)
        return out[:, 0] if out.shape[1] == 1 else out
    if kind == "lightgbm_regressor":  # the Booster: LGBMRegressor.predict warns on unnamed float32 rows
        return np.asarray(getattr(model, "booster_", model).predict(X), dtype=np.float64)
    booster = _is_booster(model)
    if kind == "xgboost_regressor":
        return np.asarray(model.inplace_predict(X) if booster else model.predict(X), dtype=np.float64)
    if booster:
        proba = np.asarray(model.inplace_predict(X), dtype=np.float64)
        if kind == "xgboost_classifier":  # binary:logistic gives P(class 1) only
            proba = np.column_stack([1.0 - proba, proba])
    else:
        proba = np.asarray(model.predict_proba(X), dtype=np.float64)
    return proba[:, 1] if kind == "xgboost_classifier" else proba


def _is_booster(model: Any) -> bool:
    import xgboost as xgb

    return isinstance(model, xgb.Booster)


def _classes(kind: str, model: Any, meta_extra: Mapping[str, Any], n_classes: int) -> list[Any] | None:
    if kind in ("xgboost_regressor", "lightgbm_regressor", "keras_sequence"):
        return None
    classes = meta_extra.get("classes", getattr(model, "classes_", None))
    classes = list(np.asarray(classes).tolist()) if classes is not None else list(range(n_classes))
    if len(classes) != n_classes:
        raise ModelContractError(f"{len(classes)} classes given for a model with {n_classes} probability columns")
    return classes


def library_versions(kind: str) -> dict[str, str]:
    """Versions of the libraries that made and run the ONNX graph of ``kind``."""
    modules = ["onnx", "onnxruntime"]
    if kind.startswith("xgboost"):
        modules += ["onnxmltools", "xgboost"]
    elif kind == "lightgbm_regressor":
        modules += ["onnxmltools", "lightgbm"]
    else:
        modules += ["tf2onnx", "tensorflow", "keras"]
    return {m: str(importlib.import_module(m).__version__) for m in modules}


def export_model(
    kind: str,
    model: Any,
    X_test: Any,
    out_dir: Path,
    name: str,
    meta_extra: Mapping[str, Any],
) -> Path:
    """Convert ``model``, check parity on ``X_test`` and write the bundle folder ``out_dir``; returns it.

    ``kind``: one of :data:`~cryptoml.export.bundle.KINDS`. ``model``: an xgboost Booster / cryptoml or
    sklearn wrapper (the opportunity models), a LightGBM Booster / LGBMRegressor, or a Keras model.
    ``X_test``: rows of shape (n, n_features) (a DataFrame's columns must equal the feature names) or
    windows (n, steps, channels) for ``keras_sequence``; cast to float32 for both sides of the check.
    ``meta_extra``: ``label``, ``training_window`` ``{"start_ms", "end_ms"}``, ``data_hash``, ``metrics``
    (required); ``feature_names`` (required for Keras: the channels; else taken from the model or the
    DataFrame), ``scaler``, ``classes``, ``git_commit`` (default: :func:`cryptoml.lineage.git_commit`)
    and any further keys are stored as given. Raises ModelContractError, writing nothing, when parity fails.
    """
    if kind not in KINDS:
        raise ModelContractError(f"export_model: unknown kind {kind!r} (expected one of {list(KINDS)})")
    clash = [k for k in _COMPUTED_KEYS if k in meta_extra]
    missing = [k for k in _REQUIRED_EXTRA if k not in meta_extra]
    if clash or missing:
        raise ModelContractError(
            f"export_model {name}: meta_extra lacks {missing} / sets computed keys {clash} "
            f"(required: {list(_REQUIRED_EXTRA)})"
        )
    X = np.ascontiguousarray(np.asarray(X_test, dtype=np.float32))
    rank = 3 if kind == "keras_sequence" else 2
    if X.ndim != rank or len(X) == 0:
        raise ModelContractError(f"export_model {name}: X_test must be a non-empty {rank}-D array, got shape {X.shape}")
    names = _feature_names(kind, model, X_test, meta_extra, X.shape[-1], name)

    output, pred_type, tolerance = _PREDICTION[kind]
    if kind.startswith("xgboost"):
        _check_xgb_objective(kind, model, name)
    if kind == "keras_sequence":
        onnx_bytes = keras_to_onnx(model, (None, *X.shape[1:]), name)
    elif kind == "lightgbm_regressor":
        onnx_bytes = lightgbm_to_onnx(model, X.shape[1], name)
    else:
        onnx_bytes = xgboost_to_onnx(model, X.shape[1], name)
    proto = onnx.load_from_string(onnx_bytes)
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}

    native = _native_predict(kind, model, X)
    n_classes = native.shape[1] if native.ndim == 2 and kind == "xgboost_multiclass" else 2
    if "git_commit" not in meta_extra:
        from cryptoml.lineage import git_commit

        meta_extra = {**meta_extra, "git_commit": git_commit()}
    meta: dict[str, Any] = {
        "scaler": None,
        **meta_extra,
        "name": name,
        "kind": kind,
        "feature_names": names,
        "input_name": INPUT_NAME,
        "input_shape": [None, *X.shape[1:]],
        "outputs": [o.name for o in proto.graph.output],
        "prediction": {
            "output": output,
            "type": pred_type,
            "column": 1 if pred_type == "probability_class_1" else None,
        },
        "classes": _classes(kind, model, meta_extra, n_classes),
        # The opset asked of the converter; the graph may declare a lower one (converters pick the lowest
        # that has their ops; a bare tree ensemble imports only ai.onnx.ml): see opset_imports.
        "opset": NETWORK_OPSET if kind == "keras_sequence" else TREE_OPSET,
        "opset_imports": dict(sorted(opsets.items())),
        "library_versions": library_versions(kind),
    }
    where = f"export {name}"
    # Score through Bundle.predict: the gate then covers the exact path the edge runner serves.
    served = Bundle(path=Path(out_dir), meta=meta, session=open_session(onnx_bytes, where)).predict(X)
    meta["parity"] = check_parity(native, served, tolerance, name=f"{name} ({kind})")
    # A few inputs with the native model's outputs: a consumer that swaps models in (the edge runner)
    # replays them through its own onnxruntime before trusting the bundle.
    k = min(PARITY_SAMPLE_ROWS, len(X))
    meta["parity_sample"] = {"inputs": X[:k].astype(np.float64).tolist(), "expected": native[:k].tolist()}
    return write_bundle(Path(out_dir), onnx_bytes, meta)


def _feature_names(
    kind: str, model: Any, X_test: Any, meta_extra: Mapping[str, Any], width: int, name: str
) -> list[str]:
    """The ordered input names, checked against every source that states them."""
    sources: dict[str, list[str]] = {}
    if meta_extra.get("feature_names") is not None:
        sources["meta_extra"] = [str(n) for n in meta_extra["feature_names"]]
    from_model = _model_feature_names(kind, model)
    if from_model is not None:
        sources["model"] = from_model
    columns = getattr(X_test, "columns", None)
    if columns is not None and kind != "keras_sequence":
        sources["X_test columns"] = [str(c) for c in columns]
    if not sources:
        if kind == "keras_sequence":
            raise ModelContractError(f"export_model {name}: a Keras model needs meta_extra['feature_names']")
        sources["positions"] = [f"f{i}" for i in range(width)]
    (first_source, names), *others = sources.items()
    for source, other in others:
        if other != names:
            raise ModelContractError(
                f"export_model {name}: feature names from {source} differ from those of {first_source} "
                f"({other[:3]}... vs {names[:3]}...)"
            )
    if len(names) != width:
        raise ModelContractError(f"export_model {name}: {len(names)} feature names for an input of width {width}")
    return names
