"""The parity gate: an exported ONNX model must reproduce its native model's predictions.

Imports only numpy and onnxruntime. ONNX tree ensembles and tf2onnx graphs run in float32, so the
native model is scored on the same float32-cast rows; what remains is float32 summation order (trees)
or kernel differences (networks), which the tolerances below bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from cryptoml.errors import ModelContractError

TREE_TOLERANCE = 1e-5  # max abs diff, tree ensembles (float32 sums over a few hundred trees)
NETWORK_TOLERANCE = 1e-4  # max abs diff, neural networks (float32 kernels differ between TF and onnxruntime)


def _session(model: bytes | ort.InferenceSession) -> ort.InferenceSession:
    if isinstance(model, ort.InferenceSession):
        return model
    try:
        return ort.InferenceSession(bytes(model), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
        raise ModelContractError(f"onnxruntime cannot load the model: {e}") from e


def onnx_predict(onnx_bytes_or_session: bytes | ort.InferenceSession, X: Any, output: str | None = None) -> np.ndarray:
    """Run the single-input ONNX model on ``X`` (cast to float32); return output ``output`` (default: the
    first) as float64, in the shape the graph gives (e.g. (n, 1) for a regressor, (n, k) probabilities)."""
    session = _session(onnx_bytes_or_session)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelContractError(f"onnx_predict: the model has {len(inputs)} inputs, expected one")
    names = [o.name for o in session.get_outputs()]
    name = names[0] if output is None else output
    if name not in names:
        raise ModelContractError(f"onnx_predict: the model has no output {name!r} (outputs: {names})")
    arr = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    return np.asarray(session.run([name], {inputs[0].name: arr})[0], dtype=np.float64)


def check_parity(native_pred: Any, onnx_pred: Any, tolerance: float, name: str = "model") -> dict[str, Any]:
    """``{"max_abs_diff", "tolerance", "rows"}`` of native vs ONNX predictions of the same rows.

    Shapes (n,) and (n, 1) are treated as the same. NaN must sit at the same places in both (a NaN on
    one side only counts as an infinite difference). Raises ModelContractError, naming ``name`` and the
    numbers, when the difference exceeds ``tolerance`` or the predictions do not line up.
    """
    native = np.asarray(native_pred, dtype=np.float64)
    onnx = np.asarray(onnx_pred, dtype=np.float64)
    rows = int(native.shape[0]) if native.ndim else 1
    if native.size == 0:
        raise ModelContractError(f"{name}: parity needs at least one prediction, got none")
    if native.size != onnx.size or (onnx.shape[0] if onnx.ndim else 1) != rows:
        raise ModelContractError(
            f"{name}: native predictions of shape {native.shape} and ONNX predictions of shape {onnx.shape} "
            "do not line up"
        )
    native, onnx = native.reshape(rows, -1), onnx.reshape(rows, -1)
    nan_native, nan_onnx = np.isnan(native), np.isnan(onnx)
    if (nan_native != nan_onnx).any():
        max_abs = float("inf")
    else:
        both = ~nan_native
        max_abs = float(np.max(np.abs(native[both] - onnx[both]), initial=0.0))
    result = {"max_abs_diff": max_abs, "tolerance": float(tolerance), "rows": rows}
    if not max_abs <= tolerance:
        worst = int(np.nanargmax(np.abs(native - onnx)).item() // native.shape[1]) if np.isfinite(max_abs) else -1
        where = f" (worst row {worst})" if worst >= 0 else " (NaN on one side only)"
        raise ModelContractError(
            f"{name}: ONNX predictions differ from the native model by {max_abs:.3g} > tolerance {tolerance:g} "
            f"over {rows} rows{where}"
        )
    return result
