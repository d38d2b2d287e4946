"""Performance metrics of a backtest: returns, risk, drawdowns, trade statistics, and the deflated Sharpe.

numpy and the standard library only (``statistics.NormalDist`` for the normal cdf / quantile).

Conventions shared by every function here:

- **Time**: ``ts_ms`` are UTC epoch milliseconds, strictly increasing, one per bar, spaced ``bar_ms``
  apart (gaps allowed; the median spacing must be ``bar_ms``). ``equity[i]`` is the account value (quote
  currency, e.g. USDT) marked at the close of bar ``i``; ``equity[0]`` is the base the first return is
  measured from (pass the mark just before a period if its first bar's PnL should count).
- **Returns**: per-bar simple returns ``r[i] = equity[i + 1] / equity[i] - 1`` (``n_bars - 1`` of them).
- **Annualisation is 24/7**: crypto trades every minute of the year, so
  ``periods_per_year = 365 * 24 * 3600 * 1000 / bar_ms`` (525,600 for 1-minute bars); a year is 365 days.
- **Undefined is None, never NaN**: a metric whose definition divides by zero or needs more data than
  given is ``None`` (the dicts go straight into JSON). Broken input raises
  :class:`~cryptoml.errors.DataValidationError` naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from cryptoml.errors import DataValidationError

MS_PER_HOUR = 3_600_000
MS_PER_YEAR = 365 * 24 * MS_PER_HOUR  # 24/7 market: a year is every hour of 365 days
EULER_GAMMA = 0.5772156649015329
# A per-bar return standard deviation below this is float noise around zero (a flat or exactly
# constant-growth curve); dividing by it would report a meaningless astronomically large ratio.
STD_EPS = 1e-12

Metric = float | int | None
_NORMAL = NormalDist()


def periods_per_year_of(bar_ms: int) -> float:
    """Bars per 365-day year for a 24/7 market (525,600 for ``bar_ms = 60_000``)."""
    if not isinstance(bar_ms, (int, np.integer)) or isinstance(bar_ms, bool) or bar_ms <= 0:
        raise DataValidationError(f"bar_ms must be a positive integer of milliseconds, got {bar_ms!r}")
    return MS_PER_YEAR / int(bar_ms)


def as_values(name: str, values: Any, *, positive: bool = False) -> np.ndarray:
    """``values`` as a 1-D float64 array of finite numbers (> 0 when ``positive``), or a clear error."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"{name} must be numbers: {e}") from e
    if arr.ndim != 1:
        raise DataValidationError(f"{name} must be one-dimensional, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataValidationError(f"{name} holds NaN/inf at index {int(bad[0])} ({bad.size} such values)")
    if positive and arr.size and (arr <= 0).any():
        i = int(np.flatnonzero(arr <= 0)[0])
        raise DataValidationError(f"{name} must be > 0 everywhere, got {arr[i]!r} at index {i}")
    return arr


def as_equity_curve(ts_ms: Any, equity: Any, *, bar_ms: int = 60_000) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(ts_ms int64, equity float64)``: same length >= 1, ts strictly increasing, equity > 0.

    The median spacing of ``ts_ms`` must equal ``bar_ms``: annualising 1-hour marks as 1-minute bars would
    silently inflate the Sharpe ratio by sqrt(60).
    """
    ts = np.asarray(ts_ms)
    if ts.size == 0:
        raise DataValidationError("ts_ms is empty: need at least one bar")
    if ts.ndim != 1 or ts.dtype.kind not in "iu":
        raise DataValidationError(f"ts_ms must be a 1-D integer array of epoch ms, got dtype {ts.dtype}, {ts.shape}")
    eq = as_values("equity", equity, positive=True)
    if ts.size != eq.size:
        raise DataValidationError(f"ts_ms and equity differ in length: {ts.size} vs {eq.size}")
    ts = ts.astype(np.int64)
    step = np.diff(ts)
    if (step <= 0).any():
        i = int(np.flatnonzero(step <= 0)[0])
        raise DataValidationError(f"ts_ms must be strictly increasing: ts_ms[{i + 1}]={ts[i + 1]} <= {ts[i]}")
    periods_per_year_of(bar_ms)
    if step.size and int(np.median(step)) != bar_ms:
        raise DataValidationError(f"ts_ms spacing (median {int(np.median(step))} ms) does not match bar_ms={bar_ms}")
    return ts, eq


def bar_returns(equity: np.ndarray) -> np.ndarray:
    """Per-bar simple returns ``equity[1:] / equity[:-1] - 1`` (fraction)."""
    return equity[1:] / equity[:-1] - 1.0


def sharpe_ratio(returns: np.ndarray, periods_per_year: float = 1.0) -> float | None:
    """``mean(r) / std(r, ddof=1) * sqrt(periods_per_year)``, zero risk-free rate.

    ``periods_per_year = 1`` gives the per-period Sharpe. None with fewer than 2 returns or a standard
    deviation below :data:`STD_EPS`.
    """
    if returns.size < 2:
        return None
    std = float(np.std(returns, ddof=1))
    if std <= STD_EPS:
        return None
    return float(np.mean(returns)) / std * math.sqrt(periods_per_year)


def sortino_ratio(returns: np.ndarray, periods_per_year: float = 1.0) -> float | None:
    """``mean(r) / DD * sqrt(periods_per_year)`` with target return 0.

    Downside deviation ``DD = sqrt(mean(min(r, 0) ** 2))`` over *all* returns (Sortino & Price: bars above
    the target count as zero shortfall, the denominator is the full count). None with fewer than 2 returns
    or no downside (DD below :data:`STD_EPS`).
    """
    if returns.size < 2:
        return None
    downside = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2)))
    if downside <= STD_EPS:
        return None
    return float(np.mean(returns)) / downside * math.sqrt(periods_per_year)


def drawdown_curve(equity: np.ndarray) -> np.ndarray:
    """Per-bar drawdown ``1 - equity / running_max(equity)`` (fraction, >= 0; 0 at a new high)."""
    return 1.0 - equity / np.maximum.accumulate(equity)


def max_drawdown_duration_ms(ts_ms: np.ndarray, equity: np.ndarray) -> int:
    """Longest underwater spell: from the last bar at the peak to the first bar back at (or above) it.

    An unrecovered drawdown lasts until the last bar. 0 when equity never falls below a previous peak.
    """
    under = equity < np.maximum.accumulate(equity)
    if not under.any():
        return 0
    edges = np.diff(np.concatenate(([0], under.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # ends: first bar not underwater
    recovered = np.minimum(ends, ts_ms.size - 1)
    # starts >= 1 always: bar 0 is its own running maximum, so the peak is the bar before each spell.
    return int(np.max(ts_ms[recovered] - ts_ms[starts - 1]))


def return_moments(returns: np.ndarray) -> tuple[float | None, float | None]:
    """Skewness and Pearson kurtosis (normal = 3, not excess) of ``returns``, population moments.

    ``skew = m3 / m2**1.5``, ``kurtosis = m4 / m2**2`` with ``mk = mean((r - mean(r)) ** k)`` (the biased
    estimators; they always satisfy ``kurtosis >= 1 + skew**2``, which keeps the PSR's denominator real).
    (None, None) with fewer than 2 returns or a standard deviation below :data:`STD_EPS`.
    """
    if returns.size < 2:
        return None, None
    dev = returns - returns.mean()
    m2 = float(np.mean(dev**2))
    if math.sqrt(m2) <= STD_EPS:
        return None, None
    return float(np.mean(dev**3)) / m2**1.5, float(np.mean(dev**4)) / m2**2


def cagr(total_return: float, span_ms: int) -> float | None:
    """Compound annual growth ``(1 + total_return) ** (1 / years) - 1`` with ``years = span_ms / MS_PER_YEAR``.

    None for a zero span or when the extrapolation overflows a float (a huge return over a few hours).
    """
    if span_ms <= 0:
        return None
    try:
        return math.expm1(math.log1p(total_return) * MS_PER_YEAR / span_ms)
    except OverflowError:
        return None


def trade_stats(trade_pnl: Any, trade_entry_notional: Any = None) -> dict[str, Metric]:
    """Statistics of closed round trips; ``trade_pnl`` is each trade's net PnL (quote currency).

    Net = after fees, slippage and funding. A win is PnL > 0, a loss PnL < 0 (a zero-PnL trade is neither
    but counts in ``n_trades``). ``win_rate`` = wins / n_trades; ``profit_factor`` = sum of wins / |sum of
    losses|, **None when there is no loss** (it would be infinite) or no trade; ``expectancy`` = mean net
    PnL per trade; ``expectancy_pct`` = mean of ``100 * pnl / entry_notional`` per trade (only when
    ``trade_entry_notional``, each trade's |qty| * entry price, is given); ``avg_win`` / ``avg_loss`` = mean
    PnL of the wins / losses (``avg_loss`` is negative); ``best_trade`` / ``worst_trade`` = max / min PnL.
    With no trade every statistic but ``n_trades = 0`` is None.
    """
    pnl = as_values("trade_pnl", trade_pnl)
    notional = None
    if trade_entry_notional is not None:
        notional = as_values("trade_entry_notional", trade_entry_notional, positive=True)
        if notional.size != pnl.size:
            raise DataValidationError(
                f"trade_entry_notional and trade_pnl differ in length: {notional.size} vs {pnl.size}"
            )
    wins, losses = pnl[pnl > 0], pnl[pnl < 0]
    has = pnl.size > 0
    return {
        "n_trades": int(pnl.size),
        "win_rate": wins.size / pnl.size if has else None,
        "profit_factor": float(wins.sum()) / -float(losses.sum()) if has and losses.size else None,
        "expectancy": float(pnl.mean()) if has else None,
        "expectancy_pct": float(np.mean(100.0 * pnl / notional)) if has and notional is not None else None,
        "avg_win": float(wins.mean()) if wins.size else None,
        "avg_loss": float(losses.mean()) if losses.size else None,
        "best_trade": float(pnl.max()) if has else None,
        "worst_trade": float(pnl.min()) if has else None,
    }


def exposure(position_qty: Any, n_bars: int) -> float:
    """Fraction of bars whose position (signed base quantity at the bar's close) is non-zero."""
    qty = as_values("position_qty", position_qty)
    if qty.size != n_bars:
        raise DataValidationError(f"position_qty and equity differ in length: {qty.size} vs {n_bars}")
    return float(np.mean(qty != 0.0))


def performance_metrics(
    ts_ms: Any,
    equity: Any,
    *,
    trade_pnl: Any,
    trade_entry_notional: Any = None,
    position_qty: Any = None,
    benchmark_close: Any = None,
    bar_ms: int = 60_000,
    periods_per_year: float | None = None,
) -> dict[str, Metric]:
    """Every report metric of one equity curve (see the module docstring for time and return conventions).

    Curve: ``n_bars``, ``n_returns`` (= n_bars - 1), ``span_hours`` (first to last bar);
    ``total_return`` = equity[-1] / equity[0] - 1; ``cagr`` (see :func:`cagr`, over ``span_hours``);
    ``sharpe`` = mean / sample std (ddof=1) of the per-bar returns * sqrt(periods_per_year), zero risk-free
    rate, and ``sharpe_per_bar`` the same without annualisation (the deflated Sharpe's input);
    ``sortino`` (see :func:`sortino_ratio`); ``max_drawdown`` = max of 1 - equity / running peak (fraction);
    ``max_drawdown_duration_hours`` (see :func:`max_drawdown_duration_ms`); ``calmar`` = cagr / max_drawdown
    over the whole span (None without a drawdown); ``return_skew`` / ``return_kurtosis`` of the per-bar
    returns (see :func:`return_moments`; Pearson kurtosis, normal = 3).

    Trades (``trade_pnl``: net PnL per round trip, quote currency): see :func:`trade_stats` for
    ``n_trades``, ``win_rate``, ``profit_factor`` (None when no losses), ``expectancy``, ``expectancy_pct``,
    ``avg_win``, ``avg_loss``, ``best_trade``, ``worst_trade``.

    ``exposure`` = share of bars with a non-zero ``position_qty`` (None when not given).
    ``buy_hold_total_return`` / ``buy_hold_sharpe``: the same definitions applied to ``benchmark_close`` (a
    price per bar, aligned with ``equity``) as if it were an equity curve (None when not given).

    ``periods_per_year`` defaults to :func:`periods_per_year_of` ``(bar_ms)``.
    """
    ts, eq = as_equity_curve(ts_ms, equity, bar_ms=bar_ms)
    ppy = periods_per_year_of(bar_ms) if periods_per_year is None else float(periods_per_year)
    if not math.isfinite(ppy) or ppy <= 0:
        raise DataValidationError(f"periods_per_year must be a finite number > 0, got {periods_per_year!r}")
    out: dict[str, Metric] = {**_curve_metrics(ts, eq, ppy), **trade_stats(trade_pnl, trade_entry_notional)}
    out["exposure"] = None if position_qty is None else exposure(position_qty, eq.size)
    out["buy_hold_total_return"], out["buy_hold_sharpe"] = _benchmark(benchmark_close, eq.size, ppy)
    return {key: _finite_or_none(value) for key, value in out.items()}


def _curve_metrics(ts: np.ndarray, eq: np.ndarray, ppy: float) -> dict[str, Metric]:
    returns = bar_returns(eq)
    total = float(eq[-1] / eq[0] - 1.0)
    growth = cagr(total, int(ts[-1] - ts[0]))
    mdd = float(drawdown_curve(eq).max())
    skew, kurt = return_moments(returns)
    return {
        "n_bars": int(eq.size),
        "n_returns": int(returns.size),
        "span_hours": float(ts[-1] - ts[0]) / MS_PER_HOUR,
        "total_return": total,
        "cagr": growth,
        "sharpe": sharpe_ratio(returns, ppy),
        "sharpe_per_bar": sharpe_ratio(returns),
        "sortino": sortino_ratio(returns, ppy),
        "max_drawdown": mdd,
        "max_drawdown_duration_hours": max_drawdown_duration_ms(ts, eq) / MS_PER_HOUR,
        "calmar": growth / mdd if growth is not None and mdd > 0 else None,
        "return_skew": skew,
        "return_kurtosis": kurt,
    }


def _benchmark(close: Any, n_bars: int, ppy: float) -> tuple[float | None, float | None]:
    if close is None:
        return None, None
    px = as_values("benchmark_close", close, positive=True)
    if px.size != n_bars:
        raise DataValidationError(f"benchmark_close and equity differ in length: {px.size} vs {n_bars}")
    return float(px[-1] / px[0] - 1.0), sharpe_ratio(bar_returns(px), ppy)


def _finite_or_none(value: Metric) -> Metric:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def in_out_sample_sharpe(is_returns: Any, oos_returns: Any, *, periods_per_year: float) -> dict[str, Metric]:
    """In-sample vs out-of-sample annualised Sharpe of two per-bar simple-return series.

    ``sharpe_in_sample`` / ``sharpe_out_of_sample`` as in :func:`sharpe_ratio`; ``sharpe_oos_is_ratio`` =
    OOS / IS Sharpe (the share of the in-sample edge that survives; None unless IS Sharpe > 0);
    ``n_in_sample`` / ``n_out_of_sample`` count the returns.
    """
    ins, oos = as_values("is_returns", is_returns), as_values("oos_returns", oos_returns)
    if not math.isfinite(periods_per_year) or periods_per_year <= 0:
        raise DataValidationError(f"periods_per_year must be a finite number > 0, got {periods_per_year!r}")
    sr_is, sr_oos = sharpe_ratio(ins, periods_per_year), sharpe_ratio(oos, periods_per_year)
    ratio = sr_oos / sr_is if sr_is is not None and sr_oos is not None and sr_is > 0 else None
    return {
        "sharpe_in_sample": sr_is,
        "sharpe_out_of_sample": sr_oos,
        "sharpe_oos_is_ratio": ratio,
        "n_in_sample": int(ins.size),
        "n_out_of_sample": int(oos.size),
    }


def probabilistic_sharpe_ratio(
    sharpe: float, n_obs: int, skew: float, kurtosis: float, *, benchmark_sharpe: float = 0.0
) -> float:
    """P(true Sharpe > ``benchmark_sharpe``) given an observed Sharpe (Bailey & López de Prado, 2012).

    ``PSR = Φ((SR - SR*) * sqrt(T - 1) / sqrt(1 - skew * SR + (kurtosis - 1) / 4 * SR**2))``.
    Units: ``sharpe`` and ``benchmark_sharpe`` are **per-period** (non-annualised: an annual Sharpe divided
    by sqrt(periods_per_year)), ``n_obs`` = T is the number of returns, ``skew`` and ``kurtosis`` are of
    those returns (Pearson kurtosis: normal = 3). Returns a probability in [0, 1].
    """
    _check_psr_inputs(sharpe, n_obs, skew, kurtosis, benchmark_sharpe)
    var_term = 1.0 - skew * sharpe + (kurtosis - 1.0) / 4.0 * sharpe**2
    if var_term <= 0:
        raise DataValidationError(
            f"PSR undefined: 1 - skew*SR + (kurtosis-1)/4*SR^2 = {var_term:.3g} <= 0 "
            f"(sharpe={sharpe}, skew={skew}, kurtosis={kurtosis}: inconsistent moments)"
        )
    z = (sharpe - benchmark_sharpe) * math.sqrt(n_obs - 1) / math.sqrt(var_term)
    return _NORMAL.cdf(z)


def _check_psr_inputs(sharpe: float, n_obs: int, skew: float, kurtosis: float, benchmark: float) -> None:
    for name, value in (("sharpe", sharpe), ("skew", skew), ("kurtosis", kurtosis), ("benchmark", benchmark)):
        if not math.isfinite(value):
            raise DataValidationError(f"{name} must be finite, got {value!r}")
    if int(n_obs) != n_obs or n_obs < 2:
        raise DataValidationError(f"n_obs must be an integer >= 2 (number of returns), got {n_obs!r}")
    if kurtosis < 1:
        raise DataValidationError(f"kurtosis is Pearson's (normal = 3) and must be >= 1, got {kurtosis!r}")


def expected_max_sharpe(n_trials: int, trial_sharpe_var: float) -> float:
    """Expected maximum of ``n_trials`` Sharpe ratios with true Sharpe 0 (Bailey & López de Prado, 2014).

    ``SR0 = sqrt(V) * ((1 - γ) Φ⁻¹(1 - 1/N) + γ Φ⁻¹(1 - 1/(N e)))``, γ the Euler-Mascheroni constant;
    ``V = trial_sharpe_var``, the variance across trials of their Sharpe ratios (in the unit of the result:
    per-period Sharpe -> per-period variance). One trial has no selection bias: 0.
    """
    if isinstance(n_trials, bool) or int(n_trials) != n_trials or n_trials < 1:
        raise DataValidationError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    if not math.isfinite(trial_sharpe_var) or trial_sharpe_var < 0:
        raise DataValidationError(f"trial_sharpe_var must be a finite number >= 0, got {trial_sharpe_var!r}")
    if n_trials == 1:
        return 0.0
    n = int(n_trials)
    quantiles = (1.0 - EULER_GAMMA) * _NORMAL.inv_cdf(1.0 - 1.0 / n) + EULER_GAMMA * _NORMAL.inv_cdf(
        1.0 - 1.0 / (n * math.e)
    )
    return math.sqrt(trial_sharpe_var) * quantiles


def deflated_sharpe_ratio(
    sharpe: float, n_obs: int, skew: float, kurtosis: float, *, n_trials: int, trial_sharpe_var: float
) -> float:
    """The deflated Sharpe ratio (Bailey & López de Prado, 2014): PSR against the best of ``n_trials`` by luck.

    ``DSR = PSR(SR0)`` with ``SR0 = expected_max_sharpe(n_trials, trial_sharpe_var)``: the probability that
    the strategy's true Sharpe beats what the best of ``n_trials`` zero-skill variants would show. Units as in
    :func:`probabilistic_sharpe_ratio`: ``sharpe`` **per period** (per bar), ``trial_sharpe_var`` the
    variance of the trials' per-period Sharpe ratios, ``n_obs`` the number of returns, Pearson kurtosis.
    Paper's example: SR 2.5/sqrt(250), T 1250, skew -3, kurtosis 10, N 100, V 0.5/250 -> 0.9004.
    """
    sr0 = expected_max_sharpe(n_trials, trial_sharpe_var)
    return probabilistic_sharpe_ratio(sharpe, n_obs, skew, kurtosis, benchmark_sharpe=sr0)


def deflated_sharpe_of(
    metrics: dict[str, Metric], *, n_trials: int, trial_sharpe_per_bar: Sequence[float | None]
) -> float | None:
    """DSR of a :func:`performance_metrics` dict; the trial variance is that of ``trial_sharpe_per_bar``.

    ``trial_sharpe_per_bar``: the per-bar Sharpe of each trial (e.g. of each walk-forward fold; None
    entries are skipped); its sample variance (ddof=1) is ``trial_sharpe_var`` (0 with fewer than 2).
    None when the metrics' Sharpe or moments are undefined (flat equity, fewer than 3 bars).
    """
    sr, skew, kurt, n = (metrics.get(k) for k in ("sharpe_per_bar", "return_skew", "return_kurtosis", "n_returns"))
    if sr is None or skew is None or kurt is None or n is None or n < 2:
        return None
    trials = np.array([s for s in trial_sharpe_per_bar if s is not None], dtype=np.float64)
    var = float(np.var(as_values("trial_sharpe_per_bar", trials), ddof=1)) if trials.size >= 2 else 0.0
    return deflated_sharpe_ratio(float(sr), int(n), float(skew), float(kurt), n_trials=n_trials, trial_sharpe_var=var)
