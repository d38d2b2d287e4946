"""The backtest's report files: metrics.json, trades.csv, equity.png and drawdown.png, each written atomically.

Byte-deterministic for the same input (sorted JSON keys, fixed CSV formatting, PNGs from the Agg canvas
without a ``Software`` tag or dates) so that ``dvc repro`` and the Dask fan-out compare outputs by bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cryptoml.atomic import atomic_write_bytes
from cryptoml.backtest.metrics import as_equity_curve, as_values, drawdown_curve
from cryptoml.errors import DataValidationError

REPORT_FILES = {
    "metrics": "metrics.json",
    "trades": "trades.csv",
    "equity": "equity.png",
    "drawdown": "drawdown.png",
}
# Keys of a fold dict whose values (epoch ms) are drawn as fold boundaries on both plots.
FOLD_BOUNDARY_KEYS = ("test_start_ms", "test_end_ms")


def json_safe(value: Any, where: str = "metrics") -> Any:
    """``value`` as plain JSON types: numpy scalars/arrays unwrapped, NaN/inf -> None, tuples -> lists.

    Mappings (keys become strings), sequences, dataclasses, str/bool/int/float/None and paths are accepted;
    anything else raises :class:`DataValidationError` naming where it sits (``where``).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise DataValidationError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def metrics_json(metrics: Mapping[str, Any], folds: Sequence[Any]) -> str:
    """``{"overall": metrics, "folds": [...]}`` as indented JSON with sorted keys, NaN-free, newline-ended."""
    doc = {"overall": json_safe(metrics, "overall"), "folds": json_safe(list(folds), "folds")}
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def trades_frame(trades: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The engine's trades (a DataFrame, or one dict / dataclass per round trip) as a DataFrame."""
    if isinstance(trades, pd.DataFrame):
        return trades.reset_index(drop=True)
    rows = [dataclasses.asdict(t) if dataclasses.is_dataclass(t) and not isinstance(t, type) else t for t in trades]
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataValidationError(f"trades[{i}] must be a mapping or a dataclass, got {type(row).__name__}")
    return pd.DataFrame.from_records(rows)


def fold_boundaries_ms(folds: Sequence[Any]) -> list[int]:
    """Sorted unique epoch-ms fold edges: every ``test_start_ms`` / ``test_end_ms`` the folds carry.

    A fold is a mapping or a dataclass (e.g. :class:`cryptoml.backtest.windows.Fold`); one without those
    keys adds no edge.
    """
    edges: set[int] = set()
    for i, fold in enumerate(json_safe(list(folds), "folds")):
        if not isinstance(fold, dict):
            raise DataValidationError(f"folds[{i}] must be a mapping or a dataclass, got {type(fold).__name__}")
        edges.update(int(fold[key]) for key in FOLD_BOUNDARY_KEYS if fold.get(key) is not None)
    return sorted(edges)


def _time_axis(ts_ms: np.ndarray) -> np.ndarray:
    return ts_ms.astype("datetime64[ms]")


def _mark_folds(ax: Any, edges_ms: list[int]) -> None:
    for i, edge in enumerate(edges_ms):
        label = "fold boundary" if i == 0 else None
        ax.axvline(np.datetime64(edge, "ms"), color="grey", lw=0.6, ls=":", alpha=0.8, label=label)


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No Software tag (matplotlib's version) and no dates: identical input -> identical bytes.
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return buf.getvalue()


def equity_png(
    ts_ms: np.ndarray,
    equity: np.ndarray,
    benchmark_close: np.ndarray | None,
    edges_ms: list[int],
    title: str,
) -> bytes:
    """Strategy equity (quote currency) vs buy-and-hold of the same starting capital, fold edges dotted."""
    fig = Figure(figsize=(10.0, 4.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = _time_axis(ts_ms)
    ax.plot(x, equity, lw=0.9, color="tab:blue", label="strategy")
    if benchmark_close is not None:
        hold = equity[0] * benchmark_close / benchmark_close[0]
        ax.plot(x, hold, lw=0.9, color="tab:orange", alpha=0.8, label="buy and hold")
    _mark_folds(ax, edges_ms)
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("equity (quote currency)")
    total = (equity[-1] / equity[0] - 1.0) * 100.0
    ax.set_title(f"{title}: equity, total return {total:+.2f} %", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    return _png_bytes(fig)


def drawdown_png(ts_ms: np.ndarray, equity: np.ndarray, edges_ms: list[int], title: str) -> bytes:
    """The underwater curve: per-bar drawdown from the running peak, in % (0 at a new high, negative below)."""
    fig = Figure(figsize=(10.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = _time_axis(ts_ms)
    under_pct = -100.0 * drawdown_curve(equity)
    ax.fill_between(x, under_pct, 0.0, color="tab:red", alpha=0.35, lw=0)
    ax.plot(x, under_pct, lw=0.7, color="tab:red", label="drawdown")
    _mark_folds(ax, edges_ms)
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("drawdown (%)")
    ax.set_title(f"{title}: underwater curve, max drawdown {-under_pct.min():.2f} %", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    return _png_bytes(fig)


def write_backtest_report(
    out_dir: str | Path,
    *,
    metrics: Mapping[str, Any],
    folds: Sequence[Any],
    trades: pd.DataFrame | Sequence[Mapping[str, Any]],
    ts_ms: Any,
    equity: Any,
    benchmark_close: Any = None,
    bar_ms: int = 60_000,
    title: str = "Walk-forward backtest",
) -> dict[str, Path]:
    """Write the four report files into ``out_dir`` (created if needed); returns name -> path.

    - ``metrics.json``: ``{"folds": [...], "overall": metrics}`` (see :func:`metrics_json`); a fold's
      ``test_start_ms`` / ``test_end_ms`` also mark the fold boundaries on both plots.
    - ``trades.csv``: one row per round trip, the engine's columns in its order, no index.
    - ``equity.png``: ``equity`` (per bar, quote currency, aligned with ``ts_ms``) vs buy-and-hold of
      ``benchmark_close`` (same bars) scaled to the same starting capital.
    - ``drawdown.png``: the underwater curve of ``equity``.

    Every file is written atomically; the same input gives the same bytes.
    """
    ts, eq = as_equity_curve(ts_ms, equity, bar_ms=bar_ms)
    close = None
    if benchmark_close is not None:
        close = as_values("benchmark_close", benchmark_close, positive=True)
        if close.size != eq.size:
            raise DataValidationError(f"benchmark_close and equity differ in length: {close.size} vs {eq.size}")
    edges = fold_boundaries_ms(folds)
    # Everything is rendered before the first write: bad input leaves the previous report untouched.
    contents = {
        "metrics": metrics_json(metrics, folds).encode("utf-8"),
        "trades": trades_frame(trades).to_csv(index=False, lineterminator="\n").encode("utf-8"),
        "equity": equity_png(ts, eq, close, edges, title),
        "drawdown": drawdown_png(ts, eq, edges, title),
    }
    paths = {name: Path(out_dir) / filename for name, filename in REPORT_FILES.items()}
    for name, data in contents.items():
        atomic_write_bytes(data, paths[name])
    return paths
