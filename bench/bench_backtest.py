"""Backtest engine throughput on precomputed signals (target >= 1,000,000 bars/s), against the per-bar loop.

Bars: the real BTC/USDT 1m month of ../shared/data tiled to a year (525,600 bars; each copy rescaled to
continue from the previous close), or a seeded random walk when that file is absent. Funding: a 0.01 %
settlement every 8 hours.

Signal: what a forward-return regression with some skill looks like. ``pred = rho^2 * fwd + rho *
sqrt(1 - rho^2) * std(fwd) * noise`` is the best linear forecast of the realised 10-minute forward log
return ``fwd`` (bps) from a reading of it blurred so that ``corr(pred, fwd) = rho``: shrunk towards zero
like a fitted model's output. The headline uses ``rho = 0.15`` (a strong model for 1-minute crypto bars);
the engine's cost grows with the number of trades, so the figures also give trades per day and a sweep
over ``rho`` (0.2: ~47 trades a day). ``us_per_round_trip_cpu`` is that cost per trade: CPU time above a
run of the same bars with a zero signal (its ``no_trade_cpu_s``: input checks, the skip plan, the
always-processed day and funding bars), divided by the number of round trips. The load average is recorded
with the figures: the machine is shared, and wall time under load says little. The reference loop (every
bar through the broker and ``decide``) runs on the first ``REFERENCE_BARS`` bars, and the fast engine's
result on that slice is checked identical to it.

``python -m bench backtest`` (or ``python -m bench.bench_backtest``) writes the figures into
``bench/results.json`` under ``backtest``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryptoml.backtest.engine import BacktestResult, run_backtest, run_backtest_reference
from cryptoml.backtest.windows import walk_forward_windows
from cryptoml.config import BacktestParams, PaperBrokerParams, PriceParams, StrategyParams

YEAR_BARS = 525_600
REFERENCE_BARS = 30_000
HEADLINE_RHO = 0.15
SWEEP_RHO = (0.1, 0.2)
TARGET_BARS_PER_S = 1_000_000
HORIZON_BARS = 10
SYMBOL = "BTC/USDT:USDT"
T0_MS = 1_672_531_200_000  # 2023-01-01T00:00Z
MONTH = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "binance_spot_btcusdt_1m_20230417-20230517.parquet"
)


def year_of_bars(n: int = YEAR_BARS) -> tuple[dict[str, np.ndarray], str]:
    """``n`` consecutive 1m bars (dict of arrays in the store's ohlcv layout) and where they came from."""
    if MONTH.is_file():
        month = pd.read_parquet(MONTH)
        prices = month[["open", "high", "low", "close"]].to_numpy(dtype=np.float64)
        copies = -(-n // len(month))
        step = prices[-1, 3] / prices[0, 0]  # copy k continues from copy k-1's last close
        scale = np.repeat(step ** np.arange(copies), len(month))[:n, None]
        ohlc = np.tile(prices, (copies, 1))[:n] * scale
        source = f"real BTC/USDT 1m month tiled x{copies}"
    else:
        rng = np.random.default_rng(0)
        close = 30_000 * np.exp(np.cumsum(rng.normal(0, 6e-4, n)))
        open_ = np.concatenate([[close[0]], close[:-1]])
        wick = np.abs(rng.normal(0, 5.0, n))
        ohlc = np.column_stack([open_, np.maximum(open_, close) + wick, np.minimum(open_, close) - wick, close])
        source = "seeded random walk (shared data absent)"
    ts = T0_MS + 60_000 * np.arange(n, dtype=np.int64)
    columns = {name: np.ascontiguousarray(ohlc[:, j]) for j, name in enumerate(("open", "high", "low", "close"))}
    bars = {"ts_ms": ts, **columns}
    return bars, source


def model_like_signal(close: np.ndarray, rho: float, seed: int = 0) -> np.ndarray:
    """A forecast (bps) of the 10-bar forward log return with correlation ``rho`` to it (module docstring)."""
    fwd = np.zeros(len(close))
    fwd[:-HORIZON_BARS] = np.log(close[HORIZON_BARS:] / close[:-HORIZON_BARS]) * 1e4
    noise = np.random.default_rng(seed).normal(0.0, 1.0, len(close))
    pred = rho**2 * fwd + rho * np.sqrt(1 - rho**2) * fwd.std() * noise
    pred[-HORIZON_BARS:] = np.nan  # the future is unknown at the end
    return pred


def funding_table(ts: np.ndarray, rate: float = 1e-4) -> dict[str, np.ndarray]:
    interval = 8 * 3_600_000
    settle = np.arange(ts[0] - ts[0] % interval + interval, ts[-1], interval, dtype=np.int64)
    return {"ts_ms": settle, "funding_rate": np.full(len(settle), rate)}


def _timed(repeats: int, fn: Any) -> tuple[float, float, BacktestResult]:
    """Best wall and best CPU seconds of ``repeats`` calls (CPU time: others on the shared cores disturb it
    far less), and the last result."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - started_cpu)
    assert result is not None
    return wall, cpu, result


def _same(a: BacktestResult, b: BacktestResult) -> bool:
    return (
        a.fills == b.fills
        and a.trades == b.trades
        and a.decisions == b.decisions
        and a.decision_counts == b.decision_counts
        and np.array_equal(a.equity, b.equity)
        and np.array_equal(a.position_qty, b.position_qty)
        and a.strategy_state == b.strategy_state
        and a.broker.to_dict() == b.broker.to_dict()
    )


def engine_figures(bars: dict[str, np.ndarray]) -> dict[str, object]:
    """Fast engine over all ``bars`` (best of 3) and the reference loop over the first REFERENCE_BARS."""
    strategy, broker = StrategyParams(), PaperBrokerParams()
    n = len(bars["ts_ms"])
    days = n / 1440

    def run(rho: float | None, upto: int | None = None, reference: bool = False) -> BacktestResult:
        part = bars if upto is None else {k: v[:upto] for k, v in bars.items()}
        pred = np.zeros(len(part["close"])) if rho is None else model_like_signal(part["close"], rho)
        engine = run_backtest_reference if reference else run_backtest
        return engine(part, pred, strategy=strategy, broker=broker, symbol=SYMBOL, funding=funding_table(part["ts_ms"]))

    load_before = os.getloadavg()
    run(HEADLINE_RHO, upto=20_000)  # warm up imports and caches
    _, idle_cpu_s, _ = _timed(3, lambda: run(None))  # the fixed cost: no signal, no trade

    def per_round_trip_us(cpu_s: float, result: BacktestResult) -> float | None:
        # A few dozen trades would measure the noise of the fixed cost, not the trades.
        return round((cpu_s - idle_cpu_s) / len(result.trades) * 1e6, 1) if len(result.trades) >= 500 else None

    fast_s, fast_cpu_s, fast = _timed(3, lambda: run(HEADLINE_RHO))
    ref_s, ref_cpu_s, ref = _timed(1, lambda: run(HEADLINE_RHO, REFERENCE_BARS, reference=True))
    fast_slice = run(HEADLINE_RHO, REFERENCE_BARS)
    figures: dict[str, object] = {
        "bars": n,
        "signal_corr": HEADLINE_RHO,
        "engine_best_s": round(fast_s, 3),
        "engine_bars_per_s": round(n / fast_s),
        "engine_cpu_best_s": round(fast_cpu_s, 3),
        "engine_bars_per_cpu_s": round(n / fast_cpu_s),
        "target_bars_per_s": TARGET_BARS_PER_S,
        "meets_target": n / fast_s >= TARGET_BARS_PER_S,
        "bars_evaluated": fast.bars_evaluated,
        "bars_evaluated_frac": round(fast.bars_evaluated / n, 4),
        "trades": len(fast.trades),
        "trades_per_day": round(len(fast.trades) / days, 2),
        "no_trade_cpu_s": round(idle_cpu_s, 3),
        "us_per_round_trip_cpu": per_round_trip_us(fast_cpu_s, fast),
        "net_pnl": round(fast.totals.net_pnl, 2),
        "reference_bars": REFERENCE_BARS,
        "reference_s": round(ref_s, 3),
        "reference_bars_per_s": round(REFERENCE_BARS / ref_s),
        "reference_bars_per_cpu_s": round(REFERENCE_BARS / ref_cpu_s),
        "speedup_vs_reference": round((n / fast_s) / (REFERENCE_BARS / ref_s), 1),
        "reference_identical": _same(fast_slice, ref),
    }
    sweep = {}
    for rho in SWEEP_RHO:
        seconds, cpu_s, result = _timed(3, lambda rho=rho: run(rho))
        sweep[f"{rho:g}"] = {
            "bars_per_s": round(n / seconds),
            "bars_per_cpu_s": round(n / cpu_s),
            "best_s": round(seconds, 3),
            "cpu_best_s": round(cpu_s, 3),
            "trades_per_day": round(len(result.trades) / days, 2),
            "us_per_round_trip_cpu": per_round_trip_us(cpu_s, result),
            "bars_evaluated_frac": round(result.bars_evaluated / n, 4),
        }
    figures["by_signal_corr"] = sweep
    figures["load_avg_1m"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]  # before, after
    return figures


def walk_forward_figures() -> dict[str, object]:
    """The 30-day 1-minute walk-forward of the issue's benchmark (target <= 2 min on 2 cores).

    Measured here: the windows (params defaults: train 48 h, test 24 h, refit every 60 min, purge = the
    label horizon) and the engine over every fold's test bars, with precomputed model-like signals. The
    orchestration adds the refits (one model per segment) to this figure.
    """
    bt, price = BacktestParams(), PriceParams()
    bars, _ = year_of_bars(30 * 1440)
    ts = bars["ts_ms"]
    started = time.perf_counter()
    folds = walk_forward_windows(
        int(ts[0]), int(ts[-1]) + 60_000,
        train_ms=round(bt.train_hours * 3_600_000), test_ms=round(bt.test_hours * 3_600_000),
        retrain_ms=round(bt.retrain_minutes * 60_000), purge_ms=price.horizon_minutes * 60_000,
    )  # fmt: skip
    windows_s = time.perf_counter() - started
    first, last = folds[0].test_start_ms, folds[-1].test_end_ms
    keep = (ts >= first) & (ts < last)
    test_bars = {k: v[keep] for k, v in bars.items()}
    pred = model_like_signal(bars["close"], HEADLINE_RHO)[keep]
    started = time.perf_counter()
    result = run_backtest(
        test_bars, pred, strategy=StrategyParams(), broker=PaperBrokerParams(), symbol=SYMBOL,
        funding=funding_table(test_bars["ts_ms"]),
    )  # fmt: skip
    engine_s = time.perf_counter() - started
    return {
        "days": 30,
        "folds": len(folds),
        "segments": sum(len(f.segments) for f in folds),
        "test_bars": int(keep.sum()),
        "windows_s": round(windows_s, 4),
        "engine_s": round(engine_s, 3),
        "trades": len(result.trades),
    }


def walk_forward_refit_figures(workers: int = 2) -> dict[str, object]:
    """The issue's benchmark with the refits: a 30-day 1-minute walk-forward, hourly LightGBM refits, <= 2 min.

    Bars: the embedded synthetic market's binance BTC perp (43,200 1-minute bars, what the pipeline's
    ``price_features`` stage stores by default) with its 19 technical features. Windows and models as the
    ``backtest`` stage builds them (params defaults: train 48 h, test 24 h, refit every 60 min, purge = the
    10-minute horizon, ``price_lgbm`` trees with ``backtest.lgbm_rounds`` rounds, one thread per refit);
    the folds run on ``workers`` threads as the flow's local task runner runs them, then the engine and
    every metric (``evaluate_walk_forward``). ``tuning``: ms per refit, serially, on the first 24 refits
    for other settings (fewer histogram bins, 2 threads per refit).
    """
    from concurrent.futures import ThreadPoolExecutor

    from cryptoml.backtest.signals import LgbmSettings, fold_signals, fold_span_ms, signal_inputs
    from cryptoml.backtest.walkforward import evaluate_walk_forward
    from cryptoml.backtest.windows import windows_from_hours
    from cryptoml.config import PriceLgbmParams, SyntheticParams
    from cryptoml.features.technical import technical_features
    from cryptoml.market.synthetic import generate_market

    market = SyntheticParams(exchanges=("binance",), bases=("BTC",))
    bars = next(d.frame for d in generate_market(market) if d.key.kind == "ohlcv" and d.key.symbol == SYMBOL)
    table = bars.reset_index(drop=True).join(technical_features(bars).reset_index(drop=True))
    bt, price = BacktestParams(), PriceParams()
    ts = table["ts_ms"].to_numpy()
    started, started_cpu = time.perf_counter(), time.process_time()
    inputs = signal_inputs(table, price.horizon_minutes)
    folds = windows_from_hours(
        int(ts[0]), int(ts[-1]) + 60_000, train_hours=bt.train_hours, test_hours=bt.test_hours,
        retrain_minutes=bt.retrain_minutes, horizon_minutes=price.horizon_minutes,
    )  # fmt: skip
    settings = LgbmSettings.from_params(PriceLgbmParams(), bt.lgbm_rounds, num_threads=1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = [pool.submit(fold_signals, inputs.window(*fold_span_ms(f)), f, settings) for f in folds]
        segments = [s for part in parts for s in part.result()]
    signals_s = time.perf_counter() - started
    ev = evaluate_walk_forward(
        table, folds, segments, strategy=StrategyParams(), broker=PaperBrokerParams(), symbol=SYMBOL
    )
    total_s, total_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu

    probe = folds[0]
    tuning = {}
    for label, variant in (
        ("max_bin_255_threads_1", settings),
        ("max_bin_63_threads_1", LgbmSettings.from_params(PriceLgbmParams(), bt.lgbm_rounds, max_bin=63)),
        ("max_bin_255_threads_2", LgbmSettings.from_params(PriceLgbmParams(), bt.lgbm_rounds, num_threads=2)),
    ):
        t0 = time.perf_counter()
        fold_signals(inputs.window(*fold_span_ms(probe)), probe, variant)
        tuning[label] = round(1000 * (time.perf_counter() - t0) / len(probe.segments), 1)
    return {
        "days": 30,
        "bars": len(table),
        "folds": len(folds),
        "refits": len(segments),
        "rounds": bt.lgbm_rounds,
        "workers": workers,
        "signals_s": round(signals_s, 2),
        "ms_per_refit_wall": round(1000 * signals_s / len(segments), 1),
        "engine_and_metrics_s": round(total_s - signals_s, 2),
        "total_s": round(total_s, 2),
        "total_cpu_s": round(total_cpu_s, 2),
        "target_s": 120,
        "meets_target": total_s <= 120,
        "trades": ev.metrics["n_trades"],
        "oos_sharpe": ev.metrics["sharpe"],
        "tuning_ms_per_refit": tuning,
    }


def run() -> dict[str, object]:
    bars, source = year_of_bars()
    figures: dict[str, object] = {"input": source, **engine_figures(bars)}
    figures["walk_forward_30d"] = walk_forward_figures()
    figures["walk_forward_30d_refits"] = walk_forward_refit_figures()
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            for k, v in value.items():
                print(f"    {k:26s} {v}")
        else:
            print(f"  {key:28s} {value:>14,}" if isinstance(value, int) and not isinstance(value, bool) else
                  f"  {key:28s} {value!s:>14}")  # fmt: skip
    return figures


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["backtest"]))
