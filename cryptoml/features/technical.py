"""The 19 technical features of 1-minute bars: their definitions and the batch (pandas / NumPy) implementation.

:mod:`cryptoml.features.streaming` computes the very same definitions one bar at a time for the edge
runner; the two agree to <= 1e-9 on real data (tests/features/test_technical.py). This module imports
NumPy only at import time (pandas is imported inside :func:`technical_features`), so the streaming
module can share the constants below without pulling pandas in.

Input: bars in the store schema (``ts_ms`` = bar **open** time, epoch ms UTC, int64; ``open high low
close volume`` float64, volume in base currency), strictly increasing ``ts_ms``. ``open`` is validated
but no feature reads it.

Time alignment: the feature row of bar ``t`` (the bar that opened at ``ts_ms[t]``) uses bars ``<= t``
only, i.e. it is known at ``t``'s close (``ts_ms[t] + 60_000``). Below, ``c, h, l, v`` are a bar's close,
high, low and volume, ``t - k`` is the k-th bar before ``t`` in the row order (see gaps), windows
include bar ``t``, ``ln`` is the natural log, ``r_t = ln(c_t / c_{t-1})`` the 1-bar log return.

The set is the issue's list (EMA 12 / 26 / 60, VWAP and price vs VWAP, momentum vs a moving average,
returns over 1 / 5 / 15 min, RSI 14, acceleration, 15 / 60 min volatility, high-low spread and its
average, volume ratio, volume-price divergence = 17 features) plus two that complete it: ``ret_60``
(the 60-minute rung of the return ladder, matching the 60-bar EMA, VWAP and volatility) and
``macd_hist`` (the reason EMA 12 / 26 exist: their gap's deviation from its own 9-bar EMA). Every
feature is scale-free (ratios, log returns, 0..100 or -1..1 scores), so a model does not learn price
levels. The order of :data:`TECHNICAL_FEATURES` is a contract: model bundles and the edge runner
store and check it.

Feature table (in :data:`TECHNICAL_FEATURES` order); units are fractions unless stated:

=========================  ======================================================================  =====
feature                    formula (bars <= t)                                                     first
=========================  ======================================================================  =====
close_vs_ema_12            c_t / EMA12_t - 1                                                         11
close_vs_ema_26            c_t / EMA26_t - 1                                                         25
close_vs_ema_60            c_t / EMA60_t - 1                                                         59
macd_hist                  (MACD_t - SIGNAL_t) / c_t, MACD = EMA12 - EMA26, SIGNAL = EMA9(MACD)      33
close_vs_vwap_60           c_t / VWAP60_t - 1                                                        59
vwap_premium_60            VWAP60_t / mean(tp over 60) - 1                                           59
momentum_20                c_t / mean(c over 20) - 1                                                 19
ret_1, ret_5, ret_15       ln(c_t / c_{t-k}) for k = 1, 5, 15 (log returns: they add up)            k
ret_60                     ln(c_t / c_{t-60})                                                        60
rsi_14                     100 * AG_t / (AG_t + AL_t), Wilder averages of gains / losses, 0..100    14
acceleration               ret_5_t - ret_5_{t-5} = ln c_t - 2 ln c_{t-5} + ln c_{t-10}               10
vol_15, vol_60             sample std (ddof = 1) of r over the last 15 / 60 bars                  15 / 60
hl_spread                  (h_t - l_t) / c_t                                                          0
hl_spread_ma_15            mean(hl_spread over 15)                                                   14
volume_ratio               v_t / mean(v over 60) (ratio, 1 = an average bar)                         59
volume_price_divergence    mean over 15 bars of -sign(c_k - c_{k-1}) * sign(v_k - v_{k-1}), -1..1    15
=========================  ======================================================================  =====

"first" is the first bar index (0-based, within a segment) at which the feature is defined.

Definitions in detail:

- EMA_n: ``alpha = 2 / (n + 1)``; seeded with the simple mean of the first ``n`` closes at bar ``n - 1``,
  then ``EMA_t = (1 - alpha) * EMA_{t-1} + alpha * c_t``. SIGNAL is the same recursion (n = 9) over MACD,
  seeded with the mean of the first 9 MACD values (bars 25..33).
- VWAP60 = sum(tp * v) / sum(v) over the last 60 bars, ``tp = (h + l + c) / 3`` (typical price); when
  the 60 volumes are all zero it falls back to mean(tp) (its zero-volume limit, premium 0). The price
  level itself is not a feature (a level does not transfer across regimes or symbols); VWAP enters
  scale-free twice: where the close sits relative to it, and where volume traded relative to the
  time-weighted mean price (``vwap_premium_60`` > 0: the volume went through at the higher prices).
- RSI: gains ``g_t = max(c_t - c_{t-1}, 0)``, losses ``max(c_{t-1} - c_t, 0)``; AG, AL are seeded with the
  mean of the first 14 gains / losses (bars 1..14) at bar 14, then smoothed the Wilder way, i.e. an
  EMA with ``alpha = 1 / 14``. RSI = 50 when AG + AL = 0, i.e. no change at all since the segment
  start; in a later flat stretch both averages decay by 13/14 a bar and the RSI holds its last value.
- volume_ratio = 1 when the 60 volumes are all zero (the bar is as busy as its window).
- volume_price_divergence: each bar k >= 1 scores +1 when its close change and volume change have
  opposite signs (price up on falling volume, or price down on rising volume), -1 when they agree,
  0 when either did not change; the feature is the mean score of the last 15 bars.

Warm-up: a segment's first :data:`WARMUP_BARS` (= 60) rows are warm-up rows: the batch output has
``is_warmup = True`` and **every** feature NaN there (even those already defined), and the streaming
``update`` returns None. Every feature is defined and finite on every other row. Nothing is ever
filled from later bars.

Seed memory: the EMAs and Wilder averages remember their seed, fading as ``(1 - alpha)^k``, so a row
depends (slightly) on where its segment started. On the real BTC month, rows 60 bars after a start
differ from the same rows of a long history by up to 0.0016 in ``close_vs_ema_60`` (0.6 of its std)
and 0.5 RSI points; after 240 bars by < 4e-6 and 1e-6; after 480 by ~1e-9. Hence
:data:`PRIMING_BARS`: feed the stream that many bars of history (one klines request) before trusting
its features to match training rows computed over a long history.

Gaps: a row following its predecessor by <= :data:`MAX_STEP_MS` (5 min, i.e. up to 4 missing bars) is
treated as the next bar (windows count rows, not minutes), so a short outage of the live runner does not
cost an hour of warm-up. A longer step starts a new segment: all state is dropped and warm-up starts
again at that row. Steps must be positive multiples of 60 000 ms (anything else is an error), so batch and
streaming make the same decision on the same rows.

Numerics: window sums are computed afresh for each row from the window's values (pairwise NumPy sums
here, ``math.fsum`` in streaming), never by adding and removing values over the whole history, so no
drift accumulates; standard deviations are two-pass (mean, then squared deviations).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cryptoml.errors import DataValidationError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BAR_MS",
    "INPUT_COLUMNS",
    "MAX_STEP_MS",
    "PRIMING_BARS",
    "TECHNICAL_FEATURES",
    "WARMUP_BARS",
    "ema",
    "rsi_wilder",
    "technical_features",
]

TECHNICAL_FEATURES: tuple[str, ...] = (
    "close_vs_ema_12",
    "close_vs_ema_26",
    "close_vs_ema_60",
    "macd_hist",
    "close_vs_vwap_60",
    "vwap_premium_60",
    "momentum_20",
    "ret_1",
    "ret_5",
    "ret_15",
    "ret_60",
    "rsi_14",
    "acceleration",
    "vol_15",
    "vol_60",
    "hl_spread",
    "hl_spread_ma_15",
    "volume_ratio",
    "volume_price_divergence",
)
INPUT_COLUMNS: tuple[str, ...] = ("ts_ms", "open", "high", "low", "close", "volume")

BAR_MS = 60_000
MAX_STEP_MS = 5 * BAR_MS  # a longer step between rows resets the state (new warm-up)
WARMUP_BARS = 60  # rows 0..59 of a segment are warm-up; ret_60 and vol_60 first exist at row 60
PRIMING_BARS = 300  # history to feed before features match a long-history computation (see "Seed memory")

# Window lengths and smoothing constants, shared with the streaming implementation.
EMA_SPANS: tuple[int, int, int] = (12, 26, 60)
MACD_FAST, MACD_SLOW, MACD_SIGNAL = 12, 26, 9
VWAP_WINDOW = 60
MOMENTUM_WINDOW = 20
RETURN_LAGS: tuple[int, int, int, int] = (1, 5, 15, 60)
RSI_PERIOD = 14
ACCEL_LAG = 5
VOL_WINDOWS: tuple[int, int] = (15, 60)
HL_MA_WINDOW = 15
VOLUME_WINDOW = 60
DIVERGENCE_WINDOW = 15

_STD_CHUNK_ROWS = 65_536  # bounds the temporary (rows x window) array of the two-pass std


def ema_alpha(span: int) -> float:
    return 2.0 / (span + 1)


def _seeded_recursion(seed: float, values: np.ndarray, alpha: float) -> np.ndarray:
    """``[seed, y_1, ...]`` with ``y_k = (1 - alpha) * y_{k-1} + alpha * values[k-1]`` (pandas' adjust=False EWM)."""
    import pandas as pd

    series = pd.Series(np.concatenate(([seed], values)))
    return series.ewm(alpha=alpha, adjust=False).mean().to_numpy(dtype=np.float64)


def _seeded_ema(values: np.ndarray, start: int, period: int, alpha: float) -> np.ndarray:
    """EMA of ``values[start:]`` seeded with the mean of its first ``period`` values; NaN before the seed row."""
    out = np.full(len(values), np.nan)
    seed_row = start + period - 1
    if len(values) > seed_row:
        seed = math.fsum(values[start : seed_row + 1]) / period
        out[seed_row:] = _seeded_recursion(seed, values[seed_row + 1 :], alpha)
    return out


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """EMA with ``alpha = 2 / (span + 1)`` seeded by the mean of the first ``span`` values (row ``span - 1``)."""
    return _seeded_ema(np.asarray(values, dtype=np.float64), 0, span, ema_alpha(span))


def rsi_wilder(close: np.ndarray, period: int = RSI_PERIOD) -> np.ndarray:
    """Wilder's RSI (0..100) of a close series; NaN before row ``period`` (see the module docstring)."""
    c = np.asarray(close, dtype=np.float64)
    diff = np.diff(c, prepend=np.nan)
    gain, loss = np.maximum(diff, 0.0), np.maximum(-diff, 0.0)
    avg_gain = _seeded_ema(gain, 1, period, 1.0 / period)
    avg_loss = _seeded_ema(loss, 1, period, 1.0 / period)
    total = avg_gain + avg_loss
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100.0 * avg_gain / total, np.where(np.isnan(total), np.nan, 50.0))


def _rolling_sum(x: np.ndarray, window: int) -> np.ndarray:
    """Sum of ``x[t - window + 1 .. t]`` computed per row (no running total); NaN before row ``window - 1``."""
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        out[window - 1 :] = sliding_window_view(x, window).sum(axis=1)
    return out


def _rolling_std(x: np.ndarray, window: int) -> np.ndarray:
    """Two-pass sample std (ddof = 1) of ``x[t - window + 1 .. t]``; NaN before row ``window - 1``."""
    out = np.full(len(x), np.nan)
    if len(x) < window:
        return out
    view = sliding_window_view(x, window)
    for start in range(0, len(view), _STD_CHUNK_ROWS):
        block = view[start : start + _STD_CHUNK_ROWS]
        dev = block - (block.sum(axis=1) / window)[:, None]
        out[window - 1 + start : window - 1 + start + len(block)] = np.sqrt((dev * dev).sum(axis=1) / (window - 1))
    return out


def _lagged_diff(x: np.ndarray, lag: int) -> np.ndarray:
    out = np.full(len(x), np.nan)
    if len(x) > lag:
        out[lag:] = x[lag:] - x[:-lag]
    return out


def segment_features(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """Feature matrix ``(rows, 19)`` of one gap-free segment; warm-up rows (the first 60) are NaN."""
    n = len(close)
    c, h, lo, v = close, high, low, volume
    cols: dict[str, np.ndarray] = {}

    emas = {span: ema(c, span) for span in EMA_SPANS}
    for span in EMA_SPANS:
        cols[f"close_vs_ema_{span}"] = c / emas[span] - 1.0
    macd = emas[MACD_FAST] - emas[MACD_SLOW]
    signal = _seeded_ema(macd, MACD_SLOW - 1, MACD_SIGNAL, ema_alpha(MACD_SIGNAL))
    cols["macd_hist"] = (macd - signal) / c

    tp = (h + lo + c) / 3.0
    sum_v = _rolling_sum(v, VWAP_WINDOW)
    mean_tp = _rolling_sum(tp, VWAP_WINDOW) / VWAP_WINDOW
    with np.errstate(invalid="ignore", divide="ignore"):
        vwap = np.where(sum_v > 0, _rolling_sum(tp * v, VWAP_WINDOW) / sum_v, mean_tp)
    cols["close_vs_vwap_60"] = c / vwap - 1.0
    cols["vwap_premium_60"] = vwap / mean_tp - 1.0

    cols["momentum_20"] = c / (_rolling_sum(c, MOMENTUM_WINDOW) / MOMENTUM_WINDOW) - 1.0

    log_c = np.log(c)
    for lag in RETURN_LAGS:
        cols[f"ret_{lag}"] = _lagged_diff(log_c, lag)
    cols["rsi_14"] = rsi_wilder(c, RSI_PERIOD)
    cols["acceleration"] = _lagged_diff(cols[f"ret_{ACCEL_LAG}"], ACCEL_LAG)

    r = cols["ret_1"]
    for window in VOL_WINDOWS:
        std = np.full(n, np.nan)
        std[1:] = _rolling_std(r[1:], window)
        cols[f"vol_{window}"] = std

    hl = (h - lo) / c
    cols["hl_spread"] = hl
    cols["hl_spread_ma_15"] = _rolling_sum(hl, HL_MA_WINDOW) / HL_MA_WINDOW

    mean_v = _rolling_sum(v, VOLUME_WINDOW) / VOLUME_WINDOW
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["volume_ratio"] = np.where(mean_v > 0, v / mean_v, np.where(np.isnan(mean_v), np.nan, 1.0))

    score = np.zeros(n, dtype=np.int64)
    score[1:] = -np.sign(np.diff(c)).astype(np.int64) * np.sign(np.diff(v)).astype(np.int64)
    div = np.full(n, np.nan)
    if n > DIVERGENCE_WINDOW:
        # integer sums are exact, so both implementations give identical values
        csum = np.cumsum(score)
        div[DIVERGENCE_WINDOW:] = (csum[DIVERGENCE_WINDOW:] - csum[:-DIVERGENCE_WINDOW]) / DIVERGENCE_WINDOW
    cols["volume_price_divergence"] = div

    out = np.column_stack([cols[name] for name in TECHNICAL_FEATURES])
    out[:WARMUP_BARS] = np.nan
    return out


def segment_starts(ts_ms: np.ndarray) -> np.ndarray:
    """Row indices where a segment starts: row 0 and every row more than MAX_STEP_MS after its predecessor."""
    if len(ts_ms) == 0:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(([0], np.flatnonzero(np.diff(ts_ms) > MAX_STEP_MS) + 1))


def _validate(ohlcv: pd.DataFrame) -> None:
    missing = [col for col in INPUT_COLUMNS if col not in ohlcv.columns]
    if missing:
        raise DataValidationError(
            f"technical features: OHLCV frame is missing columns {missing} (needs {INPUT_COLUMNS})"
        )
    ts_dtype = ohlcv["ts_ms"].dtype
    if not (isinstance(ts_dtype, np.dtype) and np.issubdtype(ts_dtype, np.integer)):
        raise DataValidationError(f"technical features: ts_ms must be integer epoch ms, got dtype {ts_dtype}")
    for col in INPUT_COLUMNS[1:]:
        try:
            values = ohlcv[col].to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as e:
            raise DataValidationError(f"technical features: column {col} is not numeric ({e})") from e
        bad = ~np.isfinite(values) | ((values <= 0) if col != "volume" else (values < 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            need = "finite and >= 0" if col == "volume" else "finite and > 0"
            raise DataValidationError(
                f"technical features: {col} must be {need}; {int(bad.sum())} bad rows, first at row {row} "
                f"(ts_ms={int(ohlcv['ts_ms'].iloc[row])}, {col}={values[row]})"
            )
    crossed = ohlcv["high"].to_numpy() < ohlcv["low"].to_numpy()
    if crossed.any():
        row = int(np.flatnonzero(crossed)[0])
        first_ts = int(ohlcv["ts_ms"].iloc[row])
        raise DataValidationError(
            f"technical features: high < low on {int(crossed.sum())} rows, first at ts_ms={first_ts}"
        )
    steps = np.diff(ohlcv["ts_ms"].to_numpy(dtype=np.int64))
    bad_step = (steps <= 0) | (steps % BAR_MS != 0)
    if bad_step.any():
        row = int(np.flatnonzero(bad_step)[0]) + 1
        ts = ohlcv["ts_ms"].to_numpy()
        what = "not strictly increasing (unsorted or duplicate bars)" if steps[row - 1] <= 0 else "not 1-minute bars"
        raise DataValidationError(
            f"technical features: ts_ms {what}: row {row} has ts_ms={int(ts[row])} after {int(ts[row - 1])} "
            f"(steps must be positive multiples of {BAR_MS} ms)"
        )


def technical_features(ohlcv: pd.DataFrame) -> pd.DataFrame:
    """The 19 features of every bar plus ``is_warmup`` (True on warm-up rows, whose features are all NaN).

    ``ohlcv``: store schema, sorted by ``ts_ms`` (1-minute bars, gaps allowed, see the module docstring).
    Returns a float64 frame with the input's index, columns :data:`TECHNICAL_FEATURES` then ``is_warmup``.
    Raises :class:`DataValidationError` on missing columns, NaN / inf / non-positive prices, negative
    volume, high < low, or ``ts_ms`` that is unsorted, duplicated or not on a 1-minute step.
    """
    import pandas as pd

    _validate(ohlcv)
    arrays = {col: ohlcv[col].to_numpy(dtype=np.float64) for col in ("high", "low", "close", "volume")}
    ts_ms = ohlcv["ts_ms"].to_numpy(dtype=np.int64)
    n = len(ohlcv)
    values = np.empty((n, len(TECHNICAL_FEATURES)))
    warm = np.zeros(n, dtype=bool)
    bounds = [*segment_starts(ts_ms).tolist(), n]
    for start, stop in itertools.pairwise(bounds):
        seg = slice(start, stop)
        values[seg] = segment_features(*(arrays[col][seg] for col in ("high", "low", "close", "volume")))
        warm[start : min(stop, start + WARMUP_BARS)] = True
    frame = pd.DataFrame(values, index=ohlcv.index, columns=list(TECHNICAL_FEATURES))
    frame["is_warmup"] = warm
    return frame
