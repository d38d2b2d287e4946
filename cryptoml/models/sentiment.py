"""The optional sentiment table: its schema, loader, as-of alignment to bars, and the price-model fallback rule.

Schema (one row per minute at which a sentiment reading became known; gaps allowed):

=======================  =======  ==================================================================
column                   dtype    meaning
=======================  =======  ==================================================================
ts_ms                    int64    time the reading became **available**, epoch ms UTC, minute-aligned
sentiment_score          float64  aggregate polarity of the period's items (e.g. -1..1)
sentiment_volume         float64  how many items / how much attention (count or a normalised count)
sentiment_momentum       float64  change of the score over a recent window
sentiment_freshness      float64  how recent the underlying items are (e.g. minutes since the latest)
sentiment_consensus      float64  agreement among sources (e.g. 0..1)
sentiment_extremes       float64  share of strongly positive / negative items
sentiment_trend          float64  slope of the score over a longer window
sentiment_volatility     float64  dispersion of the score over a recent window
=======================  =======  ==================================================================

The producer of the table owns the exact definitions and scales; the price model min-max scales each
column on its training window, so only consistency over time matters. Values must be finite: a missing
reading is a missing row, not a NaN. Parquet or CSV; other columns are ignored.

Alignment (:func:`align_sentiment`): bar ``t`` (opened at ``ts_ms[t]``) gets the last reading with
``ts_ms <= ts_ms[t] + 60_000`` (the bar's close), i.e. what was known when the bar's features are
computed; never a later one. Bars before the first reading (or whose reading is older than
``max_age_ms``) get NaN.

:func:`choose_price_model` (used at inference) lives here rather than in ``price_keras`` because it must
not import TensorFlow; this module imports only NumPy and the standard library at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryptoml.errors import ConfigError, DataValidationError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PRICE_FEATURES",
    "PRICE_ONLY_MODEL",
    "SENTIMENT_COLUMNS",
    "SENTIMENT_MODEL",
    "SENTIMENT_PRICE_FEATURES",
    "align_sentiment",
    "choose_price_model",
    "load_sentiment_table",
    "validate_sentiment_table",
]

log = logging.getLogger(__name__)

BAR_MS = 60_000
SENTIMENT_COLUMNS: tuple[str, ...] = (
    "sentiment_score",
    "sentiment_volume",
    "sentiment_momentum",
    "sentiment_freshness",
    "sentiment_consensus",
    "sentiment_extremes",
    "sentiment_trend",
    "sentiment_volatility",
)
PRICE_FEATURES: tuple[str, ...] = ("open", "high", "low", "close", "volume")
SENTIMENT_PRICE_FEATURES: tuple[str, ...] = PRICE_FEATURES + SENTIMENT_COLUMNS  # the 13 inputs, in order

# Names under which the two Keras price models are trained, exported and looked up.
PRICE_ONLY_MODEL = "price_cnn_lstm"
SENTIMENT_MODEL = "price_cnn_lstm_sentiment"


def validate_sentiment_table(table: pd.DataFrame, source: str = "sentiment table") -> pd.DataFrame:
    """The table reduced to ``ts_ms`` + :data:`SENTIMENT_COLUMNS`, sorted by ``ts_ms``, float64 values.

    Raises :class:`DataValidationError` naming the problem: missing columns, a non-integer or
    non-minute-aligned ``ts_ms``, duplicate times, non-numeric or non-finite values, no rows.
    """
    import pandas as pd

    missing = [c for c in ("ts_ms", *SENTIMENT_COLUMNS) if c not in table.columns]
    if missing:
        raise DataValidationError(f"{source}: missing columns {missing} (needs ts_ms + {list(SENTIMENT_COLUMNS)})")
    if table.empty:
        raise DataValidationError(f"{source}: no rows")
    ts_dtype = table["ts_ms"].dtype
    if not (isinstance(ts_dtype, np.dtype) and np.issubdtype(ts_dtype, np.integer)):
        raise DataValidationError(f"{source}: ts_ms must be integer epoch milliseconds, got dtype {ts_dtype}")
    ts = table["ts_ms"].to_numpy(dtype=np.int64)
    off_grid = ts % BAR_MS != 0
    if off_grid.any():
        row = int(np.flatnonzero(off_grid)[0])
        raise DataValidationError(
            f"{source}: ts_ms must be minute-aligned (multiples of {BAR_MS}); {int(off_grid.sum())} rows are not, "
            f"first at row {row} (ts_ms={int(ts[row])})"
        )
    out = pd.DataFrame({"ts_ms": ts})
    for col in SENTIMENT_COLUMNS:
        if table[col].dtype == bool or not pd.api.types.is_numeric_dtype(table[col]):
            raise DataValidationError(f"{source}: column {col} must be numeric, got dtype {table[col].dtype}")
        values = table[col].to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataValidationError(
                f"{source}: column {col} has {int(bad.sum())} NaN/inf values, first at ts_ms={int(ts[row])} "
                "(leave out a missing reading instead)"
            )
        out[col] = values
    out = out.sort_values("ts_ms", kind="stable").reset_index(drop=True)
    dup = out["ts_ms"].duplicated()
    if dup.any():
        raise DataValidationError(
            f"{source}: {int(dup.sum())} duplicate ts_ms, first {int(out.loc[dup, 'ts_ms'].iloc[0])}"
        )
    return out


def load_sentiment_table(path: str | Path) -> pd.DataFrame:
    """Read and validate a sentiment table from ``.parquet`` or ``.csv`` (see the module docstring).

    Raises :class:`ConfigError` for a missing file or another suffix, :class:`DataValidationError` for
    an unreadable or invalid table.
    """
    import pandas as pd

    p = Path(path)
    suffix = p.name.lower()
    if not suffix.endswith((".parquet", ".csv")):
        raise ConfigError(f"{p}: a sentiment table must be .parquet or .csv")
    if not p.is_file():
        raise ConfigError(f"{p}: no such sentiment table")
    try:
        table = pd.read_parquet(p) if suffix.endswith(".parquet") else pd.read_csv(p)
    except (OSError, ValueError) as e:
        raise DataValidationError(f"{p}: cannot read the sentiment table: {e}") from e
    return validate_sentiment_table(table, source=str(p))


def align_sentiment(bar_ts_ms: Any, sentiment: pd.DataFrame, max_age_ms: int | None = None) -> np.ndarray:
    """As-of join: the readings known at each bar's close, shape ``(bars, 8)`` float64, NaN where none.

    ``bar_ts_ms``: bar **open** times (epoch ms); ``sentiment``: a validated table (sorted ``ts_ms``).
    Bar ``t`` takes the last row with ``ts_ms <= bar_ts_ms[t] + 60_000``; with ``max_age_ms``, a reading
    older than that at the bar's close counts as missing.
    """
    bars = np.asarray(bar_ts_ms, dtype=np.int64)
    ts = sentiment["ts_ms"].to_numpy(dtype=np.int64)
    values = sentiment[list(SENTIMENT_COLUMNS)].to_numpy(dtype=np.float64)
    close_ms = bars + BAR_MS
    idx = np.searchsorted(ts, close_ms, side="right") - 1
    ok = idx >= 0
    if max_age_ms is not None:
        ok &= close_ms - ts[idx.clip(0)] <= max_age_ms
    out = np.full((bars.size, len(SENTIMENT_COLUMNS)), np.nan)
    out[ok] = values[idx[ok]]
    return out


def choose_price_model(available: Mapping[str, Any] | None, has_sentiment_now: bool) -> tuple[str | None, str]:
    """Which Keras price model to run: ``(name, reason)``; never raises.

    ``available``: model name -> loaded model (or bundle); a missing key or a None value means not
    available. Order: :data:`SENTIMENT_MODEL` when sentiment readings are available now, else
    :data:`PRICE_ONLY_MODEL`, else ``(None, reason)`` (logged as a warning: the caller trades without
    a price forecast).
    """
    try:
        models = dict(available or {})
    except (TypeError, ValueError):
        models = {}
    has_sentiment_model = models.get(SENTIMENT_MODEL) is not None
    has_price_model = models.get(PRICE_ONLY_MODEL) is not None
    if has_sentiment_now and has_sentiment_model:
        return SENTIMENT_MODEL, "sentiment readings are available and the sentiment model is loaded"
    if has_sentiment_model:
        why = "no current sentiment readings"
    elif has_sentiment_now:
        why = "the sentiment model is not available"
    else:
        why = "no current sentiment readings and no sentiment model"
    if has_price_model:
        return PRICE_ONLY_MODEL, f"{why}: falling back to the price-only model"
    reason = f"{why}, and the price-only model is not available either: no price forecast"
    log.warning("choose_price_model: %s", reason)
    return None, reason
