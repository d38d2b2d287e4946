"""Entry-time features of a funding-arbitrage opportunity, for the profit / success / hold models.

Every feature is computed from the opportunity row alone, i.e. from information known at the entry
snapshot ``ts_ms`` (see the "Opportunities" table of the data contract) plus the candidate
``hold_hours``. The function reads only the columns in :data:`INPUT_COLUMNS`; the simulated outputs
(``actual_*``, ``was_profitable``, ``peak_profit_pct``, ...) are never read, so the features cannot leak
the label. The core is :func:`feature_matrix`, NumPy only, so the edge runner can compute the very same
features without pandas; :func:`opportunity_features` is the DataFrame wrapper used in training.

Units: ``funding_spread*`` are fractions per funding interval (8 h), momenta are reported in bps per
interval (x 1e4), ``fund_apr`` in percent per year, ``bid_ask_spread_pct`` in percent, USD columns in USD,
``ret_vol_24h`` is the std of 1-minute log returns (fraction).

Feature table (in :data:`FEATURE_NAMES` order) -- formula; value in the degenerate / zero case:

===========================  =================================================  ==============================
feature                      formula                                            degenerate case -> value
===========================  =================================================  ==============================
hold_hours                   candidate hold, hours                              must be finite and > 0 (error)
fund_apr                     as given, % per year                               must be finite (error)
fund_profit_8h               as given, % per 8 h                                must be finite (error)
break_even_hours             min(break_even_hours, 1000)                        NaN/inf/<0 -> 1000 (the cap)
hold_minus_break_even_hours  hold_hours - break_even_hours (capped)             --
projected_funding_pct        fund_profit_8h * hold_hours / 8                    --
funding_spread_bps           funding_spread * 1e4                               must be finite (error)
spread_avg_24h_bps           funding_spread_avg_24h * 1e4                       NaN -> funding_spread
spread_avg_3d_bps            funding_spread_avg_3d * 1e4                        NaN -> funding_spread
momentum_24h_bps             (funding_spread - avg_24h) * 1e4                   NaN avg -> 0
momentum_3d_bps              (funding_spread - avg_3d) * 1e4                    NaN avg -> 0
trend_score_bps              sign * min(|m24|, |m3d|) if signs agree, else 0    a momentum of 0 -> 0
spread_volatility_cv         min(cv, 10)                                        NaN/inf/<0 -> 10 (the cap)
rate_stability               1 / (1 + cv capped)                                cv NaN/inf -> 1/11
price_vol_daily_pct          ret_vol_24h * sqrt(1440) * 100                     NaN/<0 -> 0
volatility_risk              price_vol_daily_pct / 3 + cv capped                (sum of the two above)
volume_adequacy              log10(max(volume_24h, 1) / 1e6)                    volume <= 0 or NaN -> -6
log_depth_usd                log10(1 + depth_usd)                               depth <= 0 or NaN -> 0
bid_ask_spread_pct           as given, %                                        NaN/<0 -> 0
liquidity_score              min(log_depth / 6, 2) / (1 + spread_pct / 0.05)    zero depth -> 0
depth_is_proxy               1.0 if the depth is a volume proxy else 0.0        NaN/None -> 1.0
hours_to_next_funding        clip((next_funding_ts_ms - ts_ms) / 3.6e6, 0, 24)  NaN/past -> 0
hour_sin, hour_cos           sin/cos(2 pi * UTC hour of day (fractional) / 24)  --
weekday_sin, weekday_cos     sin/cos(2 pi * UTC weekday (Mon = 0) / 7)          --
strategy_spot_perp           1.0 if strategy == 'spot_perp' else 0.0            unknown strategy -> error
strategy_cross_exchange      1.0 if strategy == 'cross_exchange' else 0.0       unknown strategy -> error
regime_bull                  1.0 if regime == 'Bull' else 0.0                   unknown regime -> error
regime_bear                  1.0 if regime == 'Bear' else 0.0                   unknown regime -> error
regime_ranging               1.0 if regime == 'Ranging' else 0.0                unknown regime -> error
btc_ret_trailing             as given, fraction                                 NaN -> 0
profit_x_liquidity           fund_apr * liquidity_score                         zero depth -> 0
risk_adjusted_apr            fund_apr / (1 + volatility_risk)                   denominator >= 1 always
===========================  =================================================  ==============================

Reference constants (documented choices, not fitted): volume reference 1e6 USD (the default minimum
24 h volume of the detector), depth reference 1e6 USD (log10 = 6), spread reference 0.05 %, daily price
volatility reference 3 % (a typical BTC day), cv cap 10, break-even cap 1000 h (about 6 weeks: far
beyond the longest simulated hold, so the cap never changes a ranking between feasible holds).

Two paths, one result: up to :data:`SMALL_ROWS` rows (the API and the edge runner score one entry at the
9 holds of the grid) :func:`feature_matrix` works on Python floats, where NumPy's per-call overhead would
dominate; more rows (training) take the vectorised NumPy path. The small path does the same IEEE
operations in the same order (``+ - * /`` and ``sqrt`` are correctly rounded either way; ``log10``,
``sin`` and ``cos`` are taken from NumPy in one call each, as libm and NumPy's SIMD ``log10`` differ in
the last bit), so both give the same bits; a case whose bits depend on how NumPy orders signed zeros
(a ``-0.0`` bid/ask spread or time to the next funding), and every error, is handed to the NumPy path.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cryptoml.errors import DataValidationError

if TYPE_CHECKING:
    import pandas as pd

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
BREAK_EVEN_CAP_HOURS = 1000.0
CV_CAP = 10.0
VOLUME_REF_USD = 1e6
DEPTH_REF_LOG10 = 6.0  # log10(1e6 USD)
SPREAD_REF_PCT = 0.05
PRICE_VOL_REF_PCT = 3.0
NEXT_FUNDING_CAP_HOURS = 24.0
STRATEGIES = ("spot_perp", "cross_exchange")
REGIMES = ("Bull", "Bear", "Ranging")

# The only columns the features read: all known at the entry snapshot.
INPUT_COLUMNS: tuple[str, ...] = (
    "ts_ms",
    "hold_hours",
    "strategy",
    "regime",
    "fund_apr",
    "fund_profit_8h",
    "break_even_hours",
    "funding_spread",
    "funding_spread_avg_24h",
    "funding_spread_avg_3d",
    "spread_volatility_cv",
    "ret_vol_24h",
    "volume_24h",
    "orderbook_depth_usd",
    "bid_ask_spread_pct",
    "depth_is_proxy",
    "next_funding_ts_ms",
    "btc_ret_trailing",
)

FEATURE_NAMES: tuple[str, ...] = (
    "hold_hours",
    "fund_apr",
    "fund_profit_8h",
    "break_even_hours",
    "hold_minus_break_even_hours",
    "projected_funding_pct",
    "funding_spread_bps",
    "spread_avg_24h_bps",
    "spread_avg_3d_bps",
    "momentum_24h_bps",
    "momentum_3d_bps",
    "trend_score_bps",
    "spread_volatility_cv",
    "rate_stability",
    "price_vol_daily_pct",
    "volatility_risk",
    "volume_adequacy",
    "log_depth_usd",
    "bid_ask_spread_pct",
    "liquidity_score",
    "depth_is_proxy",
    "hours_to_next_funding",
    "hour_sin",
    "hour_cos",
    "weekday_sin",
    "weekday_cos",
    "strategy_spot_perp",
    "strategy_cross_exchange",
    "regime_bull",
    "regime_bear",
    "regime_ranging",
    "btc_ret_trailing",
    "profit_x_liquidity",
    "risk_adjusted_apr",
)

# Features that change with the candidate hold; the hold-duration model (one row per entry) omits them.
HOLD_FEATURES: tuple[str, ...] = ("hold_hours", "hold_minus_break_even_hours", "projected_funding_pct")
ENTRY_FEATURE_NAMES: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if n not in HOLD_FEATURES)

_REQUIRED_FINITE = ("ts_ms", "hold_hours", "fund_apr", "fund_profit_8h", "funding_spread")


def _num(cols: Mapping[str, Any], name: str) -> np.ndarray:
    try:
        return np.asarray(cols[name], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"opportunity features: column {name!r} is not numeric: {e}") from e


def _fill(x: np.ndarray, bad: np.ndarray, value: float | np.ndarray) -> np.ndarray:
    return np.where(bad, value, x)


def _one_hot(values: np.ndarray, name: str, levels: tuple[str, ...]) -> list[np.ndarray]:
    unknown = sorted({str(v) for v in np.unique(values.astype(str))} - set(levels))
    if unknown:
        raise DataValidationError(
            f"opportunity features: column {name!r} has unknown values {unknown}; expected one of {list(levels)}"
        )
    return [(values == level).astype(np.float64) for level in levels]


def feature_matrix(cols: Mapping[str, Any]) -> np.ndarray:
    """Features of n opportunities as a float64 array of shape (n, len(FEATURE_NAMES)), no NaN/inf.

    ``cols`` maps each name of :data:`INPUT_COLUMNS` to a length-n array (or list); other keys are
    ignored. Raises :class:`DataValidationError` on a missing column, a non-finite required value
    (ts_ms, hold_hours, fund_apr, fund_profit_8h, funding_spread), a hold <= 0 or an unknown
    strategy/regime label. Degenerate values get the documented substitutes of the module table.
    Up to :data:`SMALL_ROWS` rows are computed on Python floats, bit-identical to the NumPy path.
    """
    out = _small_feature_matrix(cols)
    return _numpy_feature_matrix(cols) if out is None else out


def _numpy_feature_matrix(cols: Mapping[str, Any]) -> np.ndarray:
    """:func:`feature_matrix` vectorised with NumPy: the reference arithmetic, and the path of training."""
    missing = [c for c in INPUT_COLUMNS if c not in cols]
    if missing:
        raise DataValidationError(f"opportunity features: missing input columns {missing}")
    for name in _REQUIRED_FINITE:
        bad = ~np.isfinite(_num(cols, name))
        if bad.any():
            raise DataValidationError(f"opportunity features: column {name!r} has {int(bad.sum())} non-finite values")
    ts_ms = _num(cols, "ts_ms")
    hold = _num(cols, "hold_hours")
    if (hold <= 0).any():
        raise DataValidationError("opportunity features: hold_hours must be > 0")
    fund_apr = _num(cols, "fund_apr")
    fund_8h = _num(cols, "fund_profit_8h")
    spread = _num(cols, "funding_spread")

    be = _num(cols, "break_even_hours")
    be = np.minimum(_fill(be, ~np.isfinite(be) | (be < 0), BREAK_EVEN_CAP_HOURS), BREAK_EVEN_CAP_HOURS)

    avg24 = _num(cols, "funding_spread_avg_24h")
    avg24 = _fill(avg24, ~np.isfinite(avg24), spread)
    avg3d = _num(cols, "funding_spread_avg_3d")
    avg3d = _fill(avg3d, ~np.isfinite(avg3d), spread)
    m24 = (spread - avg24) * 1e4
    m3d = (spread - avg3d) * 1e4
    agree = np.sign(m24) * np.sign(m3d) > 0
    trend = np.where(agree, np.sign(m24) * np.minimum(np.abs(m24), np.abs(m3d)), 0.0)

    cv = _num(cols, "spread_volatility_cv")
    cv = np.minimum(_fill(cv, ~np.isfinite(cv) | (cv < 0), CV_CAP), CV_CAP)
    stability = 1.0 / (1.0 + cv)
    ret_vol = _num(cols, "ret_vol_24h")
    vol_daily_pct = _fill(ret_vol, ~np.isfinite(ret_vol) | (ret_vol < 0), 0.0) * np.sqrt(1440.0) * 100.0
    vol_risk = vol_daily_pct / PRICE_VOL_REF_PCT + cv

    volume = _num(cols, "volume_24h")
    volume = _fill(volume, ~np.isfinite(volume), 0.0)
    volume_adequacy = np.log10(np.maximum(volume, 1.0) / VOLUME_REF_USD)
    depth = _num(cols, "orderbook_depth_usd")
    log_depth = np.log10(1.0 + np.maximum(_fill(depth, ~np.isfinite(depth), 0.0), 0.0))
    ba = _num(cols, "bid_ask_spread_pct")
    ba = np.maximum(_fill(ba, ~np.isfinite(ba), 0.0), 0.0)
    liquidity = np.minimum(log_depth / DEPTH_REF_LOG10, 2.0) / (1.0 + ba / SPREAD_REF_PCT)
    proxy = _num(cols, "depth_is_proxy")
    proxy = _fill(proxy, ~np.isfinite(proxy), 1.0)

    next_f = _num(cols, "next_funding_ts_ms")
    to_next = np.clip(_fill((next_f - ts_ms) / MS_PER_HOUR, ~np.isfinite(next_f), 0.0), 0.0, NEXT_FUNDING_CAP_HOURS)
    hour = (ts_ms % MS_PER_DAY) / MS_PER_HOUR
    weekday = (np.floor(ts_ms / MS_PER_DAY) + 3.0) % 7.0  # 1970-01-01 was a Thursday (Mon = 0)
    btc_ret = _num(cols, "btc_ret_trailing")
    btc_ret = _fill(btc_ret, ~np.isfinite(btc_ret), 0.0)

    strategy = _one_hot(np.asarray(cols["strategy"]), "strategy", STRATEGIES)
    regime = _one_hot(np.asarray(cols["regime"]), "regime", REGIMES)

    columns = [
        hold,
        fund_apr,
        fund_8h,
        be,
        hold - be,
        fund_8h * hold / 8.0,
        spread * 1e4,
        avg24 * 1e4,
        avg3d * 1e4,
        m24,
        m3d,
        trend,
        cv,
        stability,
        vol_daily_pct,
        vol_risk,
        volume_adequacy,
        log_depth,
        ba,
        liquidity,
        proxy,
        to_next,
        np.sin(2 * np.pi * hour / 24.0),
        np.cos(2 * np.pi * hour / 24.0),
        np.sin(2 * np.pi * weekday / 7.0),
        np.cos(2 * np.pi * weekday / 7.0),
        *strategy,
        *regime,
        btc_ret,
        fund_apr * liquidity,
        fund_apr / (1.0 + vol_risk),
    ]
    if len(columns) != len(FEATURE_NAMES):  # guards the hand-kept order above
        raise AssertionError("feature_matrix columns out of sync with FEATURE_NAMES")
    # Filled column by column: for one row (the API, the runner) this is ~2.5x faster than column_stack.
    out = np.empty((ts_ms.size, len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        out[:, j] = column
    if not np.isfinite(out).all():
        bad = [FEATURE_NAMES[j] for j in np.flatnonzero(~np.isfinite(out).all(axis=0))]
        raise DataValidationError(f"opportunity features: non-finite values in {bad} (check input magnitudes)")
    return out


# --- small-row path ----------------------------------------------------------------------------------

# Limits of the Python path: beyond them NumPy's per-element speed wins over its per-call overhead.
SMALL_ROWS = 128  # rows (an entry repeated at each hold of the grid costs ~1 us per row)...
SMALL_ENTRIES = 16  # ...and distinct entry snapshots among them (each costs a few microseconds)

_LABELS = ("strategy", "regime")
_NUMERIC = tuple(c for c in INPUT_COLUMNS if c not in _LABELS)  # ts_ms, hold_hours, fund_apr, ...
_ONE_HOT = {
    "strategy": {s: tuple(1.0 if s == t else 0.0 for t in STRATEGIES) for s in STRATEGIES},
    "regime": {r: tuple(1.0 if r == t else 0.0 for t in REGIMES) for r in REGIMES},
}
# An entry's numeric inputs as their exact bits: a dict key on the floats would merge 0.0 and -0.0.
_PACK_ENTRY = struct.Struct(f"<{len(_NUMERIC) - 1}d").pack
_TWO_PI = 2 * np.pi  # the NumPy path's `2 * np.pi * x / d` is (2 pi * x) / d
_SQRT_1440 = float(np.sqrt(1440.0))
_INF = math.inf
_FLOAT64 = np.dtype(np.float64)
# The small path writes the first six features by position: hold, apr, profit 8 h, break-even, and the two
# hold-dependent ones (hold_minus_break_even_hours = 4, projected_funding_pct = 5).
if FEATURE_NAMES[:6] != ("hold_hours", "fund_apr", "fund_profit_8h", "break_even_hours", *HOLD_FEATURES[1:]):
    raise AssertionError("the small-row path's column positions are out of sync with FEATURE_NAMES")


def _float_list(values: Any) -> list[float] | None:
    """``values`` as the Python floats ``np.asarray(values, dtype=np.float64)`` holds, when 1-D and short."""
    if type(values) is np.ndarray and values.dtype is _FLOAT64 and values.ndim == 1:  # the usual case, first
        return values.tolist() if values.size <= SMALL_ROWS else None
    if type(values) is list and len(values) <= SMALL_ROWS and all(type(x) is float for x in values):
        return values
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    if arr.ndim != 1 or arr.size > SMALL_ROWS:  # checked before tolist: a training column is long
        return None
    out: list[float] = arr.tolist()
    return out


def _small_inputs(cols: Mapping[str, Any]) -> tuple[list[list[float]], list[list[str]]] | None:
    """The numeric inputs (in :data:`_NUMERIC` order) as lists of Python floats and the two label columns
    as lists of str, all of one length 1..SMALL_ROWS; None for anything else (missing, 2-D, broadcast)."""
    numeric: list[list[float]] = []
    for name in _NUMERIC:
        values = _float_list(cols.get(name))
        if values is None:  # also a missing column (np.asarray(None) is 0-d)
            return None
        numeric.append(values)
        # More distinct ts_ms, or (ts_ms, fund_apr) pairs, than entries allowed: stop before converting the rest.
        if name == "ts_ms" and len(set(values)) > SMALL_ENTRIES:
            return None
        if name == "fund_apr" and len(set(zip(numeric[0], values, strict=False))) > SMALL_ENTRIES:
            return None
    n = len(numeric[0])
    if any(len(values) != n for values in numeric):
        return None
    labels: list[list[str]] = []
    for name in _LABELS:
        v: Any = cols.get(name)
        if isinstance(v, np.ndarray):
            v = v.tolist() if v.ndim == 1 else None
        if type(v) not in (list, tuple) or len(v) != n or not all(type(x) is str for x in v):
            return None
        labels.append(list(v))
    return (numeric, labels) if n else None


def _small_feature_matrix(cols: Mapping[str, Any]) -> np.ndarray | None:
    """:func:`_numpy_feature_matrix` on Python floats, or None to defer to it (beyond the limits, other
    shapes or types, any error, a signed-zero case). Each expression mirrors its NumPy counterpart
    operation by operation; tests check that the two agree bit for bit."""
    inputs = _small_inputs(cols)
    if inputs is None:
        return None
    numeric, (strategies, regimes) = inputs
    holds = numeric[1]
    if not all(0.0 < h < _INF for h in holds):
        return None
    # The API and the runner repeat one entry at every hold of the grid: its hold-free part is computed once.
    columns: list[list[Any]] = [numeric[0], *numeric[2:], strategies, regimes]  # 15 floats, strategy, regime
    entries: list[tuple[Any, ...]] = []
    slots: list[int] = []
    if all(_constant(column) for column in columns):
        entries, slots = [tuple(column[0] for column in columns)], [0] * len(holds)
    else:  # keyed by the exact bits of the floats: a tuple of floats would merge 0.0 and -0.0
        slot_of: dict[tuple[bytes, str, str], int] = {}
        for entry in zip(*columns, strict=True):
            key = (_PACK_ENTRY(*entry[:-2]), entry[-2], entry[-1])
            slot = slot_of.get(key, -1)
            if slot < 0:
                if len(entries) == SMALL_ENTRIES:
                    return None
                slot = slot_of[key] = len(entries)
                entries.append(entry)
            slots.append(slot)
    rows = _entry_rows(entries)
    if rows is None:
        return None
    # The hold columns of each row as the NumPy path computes them: hold, hold - be, fund_8h * hold / 8.
    hold_minus_be = [hold - rows[u][3] for hold, u in zip(holds, slots, strict=True)]
    projected = [rows[u][2] * hold / 8.0 for hold, u in zip(holds, slots, strict=True)]
    if not _all_finite([*rows, projected]):  # hold - be is finite: hold is, and 0 <= be <= 1000
        return None  # the NumPy path names the non-finite features
    out = np.array(rows, dtype=np.float64)
    if len(entries) < len(holds):
        out = out[slots]
    out[:, 0] = holds
    out[:, 4] = hold_minus_be
    out[:, 5] = projected
    return out


def _constant(column: list[Any]) -> bool:
    """Whether every value of ``column`` has the bits of the first (list.count is exact but for 0.0 == -0.0;
    NaNs match only as the same object, which then has the same bits)."""
    first = column[0]
    if column.count(first) != len(column):
        return False
    return first != 0.0 or len({math.copysign(1.0, x) for x in column}) == 1


def _all_finite(rows: list[Any]) -> bool:
    """Whether every float in ``rows`` (sequences of floats) is finite; a finite sum says so at once."""
    return math.isfinite(sum(map(sum, rows))) or all(math.isfinite(x) for row in rows for x in row)


def _entry_rows(entries: list[tuple[Any, ...]]) -> list[tuple[float, ...]] | None:
    """One feature row per entry (its 15 floats, strategy, regime; the three hold columns left at 0.0), or
    None to defer to NumPy."""
    k = len(entries)
    heads: list[tuple[float, ...]] = []  # values needed once log10 / sin / cos are known
    log_args = [0.0] * (2 * k)  # volume ratios, then 1 + depth
    angles = [0.0] * (2 * k)  # hour angles, then weekday angles
    for u, entry in enumerate(entries):
        ts, apr, f8, be, spread, avg24, avg3d, cv, ret_vol, volume, depth, ba, proxy, next_f, btc, strategy, regime = (
            entry
        )
        if not (-_INF < ts < _INF and -_INF < apr < _INF and -_INF < f8 < _INF and -_INF < spread < _INF):
            return None
        strategy_hot = _ONE_HOT["strategy"].get(strategy)
        regime_hot = _ONE_HOT["regime"].get(regime)
        if strategy_hot is None or regime_hot is None:
            return None
        if not (-_INF < be < _INF) or be < 0 or be > BREAK_EVEN_CAP_HOURS:
            be = BREAK_EVEN_CAP_HOURS
        if not -_INF < avg24 < _INF:
            avg24 = spread
        if not -_INF < avg3d < _INF:
            avg3d = spread
        m24 = (spread - avg24) * 1e4
        m3d = (spread - avg3d) * 1e4
        if m24 > 0 and m3d > 0:  # sign(m24) * min(|m24|, |m3d|), as the max when both < 0
            trend = m24 if m24 < m3d else m3d
        elif m24 < 0 and m3d < 0:
            trend = m24 if m24 > m3d else m3d
        else:
            trend = 0.0
        if not (-_INF < cv < _INF) or cv < 0 or cv > CV_CAP:
            cv = CV_CAP
        if not (-_INF < ret_vol < _INF) or ret_vol < 0:
            ret_vol = 0.0
        vol_daily_pct = ret_vol * _SQRT_1440 * 100.0
        if not -_INF < volume < _INF:
            volume = 0.0
        if not -_INF < depth < _INF:
            depth = 0.0
        if not -_INF < ba < _INF or ba < 0.0:
            ba = 0.0
        elif ba == 0.0 and math.copysign(1.0, ba) < 0:
            return None  # np.maximum(-0.0, 0.0): which zero comes out is NumPy's choice
        if not -_INF < proxy < _INF:
            proxy = 1.0
        if -_INF < next_f < _INF:
            to_next = (next_f - ts) / MS_PER_HOUR
            if to_next == 0.0 and math.copysign(1.0, to_next) < 0:
                return None  # np.clip(-0.0, 0, 24): as for the spread
            if to_next < 0.0:
                to_next = 0.0
            elif to_next > NEXT_FUNDING_CAP_HOURS:
                to_next = NEXT_FUNDING_CAP_HOURS
        else:
            to_next = 0.0
        if not -_INF < btc < _INF:
            btc = 0.0
        log_args[u] = (volume if volume > 1.0 else 1.0) / VOLUME_REF_USD
        log_args[k + u] = 1.0 + (depth if depth > 0.0 else 0.0)
        angles[u] = _TWO_PI * ((ts % MS_PER_DAY) / MS_PER_HOUR) / 24.0
        angles[k + u] = _TWO_PI * ((math.floor(ts / MS_PER_DAY) + 3.0) % 7.0) / 7.0
        heads.append(
            (
                apr,
                f8,
                be,
                spread,
                avg24,
                avg3d,
                m24,
                m3d,
                trend,
                cv,
                vol_daily_pct,
                ba,
                proxy,
                to_next,
                btc,
                *strategy_hot,
                *regime_hot,
            )
        )

    # libm and NumPy's SIMD log10 differ in the last bit: NumPy's, as in the NumPy path, one call each.
    logs = np.log10(np.array(log_args)).tolist()
    angle_arr = np.array(angles)
    sines, cosines = np.sin(angle_arr).tolist(), np.cos(angle_arr).tolist()
    rows: list[tuple[float, ...]] = []
    for u in range(k):
        apr, f8, be, spread, avg24, avg3d, m24, m3d, trend, cv, vol_daily_pct, ba, proxy, to_next, btc, *hot = heads[u]
        vol_risk = vol_daily_pct / PRICE_VOL_REF_PCT + cv
        log_depth = logs[k + u]
        depth_term = log_depth / DEPTH_REF_LOG10
        liquidity = (depth_term if depth_term < 2.0 else 2.0) / (1.0 + ba / SPREAD_REF_PCT)
        rows.append(
            (
                0.0, apr, f8, be, 0.0, 0.0,
                spread * 1e4, avg24 * 1e4, avg3d * 1e4, m24, m3d, trend, cv, 1.0 / (1.0 + cv), vol_daily_pct,
                vol_risk, logs[u], log_depth, ba, liquidity, proxy, to_next,
                sines[u], cosines[u], sines[k + u], cosines[k + u],
                *hot, btc, apr * liquidity, apr / (1.0 + vol_risk),
            )
        )  # fmt: skip
    return rows


def opportunity_features(table: pd.DataFrame) -> pd.DataFrame:
    """DataFrame wrapper of :func:`feature_matrix`: columns :data:`FEATURE_NAMES`, index of ``table``.

    ``table`` holds one row per opportunity (or simulated position) with at least the columns of
    :data:`INPUT_COLUMNS`; nothing else is read.
    """
    import pandas as pd  # local: the edge runner uses feature_matrix without pandas

    missing = [c for c in INPUT_COLUMNS if c not in table.columns]
    if missing:
        raise DataValidationError(f"opportunity features: missing input columns {missing}")
    cols: dict[str, np.ndarray] = {}
    for c in INPUT_COLUMNS:
        if c in ("strategy", "regime"):
            cols[c] = table[c].astype(str).to_numpy()
            continue
        try:  # nullable dtypes (pd.NA) become NaN and get the documented substitutes
            cols[c] = table[c].to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as e:
            raise DataValidationError(f"opportunity features: column {c!r} is not numeric: {e}") from e
    return pd.DataFrame(feature_matrix(cols), columns=list(FEATURE_NAMES), index=table.index)
