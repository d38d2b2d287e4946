"""Backtest metrics: hand-checkable curves and trade lists, degenerate input, and the (deflated) Sharpe."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from statistics import NormalDist

import numpy as np
import pytest

from cryptoml.backtest.metrics import (
    MS_PER_HOUR,
    deflated_sharpe_of,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    in_out_sample_sharpe,
    performance_metrics,
    periods_per_year_of,
    probabilistic_sharpe_ratio,
    trade_stats,
)
from cryptoml.errors import DataValidationError
from tests.conftest import shared_file

H = MS_PER_HOUR
T0 = 1_700_000_000_000 - 1_700_000_000_000 % H


def hourly(equity: list[float] | np.ndarray) -> np.ndarray:
    return T0 + H * np.arange(len(equity), dtype=np.int64)


def metrics_of(equity: list[float] | np.ndarray, **kw: object) -> dict:
    kw.setdefault("trade_pnl", [])
    return performance_metrics(hourly(equity), equity, bar_ms=H, **kw)  # type: ignore[arg-type]


def test_periods_per_year_is_24_7() -> None:
    assert periods_per_year_of(60_000) == 365 * 24 * 60
    assert periods_per_year_of(H) == 8760
    with pytest.raises(DataValidationError, match="bar_ms"):
        periods_per_year_of(0)


def test_drawdown_depth_and_the_longest_spell_to_the_end() -> None:
    # spell 1: peak 110 (h1) -> trough 88 (-20 %) -> back at 110 on h4: 3 h.
    # spell 2: last bar at the peak 121 is h6 -> 108.9 (-10 %) -> never back: h6..h10 = 4 h, the longest.
    equity = [100, 110, 99, 88, 110, 121, 121, 108.9, 115, 118, 120]
    m = metrics_of(equity)
    assert m["max_drawdown"] == pytest.approx(0.2)
    assert m["max_drawdown_duration_hours"] == 4.0
    assert m["total_return"] == pytest.approx(0.2)
    assert m["span_hours"] == 10.0
    assert m["calmar"] == pytest.approx(m["cagr"] / 0.2)


def test_recovered_drawdown_duration_is_peak_to_recovery() -> None:
    m = metrics_of([100, 90, 95, 100, 101, 102])
    assert m["max_drawdown"] == pytest.approx(0.1)
    assert m["max_drawdown_duration_hours"] == 3.0


def test_drawdown_duration_uses_timestamps_across_a_gap() -> None:
    ts = np.array([0, 1, 2, 3, 10, 11], dtype=np.int64) * H + T0
    m = performance_metrics(ts, [100, 120, 100, 110, 119, 121], trade_pnl=[], bar_ms=H)
    assert m["max_drawdown_duration_hours"] == 10.0  # peak h1 -> recovery h11


def test_known_trade_list() -> None:
    s = trade_stats([10, -5, 20, 0, -15], [100, 100, 200, 100, 300])
    assert s == {
        "n_trades": 5,
        "win_rate": 0.4,
        "profit_factor": 1.5,
        "expectancy": 2.0,
        "expectancy_pct": 2.0,  # 10 %, -5 %, 10 %, 0 %, -5 %
        "avg_win": 15.0,
        "avg_loss": -10.0,
        "best_trade": 20.0,
        "worst_trade": -15.0,
    }


def test_profit_factor_is_none_without_losses_and_zero_without_wins() -> None:
    assert trade_stats([1.0, 2.0])["profit_factor"] is None
    assert trade_stats([-1.0, -2.0])["profit_factor"] == 0.0
    assert trade_stats([1.0])["expectancy_pct"] is None  # no notional given


def test_no_trades() -> None:
    s = trade_stats([])
    assert s["n_trades"] == 0
    assert all(v is None for k, v in s.items() if k != "n_trades")


def test_constant_growth_gives_its_cagr_exactly() -> None:
    t_h = np.arange(30 * 24 + 1)
    equity = 1000.0 * 1.5 ** (t_h / 8760)
    m = metrics_of(equity)
    assert m["cagr"] == pytest.approx(0.5, rel=1e-12)
    assert m["total_return"] == pytest.approx(1.5 ** (30 / 365) - 1, rel=1e-12)
    assert m["max_drawdown"] == 0.0 and m["max_drawdown_duration_hours"] == 0.0
    # Every return equal: zero dispersion, no downside -> the ratios are undefined, not astronomically large.
    assert m["sharpe"] is None and m["sortino"] is None and m["calmar"] is None


def test_sharpe_and_sortino_by_hand() -> None:
    returns = [0.01, -0.02, 0.03, 0.0]
    equity = 100 * np.cumprod([1.0, *(1 + r for r in returns)])
    ts = T0 + 60_000 * np.arange(equity.size, dtype=np.int64)
    m = performance_metrics(ts, equity, trade_pnl=[])
    sr_bar = statistics.mean(returns) / statistics.stdev(returns)  # 0.005 / 0.0208167 = 0.2402
    assert m["sharpe_per_bar"] == pytest.approx(sr_bar)
    assert m["sharpe_per_bar"] == pytest.approx(0.240192, abs=1e-6)
    assert m["sharpe"] == pytest.approx(sr_bar * math.sqrt(525_600))
    # downside deviation = sqrt((0 + 0.02² + 0 + 0) / 4) = 0.01 -> per-bar Sortino 0.005 / 0.01 = 0.5
    assert m["sortino"] == pytest.approx(0.5 * math.sqrt(525_600))


def test_sortino_is_none_without_downside_while_sharpe_is_defined() -> None:
    m = metrics_of([100, 101, 101, 103, 103.5])
    assert m["sortino"] is None
    assert m["sharpe"] is not None and m["sharpe"] > 0


def test_skew_and_kurtosis_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    equity = 100 * np.cumprod(1 + rng.standard_t(4, size=2000) * 1e-3)
    m = metrics_of(equity)
    r = equity[1:] / equity[:-1] - 1
    assert m["return_skew"] == pytest.approx(stats.skew(r))
    assert m["return_kurtosis"] == pytest.approx(stats.kurtosis(r, fisher=False))


def test_exposure_and_buy_and_hold() -> None:
    close = [100.0, 110.0, 99.0, 99.0, 108.9]
    m = metrics_of([100, 100, 101, 102, 102], position_qty=[0, 1, 1, 0, -2], benchmark_close=close)
    assert m["exposure"] == 0.6
    assert m["buy_hold_total_return"] == pytest.approx(0.089)
    r = [0.1, -0.1, 0.0, 0.1]
    assert m["buy_hold_sharpe"] == pytest.approx(statistics.mean(r) / statistics.stdev(r) * math.sqrt(8760))
    assert metrics_of([100, 101])["buy_hold_sharpe"] is None


def test_flat_equity_one_bar_and_no_trades_are_json_safe() -> None:
    flat = metrics_of([100.0] * 50, position_qty=[0.0] * 50)
    assert flat["total_return"] == 0.0 and flat["cagr"] == 0.0 and flat["max_drawdown"] == 0.0
    assert flat["sharpe"] is None and flat["sortino"] is None and flat["calmar"] is None
    assert flat["return_skew"] is None and flat["exposure"] == 0.0 and flat["n_trades"] == 0
    one = metrics_of([100.0], benchmark_close=[5.0])
    assert one["n_bars"] == 1 and one["n_returns"] == 0 and one["total_return"] == 0.0
    assert one["cagr"] is None and one["sharpe"] is None and one["buy_hold_total_return"] == 0.0
    for m in (flat, one):
        json.dumps(m, allow_nan=False)
        assert all(v is None or isinstance(v, (int, float)) for v in m.values())


def test_cagr_that_overflows_is_none() -> None:
    m = metrics_of([100.0, 1000.0])  # x10 in one hour: (10) ** 8760 is not a float
    assert m["cagr"] is None and m["total_return"] == pytest.approx(9.0)
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"equity": [100, float("nan"), 100]}, "equity holds NaN"),
        ({"equity": [100, float("inf"), 100]}, "equity holds NaN/inf at index 1"),
        ({"equity": [100, 0.0, 100]}, "equity must be > 0"),
        ({"equity": [100, 101]}, "differ in length"),
        ({"ts_ms": [T0, T0 + 2 * H, T0 + H]}, "strictly increasing"),
        ({"ts_ms": [T0, T0, T0 + H]}, "strictly increasing"),
        ({"ts_ms": [0.0, 3.6e6, 7.2e6]}, "integer"),
        ({"ts_ms": []}, "empty"),
        ({"bar_ms": 60_000}, "does not match bar_ms"),
        ({"trade_pnl": [1.0, float("nan")]}, "trade_pnl holds NaN"),
        ({"trade_pnl": [1.0], "trade_entry_notional": [1.0, 2.0]}, "trade_entry_notional and trade_pnl"),
        ({"position_qty": [0, 1]}, "position_qty and equity differ"),
        ({"benchmark_close": [1, 2, float("nan")]}, "benchmark_close holds NaN"),
        ({"benchmark_close": [1, 2]}, "benchmark_close and equity differ"),
        ({"equity": [[100, 101, 102]]}, "one-dimensional"),
        ({"equity": ["a", "b", "c"]}, "equity must be numbers"),
        ({"periods_per_year": 0.0}, "periods_per_year"),
    ],
)
def test_broken_input_is_a_clear_error(kwargs: dict, message: str) -> None:
    args: dict = {"ts_ms": hourly([0, 0, 0]), "equity": [100.0, 101.0, 99.0], "trade_pnl": [], "bar_ms": H}
    args.update(kwargs)
    with pytest.raises(DataValidationError, match=message):
        performance_metrics(args.pop("ts_ms"), args.pop("equity"), **args)


def test_paper_worked_example() -> None:
    """Bailey & López de Prado (2014), numerical example: daily data, annual figures de-annualised by 250."""
    sr0 = expected_max_sharpe(100, 0.5 / 250)
    assert sr0 == pytest.approx(0.1132, abs=5e-5)
    dsr = deflated_sharpe_ratio(2.5 / math.sqrt(250), 1250, -3.0, 10.0, n_trials=100, trial_sharpe_var=0.5 / 250)
    assert dsr == pytest.approx(0.9004, abs=5e-5)


def test_psr_by_hand() -> None:
    # SR 0.1 over 101 returns, normal moments: z = 0.1 * 10 / sqrt(1 + 2/4 * 0.01) = 0.99751
    assert probabilistic_sharpe_ratio(0.1, 101, 0.0, 3.0) == pytest.approx(NormalDist().cdf(1 / math.sqrt(1.005)))
    assert probabilistic_sharpe_ratio(0.1, 101, 0.0, 3.0) == pytest.approx(0.84074, abs=1e-5)
    assert probabilistic_sharpe_ratio(0.05, 500, -1.0, 6.0, benchmark_sharpe=0.05) == 0.5
    # Negative skew and fat tails widen the Sharpe's error, so the same evidence is less convincing.
    assert probabilistic_sharpe_ratio(0.1, 101, -2.0, 9.0) < probabilistic_sharpe_ratio(0.1, 101, 0.0, 3.0)


def test_expected_max_sharpe_approximates_the_simulated_maximum() -> None:
    rng = np.random.default_rng(0)
    simulated = rng.standard_normal((4000, 100)).max(axis=1).mean()  # E[max of 100 N(0,1)] ~ 2.508
    assert expected_max_sharpe(100, 1.0) == pytest.approx(simulated, rel=0.03)
    assert expected_max_sharpe(100, 4.0) == pytest.approx(2 * expected_max_sharpe(100, 1.0))
    assert expected_max_sharpe(1, 1.0) == 0.0


def test_more_trials_or_more_dispersion_deflate_more() -> None:
    args = (0.08, 1000, -0.5, 5.0)
    by_trials = [deflated_sharpe_ratio(*args, n_trials=n, trial_sharpe_var=1e-3) for n in (1, 2, 5, 10, 100, 1000)]
    assert all(a > b for a, b in itertools.pairwise(by_trials))
    assert by_trials[0] == pytest.approx(probabilistic_sharpe_ratio(*args))
    by_var = [deflated_sharpe_ratio(*args, n_trials=20, trial_sharpe_var=v) for v in (0.0, 1e-4, 1e-3, 1e-2)]
    assert all(a > b for a, b in itertools.pairwise(by_var))
    by_length = [
        deflated_sharpe_ratio(0.08, t, -0.5, 5.0, n_trials=20, trial_sharpe_var=1e-4) for t in (100, 1000, 10_000)
    ]
    assert all(a < b for a, b in itertools.pairwise(by_length))  # SR above SR0: more data, more sure


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0.1, 1, 0.0, 3.0), {"n_trials": 5, "trial_sharpe_var": 0.01}, "n_obs"),
        ((0.1, 100, 0.0, 3.0), {"n_trials": 0, "trial_sharpe_var": 0.01}, "n_trials"),
        ((0.1, 100, 0.0, 3.0), {"n_trials": 5, "trial_sharpe_var": -1.0}, "trial_sharpe_var"),
        ((0.1, 100, 0.0, 0.5), {"n_trials": 5, "trial_sharpe_var": 0.01}, "kurtosis"),
        ((1.0, 100, 2.0, 1.0), {"n_trials": 1, "trial_sharpe_var": 0.0}, "inconsistent moments"),
        ((float("nan"), 100, 0.0, 3.0), {"n_trials": 5, "trial_sharpe_var": 0.01}, "sharpe must be finite"),
    ],
)
def test_dsr_rejects_bad_input(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(DataValidationError, match=message):
        deflated_sharpe_ratio(*args, **kwargs)


def test_deflated_sharpe_of_metrics() -> None:
    rng = np.random.default_rng(7)
    equity = 100 * np.cumprod(1 + 1e-3 + rng.normal(0, 1e-2, 500))
    m = metrics_of(equity)
    folds = [0.05, 0.12, -0.02, 0.08]
    dsr = deflated_sharpe_of(m, n_trials=4, trial_sharpe_per_bar=[*folds, None])
    expected = deflated_sharpe_ratio(
        m["sharpe_per_bar"],
        499,
        m["return_skew"],
        m["return_kurtosis"],
        n_trials=4,
        trial_sharpe_var=statistics.variance(folds),
    )
    assert dsr == pytest.approx(expected) and 0.0 < dsr < 1.0
    assert deflated_sharpe_of(metrics_of([100.0] * 10), n_trials=4, trial_sharpe_per_bar=folds) is None


def test_in_out_sample_sharpe() -> None:
    is_r, oos_r = [0.01, 0.02, 0.0, 0.01], [0.01, -0.01, 0.005, 0.0]
    out = in_out_sample_sharpe(is_r, oos_r, periods_per_year=8760)
    sr = [statistics.mean(r) / statistics.stdev(r) * math.sqrt(8760) for r in (is_r, oos_r)]
    assert out["sharpe_in_sample"] == pytest.approx(sr[0])
    assert out["sharpe_out_of_sample"] == pytest.approx(sr[1])
    assert out["sharpe_oos_is_ratio"] == pytest.approx(sr[1] / sr[0])
    assert out["n_in_sample"] == 4 and out["n_out_of_sample"] == 4
    empty = in_out_sample_sharpe([], [0.01], periods_per_year=8760)
    assert empty["sharpe_in_sample"] is None and empty["sharpe_oos_is_ratio"] is None
    with pytest.raises(DataValidationError, match="oos_returns"):
        in_out_sample_sharpe(is_r, [float("nan")], periods_per_year=8760)


def test_real_btc_month_buy_and_hold() -> None:
    """The BTC/USDT 1m month as the equity curve: it must equal its own buy-and-hold benchmark."""
    import pandas as pd

    bars = pd.read_parquet(shared_file("binance_spot_btcusdt_1m_20230417-20230517.parquet"))
    ts = bars["date"].astype("int64").to_numpy() // 1_000_000
    close = bars["close"].to_numpy()
    m = performance_metrics(ts, close, trade_pnl=[], benchmark_close=close, position_qty=np.ones(close.size))
    assert m["n_bars"] == 43_199 and m["exposure"] == 1.0
    assert m["total_return"] == pytest.approx(close[-1] / close[0] - 1)
    assert m["sharpe"] == pytest.approx(m["buy_hold_sharpe"])
    assert 0.0 < m["max_drawdown"] < 0.5 and 0.0 < m["max_drawdown_duration_hours"] <= m["span_hours"]
    assert m["return_kurtosis"] > 3.0  # 1-minute crypto returns are fat-tailed
    json.dumps(m, allow_nan=False)
