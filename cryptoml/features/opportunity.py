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
"""

from __future__ import annotations

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
    """
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
