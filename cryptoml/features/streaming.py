"""The 19 technical features one closed 1-minute bar at a time, for the edge runner (NumPy + standard library only).

Same definitions, warm-up and gap rule as :mod:`cryptoml.features.technical` (read its docstring for
the formulas): feeding the rows of a frame to :meth:`StreamingFeatures.update` in order gives the rows of
``technical_features(frame)`` to <= 1e-9, ``None`` exactly where the batch row has ``warm = True``.
This module must import without pandas (the runner on a Raspberry Pi has none): it takes only the
constants of ``technical``, whose import does not load pandas.

Cost per bar is bounded by the longest window (60 values), independent of how long the stream runs:
window sums are recomputed from a ring buffer with ``math.fsum`` (exactly rounded) instead of being
updated by add / remove, so no rounding drift accumulates and the state holds no running totals.
:meth:`StreamingFeatures.snapshot` returns the whole state as JSON-able plain types (floats round-trip
exactly through ``json``), and :meth:`StreamingFeatures.restore` continues bit-identically.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from cryptoml.errors import DataValidationError
from cryptoml.features.technical import (
    ACCEL_LAG,
    BAR_MS,
    DIVERGENCE_WINDOW,
    EMA_SPANS,
    HL_MA_WINDOW,
    MACD_FAST,
    MACD_SIGNAL,
    MACD_SLOW,
    MAX_STEP_MS,
    MOMENTUM_WINDOW,
    RETURN_LAGS,
    RSI_PERIOD,
    TECHNICAL_FEATURES,
    VOL_WINDOWS,
    VOLUME_WINDOW,
    VWAP_WINDOW,
    WARMUP_BARS,
    ema_alpha,
)

__all__ = ["SNAPSHOT_VERSION", "StreamingFeatures"]

SNAPSHOT_VERSION = 1

_fsum = math.fsum
_VOL_SHORT, _VOL_LONG = VOL_WINDOWS
_LAG_MAX = max(RETURN_LAGS)
_FAST, _SLOW = EMA_SPANS.index(MACD_FAST), EMA_SPANS.index(MACD_SLOW)
_SIGNAL_SEED_ROW = MACD_SLOW - 1 + MACD_SIGNAL - 1  # bar 33: the 9th MACD value seeds the signal line
_SIGNAL_ALPHA = ema_alpha(MACD_SIGNAL)
_RSI_ALPHA = 1.0 / RSI_PERIOD
# (span, alpha, 1 - alpha): the update ``(1 - alpha) * ema + alpha * close`` is pandas' adjust=False EWM, bit for bit
_EMA_CONSTANTS = tuple((span, ema_alpha(span), 1.0 - ema_alpha(span)) for span in EMA_SPANS)

# Ring buffers (name -> length): the last values of each windowed series, oldest first.
_RINGS: dict[str, int] = {
    "closes": max(EMA_SPANS),  # the EMA seeds are the means of the first 12 / 26 / 60 closes
    "momentum_closes": MOMENTUM_WINDOW,
    "log_closes": _LAG_MAX + 1,  # ln c_{t-60} .. ln c_t
    "rets_short": _VOL_SHORT,
    "rets_long": _VOL_LONG,
    "typical": VWAP_WINDOW,
    "typical_x_volume": VWAP_WINDOW,
    "volumes": VOLUME_WINDOW,
    "hl_spreads": HL_MA_WINDOW,
    "divergence_scores": DIVERGENCE_WINDOW,
}
_SCALARS = ("bars", "prev_close", "prev_volume", "signal", "avg_gain", "avg_loss")
_LISTS = ("emas", "signal_seed", "gain_seed", "loss_seed")


def _std(window: deque[float], n: int) -> float:
    """Two-pass sample std (ddof = 1), the same arithmetic as the batch ``_rolling_std``."""
    mean = _fsum(window) / n
    return math.sqrt(_fsum([(x - mean) * (x - mean) for x in window]) / (n - 1))


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


class StreamingFeatures:
    """Incremental technical features of one symbol's closed 1-minute bars.

    ``update`` takes each bar once, in ``ts_ms`` order (bar open time, epoch ms), after it has closed, and
    returns the 19 features of that bar (float64, :data:`TECHNICAL_FEATURES` order) or ``None`` during
    warm-up. ``warm`` is True once the latest bar produced a vector (note: the batch frame's ``warm``
    column means the opposite, "this row is a warm-up row"). A step of more than ``MAX_STEP_MS`` between
    bars starts a new warm-up; an out-of-order, duplicate or off-grid bar raises and leaves the state as
    it was.
    """

    def __init__(self) -> None:
        self._last_ts_ms: int | None = None
        self._new_segment()

    def _new_segment(self) -> None:
        # Scalars start at 0.0 and are read only once the bar count says they are seeded.
        self._bars = 0  # bars seen in the current segment
        self._prev_close = 0.0
        self._prev_volume = 0.0
        self._emas = [0.0] * len(EMA_SPANS)
        self._signal_seed: list[float] = []
        self._signal = 0.0
        self._gain_seed: list[float] = []
        self._loss_seed: list[float] = []
        self._avg_gain = 0.0
        self._avg_loss = 0.0
        # the ring buffers of _RINGS (snapshot / restore walk that table by name)
        self._closes: deque[float] = deque(maxlen=_RINGS["closes"])
        self._momentum_closes: deque[float] = deque(maxlen=_RINGS["momentum_closes"])
        self._log_closes: deque[float] = deque(maxlen=_RINGS["log_closes"])
        self._rets_short: deque[float] = deque(maxlen=_RINGS["rets_short"])
        self._rets_long: deque[float] = deque(maxlen=_RINGS["rets_long"])
        self._typical: deque[float] = deque(maxlen=_RINGS["typical"])
        self._typical_x_volume: deque[float] = deque(maxlen=_RINGS["typical_x_volume"])
        self._volumes: deque[float] = deque(maxlen=_RINGS["volumes"])
        self._hl_spreads: deque[float] = deque(maxlen=_RINGS["hl_spreads"])
        self._divergence_scores: deque[int] = deque(maxlen=_RINGS["divergence_scores"])

    @property
    def warm(self) -> bool:
        """True once every feature is defined (the latest ``update`` returned a vector)."""
        return self._bars > WARMUP_BARS

    @property
    def last_ts_ms(self) -> int | None:
        """Open time of the latest accepted bar, or None before the first."""
        return self._last_ts_ms

    @property
    def bars_in_segment(self) -> int:
        """Bars seen since the start or since the last gap reset."""
        return self._bars

    def _check(self, ts_ms: int, bar: tuple[float, float, float, float, float]) -> tuple[int, list[float]]:
        try:
            ts = operator.index(ts_ms)
        except TypeError as e:
            raise DataValidationError(f"streaming features: ts_ms must be an integer epoch ms, got {ts_ms!r}") from e
        try:
            values = [float(x) for x in bar]
        except (TypeError, ValueError) as e:
            raise DataValidationError(f"streaming features: bar at ts_ms={ts} has a non-numeric value {bar!r}") from e
        for name, x in zip(("open", "high", "low", "close", "volume"), values, strict=True):
            if not math.isfinite(x) or x < 0 or (x == 0 and name != "volume"):
                need = "finite and >= 0" if name == "volume" else "finite and > 0"
                raise DataValidationError(f"streaming features: {name} must be {need}, got {x} at ts_ms={ts}")
        if values[1] < values[2]:
            raise DataValidationError(f"streaming features: high {values[1]} < low {values[2]} at ts_ms={ts}")
        if self._last_ts_ms is not None:
            step = ts - self._last_ts_ms
            if step <= 0:
                raise DataValidationError(
                    f"streaming features: out-of-order bar ts_ms={ts} is not after the last bar "
                    f"ts_ms={self._last_ts_ms} (bars must arrive once each, in time order)"
                )
            if step % BAR_MS:
                raise DataValidationError(
                    f"streaming features: bar ts_ms={ts} is {step} ms after the last bar; "
                    f"steps must be multiples of {BAR_MS} ms (1-minute bars)"
                )
        return ts, values

    def update(
        self, ts_ms: int, open: float, high: float, low: float, close: float, volume: float
    ) -> np.ndarray | None:
        """Add the closed bar that opened at ``ts_ms``; its 19 features (float64) or None while warming up."""
        ts, (_, h, lo, c, v) = self._check(ts_ms, (open, high, low, close, volume))
        if self._last_ts_ms is not None and ts - self._last_ts_ms > MAX_STEP_MS:
            self._new_segment()
        self._last_ts_ms = ts
        i = self._bars
        self._bars = i + 1
        prev_c, prev_v = self._prev_close, self._prev_volume
        self._prev_close, self._prev_volume = c, v

        closes = self._closes
        closes.append(c)
        self._momentum_closes.append(c)
        emas = self._emas
        for k, (span, alpha, keep) in enumerate(_EMA_CONSTANTS):
            if i >= span:
                emas[k] = keep * emas[k] + alpha * c
            elif i == span - 1:
                emas[k] = _fsum(closes) / span
        if i >= MACD_SLOW - 1:
            macd = emas[_FAST] - emas[_SLOW]
            if i < _SIGNAL_SEED_ROW:
                self._signal_seed.append(macd)
            elif i == _SIGNAL_SEED_ROW:
                self._signal_seed.append(macd)
                self._signal = _fsum(self._signal_seed) / MACD_SIGNAL
            else:
                self._signal = (1.0 - _SIGNAL_ALPHA) * self._signal + _SIGNAL_ALPHA * macd

        log_c = math.log(c)
        log_closes = self._log_closes
        log_closes.append(log_c)
        if i > 0:
            r = log_c - log_closes[-2]
            self._rets_short.append(r)
            self._rets_long.append(r)
            diff = c - prev_c
            gain = diff if diff > 0 else 0.0
            loss = -diff if diff < 0 else 0.0
            if i < RSI_PERIOD:
                self._gain_seed.append(gain)
                self._loss_seed.append(loss)
            elif i == RSI_PERIOD:
                self._gain_seed.append(gain)
                self._loss_seed.append(loss)
                self._avg_gain = _fsum(self._gain_seed) / RSI_PERIOD
                self._avg_loss = _fsum(self._loss_seed) / RSI_PERIOD
            else:
                self._avg_gain = (1.0 - _RSI_ALPHA) * self._avg_gain + _RSI_ALPHA * gain
                self._avg_loss = (1.0 - _RSI_ALPHA) * self._avg_loss + _RSI_ALPHA * loss
            self._divergence_scores.append(-_sign(diff) * _sign(v - prev_v))

        typical = (h + lo + c) / 3.0
        self._typical.append(typical)
        self._typical_x_volume.append(typical * v)
        self._volumes.append(v)
        hl = (h - lo) / c
        self._hl_spreads.append(hl)

        if i < WARMUP_BARS:
            return None
        return self._vector(c, v, log_c, hl)

    def _vector(self, c: float, v: float, log_c: float, hl: float) -> np.ndarray:
        emas = self._emas
        macd = emas[_FAST] - emas[_SLOW]
        sum_v = _fsum(self._volumes)
        mean_tp = _fsum(self._typical) / VWAP_WINDOW
        vwap = _fsum(self._typical_x_volume) / sum_v if sum_v > 0 else mean_tp
        mean_v = sum_v / VOLUME_WINDOW
        lc = self._log_closes
        ret_5 = log_c - lc[-1 - ACCEL_LAG]
        avg_gain, avg_loss = self._avg_gain, self._avg_loss
        total = avg_gain + avg_loss
        return np.array(
            [
                *(c / e - 1.0 for e in emas),
                (macd - self._signal) / c,
                c / vwap - 1.0,
                vwap / mean_tp - 1.0,
                c / (_fsum(self._momentum_closes) / MOMENTUM_WINDOW) - 1.0,
                *(log_c - lc[-1 - lag] for lag in RETURN_LAGS),
                100.0 * avg_gain / total if total > 0 else 50.0,
                ret_5 - (lc[-1 - ACCEL_LAG] - lc[-1 - 2 * ACCEL_LAG]),
                _std(self._rets_short, _VOL_SHORT),
                _std(self._rets_long, _VOL_LONG),
                hl,
                _fsum(self._hl_spreads) / HL_MA_WINDOW,
                v / mean_v if mean_v > 0 else 1.0,
                sum(self._divergence_scores) / DIVERGENCE_WINDOW,
            ],
            dtype=np.float64,
        )

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain JSON-able types (ints, floats, None, lists); see :meth:`restore`."""
        state: dict[str, Any] = {
            "version": SNAPSHOT_VERSION,
            "features": list(TECHNICAL_FEATURES),
            "last_ts_ms": self._last_ts_ms,
        }
        for name in _SCALARS:
            state[name] = getattr(self, f"_{name}")
        for name in _LISTS:
            state[name] = list(getattr(self, f"_{name}"))
        for name in _RINGS:
            state[name] = list(getattr(self, f"_{name}"))
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace the state with a :meth:`snapshot` (e.g. read back from JSON after a crash)."""
        if state.get("version") != SNAPSHOT_VERSION or list(state.get("features", ())) != list(TECHNICAL_FEATURES):
            raise DataValidationError(
                f"streaming features: snapshot version {state.get('version')!r} / feature list does not match "
                f"this code (version {SNAPSHOT_VERSION}, {len(TECHNICAL_FEATURES)} features): start a fresh warm-up"
            )
        fresh = StreamingFeatures()
        try:
            last = state["last_ts_ms"]
            fresh._last_ts_ms = None if last is None else operator.index(last)
            for name in _SCALARS:
                setattr(fresh, f"_{name}", operator.index(state[name]) if name == "bars" else float(state[name]))
            fresh._emas = [float(x) for x in state["emas"]]
            for name in ("signal_seed", "gain_seed", "loss_seed"):
                setattr(fresh, f"_{name}", [float(x) for x in state[name]])
            for name, length in _RINGS.items():
                values = list(state[name])
                if len(values) > length:
                    raise ValueError(f"{name} holds {len(values)} values, more than its window {length}")
                cast = int if name == "divergence_scores" else float
                setattr(fresh, f"_{name}", deque((cast(x) for x in values), maxlen=length))
        except (KeyError, TypeError, ValueError) as e:
            raise DataValidationError(f"streaming features: corrupt snapshot ({type(e).__name__}: {e})") from e
        if len(fresh._emas) != len(EMA_SPANS) or fresh._bars < 0:
            raise DataValidationError("streaming features: corrupt snapshot (wrong EMA count or negative bar count)")
        self.__dict__.update(fresh.__dict__)

    @classmethod
    def from_snapshot(cls, state: Mapping[str, Any]) -> StreamingFeatures:
        """A new instance continuing from ``state``."""
        features = cls()
        features.restore(state)
        return features
