"""Write, read and verify a model bundle: a folder with ``model.onnx`` and ``model_meta.json``.

The edge runner loads its models through this module, so it imports only numpy, onnxruntime, json and
the standard library (plus the project's own light helpers): never pandas, tensorflow or a converter.

``model_meta.json`` is written with sorted keys and no timestamps, so the same model and the same
lineage give the same bytes (``dvc repro`` stays a no-op). Keys (all required unless noted):

- ``name``, ``kind`` (one of :data:`KINDS`), ``feature_names`` (ordered model inputs; for a sequence
  model the per-step channels), ``input_name``, ``input_shape`` (``[null, n]`` or ``[null, steps, n]``).
- ``outputs`` (ONNX output names), ``prediction`` (``{"output", "type", "column"}``: which output is the
  prediction; ``type`` is ``value``, ``probability_class_1`` or ``class_probabilities``), ``classes``
  (class labels of a classifier, else null).
- ``label`` (free-form: label column, horizon...), ``scaler`` (optional: input scaling the caller applies
  before :meth:`Bundle.predict`), ``training_window`` (``{"start_ms", "end_ms"}``, epoch ms), ``data_hash``,
  ``git_commit``, ``metrics``, ``opset``, ``library_versions``.
- ``parity`` (``{"max_abs_diff", "tolerance", "rows"}``: native vs ONNX on the test rows) and
  ``onnx_sha256`` (of the ``model.onnx`` bytes, so a corrupt or swapped file is detected).

A bundle is refused with :class:`~cryptoml.errors.ModelContractError` when any of these does not hold.
The two files are each replaced atomically, ``model.onnx`` first: a crash in between leaves a new model
beside the old meta, which the checksum then refuses instead of serving a mismatched pair.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import onnxruntime as ort

from cryptoml.atomic import atomic_write_bytes, atomic_write_text
from cryptoml.errors import ModelContractError

MODEL_FILE = "model.onnx"
META_FILE = "model_meta.json"

KINDS = (
    "xgboost_regressor",
    "xgboost_classifier",
    "xgboost_multiclass",
    "lightgbm_regressor",
    "keras_sequence",
)
PREDICTION_TYPES = ("value", "probability_class_1", "class_probabilities")

# key -> accepted JSON types (after json.loads); "scaler" is the only optional key.
_SCHEMA: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "kind": (str,),
    "feature_names": (list,),
    "input_name": (str,),
    "input_shape": (list,),
    "outputs": (list,),
    "prediction": (dict,),
    "classes": (list, type(None)),
    "label": (dict,),
    "training_window": (dict,),
    "data_hash": (dict,),
    "git_commit": (str,),
    "metrics": (dict,),
    "opset": (int,),
    "library_versions": (dict,),
    "parity": (dict,),
    "onnx_sha256": (str,),
}
OPTIONAL_KEYS = ("scaler",)
REQUIRED_KEYS = tuple(sorted(_SCHEMA))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; NaN / inf become null (strict JSON has no such numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise ModelContractError(f"model meta: {where} is a {type(value).__name__}, which JSON cannot hold")


def meta_to_json(meta: Mapping[str, Any]) -> str:
    """The canonical text of ``model_meta.json``: plain types, sorted keys, 2-space indent, final newline."""
    return json.dumps(_plain(meta, "meta"), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def parity_passed(parity: Any) -> bool:
    """True when ``parity`` holds finite ``max_abs_diff <= tolerance`` over at least one row."""
    if not isinstance(parity, Mapping):
        return False
    try:
        diff, tol, rows = float(parity["max_abs_diff"]), float(parity["tolerance"]), int(parity["rows"])
    except (KeyError, TypeError, ValueError):
        return False
    return math.isfinite(diff) and math.isfinite(tol) and rows > 0 and diff <= tol


def validate_meta(meta: Mapping[str, Any], where: str = "model meta") -> None:
    """Raise ModelContractError naming the first missing, mistyped or inconsistent key of ``meta``."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelContractError(f"{where}: missing keys {missing}")
    for key, types in _SCHEMA.items():
        if not isinstance(meta[key], types) or isinstance(meta[key], bool):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ModelContractError(f"{where}: {key!r} must be {names}, got {type(meta[key]).__name__}")
    if meta["kind"] not in KINDS:
        raise ModelContractError(f"{where}: unknown kind {meta['kind']!r} (expected one of {list(KINDS)})")
    names = meta["feature_names"]
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ModelContractError(f"{where}: feature_names must be a non-empty list of distinct strings")
    shape = meta["input_shape"]
    if (
        len(shape) < 2
        or shape[0] is not None
        or not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in shape[1:])
    ):
        raise ModelContractError(f"{where}: input_shape must be [null, ...positive sizes or null], got {shape}")
    if shape[-1] != len(names):
        raise ModelContractError(
            f"{where}: the input's last dimension {shape[-1]} differs from the {len(names)} feature_names"
        )
    pred = meta["prediction"]
    if pred.get("output") not in meta["outputs"] or pred.get("type") not in PREDICTION_TYPES:
        raise ModelContractError(
            f"{where}: prediction {pred} must name one of the outputs {meta['outputs']} and a type in "
            f"{list(PREDICTION_TYPES)}"
        )
    if pred["type"] != "value" and not meta["classes"]:
        raise ModelContractError(f"{where}: a {pred['type']} prediction needs the list of classes")
    if pred["type"] == "probability_class_1" and not isinstance(pred.get("column"), int):
        raise ModelContractError(f"{where}: a probability_class_1 prediction needs the probability column")
    window = meta["training_window"]
    if not all(isinstance(window.get(k), int) for k in ("start_ms", "end_ms")):
        raise ModelContractError(f"{where}: training_window must hold integer start_ms and end_ms, got {window}")
    if "scaler" in meta and not isinstance(meta["scaler"], dict | type(None)):
        raise ModelContractError(f"{where}: scaler must be an object or null")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["onnx_sha256"]):
        raise ModelContractError(f"{where}: onnx_sha256 is not a sha256 hex digest")
    if not parity_passed(meta["parity"]):
        raise ModelContractError(
            f"{where}: the parity check is missing or failed ({meta['parity']}): ONNX does not reproduce the "
            "native model"
        )


def open_session(onnx_bytes: bytes, where: str, intra_op_threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session of ``onnx_bytes``; an unloadable model becomes a ModelContractError."""
    options = ort.SessionOptions()
    # One thread: single-row latency is best without thread hand-offs, and the Pi has few cores to share.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors (InvalidProtobuf, Fail, ...)
        raise ModelContractError(f"{where}: onnxruntime cannot load the model: {e}") from e


def check_session(session: ort.InferenceSession, meta: Mapping[str, Any], where: str) -> None:
    """The ONNX graph's input name, rank and sizes and its outputs agree with ``meta``."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelContractError(f"{where}: the model has {len(inputs)} inputs, a bundle needs exactly one")
    graph_input = inputs[0]
    if graph_input.name != meta["input_name"]:
        raise ModelContractError(
            f"{where}: the model's input is {graph_input.name!r}, the meta says {meta['input_name']!r}"
        )
    graph_shape = [d if isinstance(d, int) else None for d in graph_input.shape]
    meta_shape = meta["input_shape"]
    if len(graph_shape) != len(meta_shape):
        raise ModelContractError(
            f"{where}: the model's input has rank {len(graph_shape)} {graph_shape}, the meta says {meta_shape}"
        )
    for axis, (g, m) in enumerate(zip(graph_shape[1:], meta_shape[1:], strict=True), start=1):
        if g is not None and g != m:
            raise ModelContractError(
                f"{where}: the model's input axis {axis} has size {g}, the meta says {m} (input shape "
                f"{graph_shape}, {len(meta['feature_names'])} feature_names)"
            )
    outputs = [o.name for o in session.get_outputs()]
    absent = [o for o in meta["outputs"] if o not in outputs]
    if absent:
        raise ModelContractError(f"{where}: outputs {absent} named in the meta are not in the model ({outputs})")


def check_features(actual: Sequence[str], expected: Sequence[str], where: str) -> None:
    """Raise ModelContractError when the model's ordered inputs differ from the caller's feature code."""
    actual, expected = list(actual), list(expected)
    if actual == expected:
        return
    missing = [f for f in expected if f not in actual]
    extra = [f for f in actual if f not in expected]
    if missing or extra:
        detail = f"the model lacks {missing} and has extra {extra}"
    else:
        first = next(i for i, (a, e) in enumerate(zip(actual, expected, strict=True)) if a != e)
        detail = (
            f"same names in another order (first difference at position {first}: "
            f"{actual[first]!r} vs {expected[first]!r})"
        )
    raise ModelContractError(
        f"{where}: feature list differs from the expected one ({len(actual)} vs {len(expected)} names): {detail}"
    )


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, its meta and a ready onnxruntime session (CPU)."""

    path: Path
    meta: dict[str, Any]
    session: ort.InferenceSession

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.meta["feature_names"])

    def predict(self, X: Any) -> np.ndarray:
        """The prediction of the rows of ``X``, float64.

        ``X``: shape ``(n, *input_shape[1:])`` in ``feature_names`` order, already scaled as ``meta["scaler"]``
        says (this method applies no scaling); one sample without the batch axis is taken as ``n = 1``. Returns
        shape (n,) for a single-valued regression or a class-1 probability, else (n, k) (values per output
        column, or probabilities per class in ``meta["classes"]`` order).
        """
        shape = self.meta["input_shape"]
        arr = np.asarray(X, dtype=np.float32)
        if arr.ndim == len(shape) - 1:
            arr = arr[None, ...]
        if arr.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(arr.shape[1:], shape[1:], strict=True)
        ):
            raise ModelContractError(
                f"model {self.name}: input of shape {np.shape(X)} does not fit the model's input {shape} "
                f"(its last axis holds the {len(self.feature_names)} feature_names, in order)"
            )
        pred = self.meta["prediction"]
        out = np.asarray(self.session.run([pred["output"]], {self.meta["input_name"]: np.ascontiguousarray(arr)})[0])
        out = out.reshape(arr.shape[0], -1).astype(np.float64)
        if pred["type"] == "probability_class_1":
            return out[:, int(pred["column"])]
        if pred["type"] == "value" and out.shape[1] == 1:
            return out[:, 0]
        return out

    def predict_raw(self, X_raw: Any) -> np.ndarray:
        """:meth:`predict` of raw, unscaled inputs: ``meta["scaler"]`` is applied first and the output mapped
        back to the target's units; without a scaler this equals :meth:`predict`.

        Scaler kind ``minmax`` (``MinMaxScaling.to_dict()`` of :mod:`cryptoml.models.price_keras`): inputs
        ``(x - feature_min) / (feature_max - feature_min)`` per feature (last axis), with the span taken as
        1 where max == min, cast to float32; output ``y * target.std + target.mean`` when ``target`` is given.
        """
        scaler = self.meta.get("scaler")
        if scaler is None:
            return self.predict(X_raw)
        where = f"model {self.name}: scaler"
        if scaler.get("kind") != "minmax":
            raise ModelContractError(f"{where}: unknown kind {scaler.get('kind')!r} (this code applies 'minmax')")
        try:
            lo = np.asarray(scaler["feature_min"], dtype=np.float64)
            hi = np.asarray(scaler["feature_max"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelContractError(f"{where}: needs numeric lists feature_min and feature_max ({e!r})") from e
        names = scaler.get("feature_names")
        if lo.shape != (len(self.feature_names),) or hi.shape != lo.shape:
            raise ModelContractError(
                f"{where}: {lo.size} minima / {hi.size} maxima for {len(self.feature_names)} feature_names"
            )
        if names is not None:
            check_features(names, self.feature_names, where)
        span = hi - lo
        span = np.where(span > 0, span, 1.0)
        out = self.predict(((np.asarray(X_raw, dtype=np.float64) - lo) / span).astype(np.float32))
        target = scaler.get("target")
        if target is None:
            return out
        try:
            mean, std = float(target["mean"]), float(target["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelContractError(f"{where}: target needs numeric mean and std ({e!r})") from e
        return out * std + mean


def write_bundle(out_dir: Path, onnx_bytes: bytes, meta: Mapping[str, Any]) -> Path:
    """Write ``model.onnx`` and ``model_meta.json`` into ``out_dir`` (the bundle folder); returns ``out_dir``.

    ``onnx_sha256`` is computed here (any value in ``meta`` is replaced). Refuses with ModelContractError,
    before writing anything, a meta that breaks the schema, lacks a passed parity check, or disagrees
    with the ONNX graph (input name or width, outputs).
    """
    out_dir = Path(out_dir)
    where = f"bundle {out_dir}"
    full = _plain({**meta, "onnx_sha256": sha256_hex(onnx_bytes)}, "meta")
    validate_meta(full, where)
    check_session(open_session(onnx_bytes, where), full, where)
    atomic_write_bytes(onnx_bytes, out_dir / MODEL_FILE)
    atomic_write_text(meta_to_json(full), out_dir / META_FILE)
    return out_dir


def read_meta(path: Path) -> dict[str, Any]:
    """The parsed and schema-checked ``model_meta.json`` of bundle folder ``path`` (no checksum check)."""
    where = f"bundle {path}"
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ModelContractError(f"{where}: {META_FILE} not found")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelContractError(f"{where}: {META_FILE} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ModelContractError(f"{where}: {META_FILE} must hold a JSON object")
    validate_meta(meta, where)
    return meta


def load_bundle(path: Path, expected_features: Sequence[str] | None = None, *, intra_op_threads: int = 1) -> Bundle:
    """Load and verify the bundle folder ``path``.

    Checks, each failure a ModelContractError naming what mismatched: both files exist; the meta parses
    and has every required key with the right type and a passed parity check; the sha256 of
    ``model.onnx`` equals ``onnx_sha256``; onnxruntime loads it; its input name, rank and width agree
    with the meta (width == ``len(feature_names)``); and, when given, ``feature_names`` equals
    ``expected_features`` (same names, same order).
    """
    path = Path(path)
    where = f"bundle {path}"
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise ModelContractError(f"{where}: {MODEL_FILE} not found")
    meta = read_meta(path)
    onnx_bytes = model_path.read_bytes()
    digest = sha256_hex(onnx_bytes)
    if digest != meta["onnx_sha256"]:
        raise ModelContractError(
            f"{where}: {MODEL_FILE} is corrupt or was replaced (sha256 {digest[:12]}... but the meta records "
            f"{meta['onnx_sha256'][:12]}...)"
        )
    session = open_session(onnx_bytes, where, intra_op_threads)
    check_session(session, meta, where)
    if expected_features is not None:
        check_features(meta["feature_names"], expected_features, where)
    return Bundle(path=path, meta=meta, session=session)


def check_parity_sample(bundle: Bundle) -> float:
    """Replay the bundle's ``parity_sample`` (inputs + native outputs stored at export) through this runtime.

    Returns the max abs difference; raises :class:`ModelContractError` when the sample is missing or
    malformed, or the difference exceeds the bundle's parity tolerance (a model that would not predict
    here what it predicted where it was trained).
    """
    where = f"bundle {bundle.path}"
    sample = bundle.meta.get("parity_sample")
    try:
        inputs = np.asarray(sample["inputs"], dtype=np.float32)  # type: ignore[index]
        expected = np.asarray(sample["expected"], dtype=np.float64)  # type: ignore[index]
        tolerance = float(bundle.meta["parity"]["tolerance"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelContractError(f"{where}: no usable parity_sample in its meta ({e!r})") from e
    got = bundle.predict(inputs)
    if got.shape != expected.shape and got.size == expected.size:
        got = got.reshape(expected.shape)
    if got.shape != expected.shape:
        raise ModelContractError(f"{where}: parity sample gives shape {got.shape}, expected {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not diff <= tolerance:
        raise ModelContractError(
            f"{where}: parity sample differs by {diff:.3g} > tolerance {tolerance:g}: refusing the model"
        )
    return diff
