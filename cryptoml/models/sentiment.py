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


def synthetic_sentiment(
    bar_ts_ms: Any, close: Any, seed: int, interval_minutes: int = 5, lookback_bars: int = 60
) -> pd.DataFrame:
    """A seeded sentiment table for the embedded synthetic market: a reaction to **past** prices plus noise.

    One reading every ``interval_minutes`` at minute-aligned times ``r``; each uses only bars closed by
    ``r`` (bar ``t`` closes at ``bar_ts_ms[t] + 60_000``), so it carries no information about later
    prices: a model that gains from it on synthetic data would reveal a leak. Columns follow the schema of
    this module (all finite): score = tanh(60-bar return x 50 + AR(1) noise), volume = lognormal attention
    growing with |60-bar return|, momentum = score change over 12 readings, freshness = minutes since the
    latest item (uniform 0..interval), consensus = 1 - |noise| clipped to [0, 1], extremes = share of
    readings with |score| > 0.5 over 12 readings, trend = least-squares slope of the score over 72
    readings, volatility = std of the score over 12 readings.
    """
    import pandas as pd

    bars = np.asarray(bar_ts_ms, dtype=np.int64)
    px = np.asarray(close, dtype=np.float64)
    if bars.size != px.size or bars.size <= lookback_bars:
        raise DataValidationError(f"synthetic_sentiment: need more than {lookback_bars} bars with one close each")
    step = interval_minutes * BAR_MS
    first = ((bars[0] + BAR_MS * (lookback_bars + 1)) // step + 1) * step
    times = np.arange(first, bars[-1] + BAR_MS + 1, step, dtype=np.int64)
    last_closed = np.searchsorted(bars + BAR_MS, times, side="right") - 1  # latest bar closed by the reading
    back = np.searchsorted(bars, bars[last_closed] - lookback_bars * BAR_MS)
    ret = np.log(px[last_closed] / px[back])
    rng = np.random.default_rng(seed)
    noise = np.empty(times.size)
    level = 0.0
    for i, shock in enumerate(rng.normal(0.0, 0.15, times.size)):
        level = 0.9 * level + shock
        noise[i] = level
    score = np.tanh(ret * 50.0 + noise)
    s = pd.Series(score)
    slope_x = np.arange(72, dtype=np.float64) - 35.5
    trend = s.rolling(72, min_periods=2).apply(
        lambda w: float(
            np.dot(w, slope_x[: w.size] - slope_x[: w.size].mean())
            / np.square(slope_x[: w.size] - slope_x[: w.size].mean()).sum()
        ),
        raw=True,
    )
    table = pd.DataFrame(
        {
            "ts_ms": times,
            "sentiment_score": score,
            "sentiment_volume": np.exp(rng.normal(0.0, 0.3, times.size)) * (1.0 + 100.0 * np.abs(ret)),
            "sentiment_momentum": s.diff(12).fillna(0.0).to_numpy(),
            "sentiment_freshness": rng.uniform(0.0, float(interval_minutes), times.size),
            "sentiment_consensus": np.clip(1.0 - np.abs(noise), 0.0, 1.0),
            "sentiment_extremes": (s.abs() > 0.5).astype(float).rolling(12, min_periods=1).mean().to_numpy(),
            "sentiment_trend": trend.fillna(0.0).to_numpy(),
            "sentiment_volatility": s.rolling(12, min_periods=2).std().fillna(0.0).to_numpy(),
        }
    )
    return validate_sentiment_table(table, source="synthetic sentiment")


def empty_sentiment_table() -> pd.DataFrame:
    """A table with the schema and no rows (stored when no sentiment source is configured)."""
    import pandas as pd

    return pd.DataFrame({"ts_ms": np.empty(0, np.int64), **{c: np.empty(0, np.float64) for c in SENTIMENT_COLUMNS}})
