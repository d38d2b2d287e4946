"""Backtest engine: next-open fills without look-ahead, funding and PnL components, and the event-skipping
engine proven identical to the plain per-bar loop (fills, trades, equity, decisions, final states)."""

from __future__ import annotations

import dataclasses
import gc
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptoml.backtest import engine
from cryptoml.backtest.engine import EXIT_REASONS, BacktestResult, Trade, run_backtest, run_backtest_reference
from cryptoml.config import PaperBrokerParams, StrategyParams
from cryptoml.errors import DataValidationError
from tests.conftest import shared_file

MIN = 60_000
DAY = 86_400_000
T0 = 1_704_146_400_000  # 2024-01-01 22:00 UTC: a UTC day boundary two hours in
SYMBOL = "BTC/USDT:USDT"
P = StrategyParams()
B = PaperBrokerParams()

# Parameter sets that make every rule fire somewhere: tight stops and take-profits, leverage for
# kill-switch days, long cooldowns, shorts disabled, costly fills.
PARAM_SETS = {
    "default": (P, B),
    "tight": (
        StrategyParams(
            stop_loss_pct=0.3,
            take_profit_pct=0.4,
            cooldown_minutes=5.0,
            kill_switch_drawdown_pct=1.0,
            position_fraction=3.0,
        ),
        PaperBrokerParams(spread_pct=0.05, depth_usd=20_000.0),
    ),
    "long_only": (StrategyParams(allow_short=False, entry_bps=5.0, exit_reversal_bps=2.0, cooldown_minutes=10.0), B),
    "leveraged": (
        StrategyParams(
            position_fraction=8.0,
            kill_switch_drawdown_pct=2.0,
            stop_loss_pct=2.0,
            take_profit_pct=1.5,
            cooldown_minutes=0.0,
        ),
        B,
    ),
}


def scenario(
    seed: int,
    n: int,
    *,
    vol: float = 8e-4,
    gap_frac: float = 0.01,
    nan_frac: float = 0.05,
    skill: float = 0.5,
    noise_bps: float = 6.0,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Seeded bars (with gaps between bars and inside the time grid), a noisy forward-return signal and funding."""
    rng = np.random.default_rng(seed)
    steps = np.where(rng.random(n) < gap_frac, rng.integers(2, 40, n), 1)
    steps[0] = 0
    ts = T0 + MIN * np.cumsum(steps).astype(np.int64)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, vol, n)))
    open_ = np.concatenate([[100.0], close[:-1]]) * np.exp(rng.normal(0.0, vol / 3, n))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0.0, vol, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0.0, vol, n)))
    horizon = 10
    fwd = np.zeros(n)
    fwd[: n - horizon] = np.log(close[horizon:] / close[: n - horizon]) * 1e4 if n > horizon else 0.0
    pred = skill * fwd + rng.normal(0.0, noise_bps, n)
    pred[rng.random(n) < nan_frac] = np.nan
    pred[rng.random(n) < 0.002] = np.inf  # read as "no prediction", like NaN
    # Hourly settlement times on a random half, a few ms after the hour (Binance-like), some before the
    # first bar or after the last; rates large enough to matter.
    settle = np.arange(T0 - 9 * 3_600_000, int(ts[-1]) + 10 * 3_600_000, 3_600_000, dtype=np.int64)
    keep = rng.random(len(settle)) < 0.5
    settle = settle[keep] + rng.integers(0, 50, int(keep.sum()))
    funding = {"ts_ms": settle, "funding_rate": rng.normal(2e-4, 1e-3, len(settle))}
    return {"ts_ms": ts, "open": open_, "high": high, "low": low, "close": close}, pred, funding


def both(
    bars: dict[str, np.ndarray],
    pred: np.ndarray,
    funding: dict[str, np.ndarray] | None,
    strategy: StrategyParams = P,
    broker: PaperBrokerParams = B,
) -> tuple[BacktestResult, BacktestResult]:
    kw = {"strategy": strategy, "broker": broker, "symbol": SYMBOL, "funding": funding}
    return run_backtest(bars, pred, **kw), run_backtest_reference(bars, pred, **kw)


def assert_identical(fast: BacktestResult, ref: BacktestResult) -> None:
    assert fast.fills == ref.fills
    assert fast.trades == ref.trades
    assert fast.decisions == ref.decisions
    assert fast.decision_counts == ref.decision_counts
    np.testing.assert_array_equal(fast.equity, ref.equity)
    np.testing.assert_array_equal(fast.position_qty, ref.position_qty)
    assert fast.strategy_state == ref.strategy_state
    assert fast.broker.to_dict() == ref.broker.to_dict()
    assert fast.totals == ref.totals
    assert ref.bars_evaluated == len(ref.ts_ms)
    assert sum(ref.decision_counts.values()) == len(ref.ts_ms)


def assert_components_add_up(result: BacktestResult) -> None:
    t = result.totals
    tol = 1e-9 * max(1.0, abs(t.initial_equity), abs(t.final_equity), t.fees + t.slippage_cost + abs(t.gross_pnl))
    assert t.net_pnl == pytest.approx(t.equity_change, abs=tol)
    assert t.net_pnl == pytest.approx(t.gross_pnl - t.slippage_cost - t.fees - t.funding, abs=tol)
    assert t.final_equity == result.equity[-1]
    assert t.fees == result.broker.summary().fees_paid
    assert t.funding == result.broker.summary().funding_paid
    assert t.slippage_cost == result.broker.summary().slippage_cost
    trades = result.trades
    assert sum(tr.net_pnl for tr in trades) == pytest.approx(t.net_pnl, abs=tol)
    assert sum(tr.fees for tr in trades) == pytest.approx(t.fees, abs=tol)
    assert sum(tr.funding for tr in trades) == pytest.approx(t.funding, abs=tol)
    assert sum(tr.slippage_cost for tr in trades) == pytest.approx(t.slippage_cost, abs=tol)
    for tr in trades:
        assert tr.exit_reason in EXIT_REASONS
        assert tr.net_pnl == pytest.approx(tr.gross_pnl - tr.slippage_cost - tr.fees - tr.funding, abs=tol)


def assert_next_open_fills(result: BacktestResult, bars: dict[str, np.ndarray]) -> None:
    """Every market fill executes at the open of the bar after its decision bar, at that open's price."""
    ts = bars["ts_ms"]
    index = {int(t): i for i, t in enumerate(ts)}
    decided = {d.bar_ts_ms for d in result.decisions}
    for fill in result.fills:
        order = result.broker.get_order(fill.client_order_id)
        assert order is not None
        if order.kind == "market":
            decision_bar = int(fill.client_order_id.split("-")[2])
            assert decision_bar in decided
            i = index[decision_bar]
            assert fill.ts_ms == ts[i + 1] > decision_bar
            assert fill.reference_price == bars["open"][i + 1]
        else:  # a protective order fills inside a bar at or after the entry's bar
            assert order.kind in ("stop", "take_profit") and fill.ts_ms >= order.submitted_ms


SEEDED = [(seed, name) for seed in range(4) for name in PARAM_SETS]


@pytest.mark.parametrize(("seed", "name"), SEEDED)
def test_fast_engine_equals_reference(seed: int, name: str) -> None:
    strategy, broker = PARAM_SETS[name]
    vol = 2.5e-3 if name == "leveraged" else 8e-4
    bars, pred, funding = scenario(seed, 2_500, vol=vol)
    fast, ref = both(bars, pred, funding, strategy, broker)
    assert_identical(fast, ref)
    assert_components_add_up(fast)
    assert_next_open_fills(fast, bars)
    assert fast.bars_evaluated < len(pred)


def test_the_seeded_scenarios_exercise_every_rule() -> None:
    """The equality above only proves something if the scenarios hit every path: check they do."""
    exits: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    funding_paid = 0.0
    for seed, name in SEEDED:
        strategy, broker = PARAM_SETS[name]
        vol = 2.5e-3 if name == "leveraged" else 8e-4
        bars, pred, funding = scenario(seed, 2_500, vol=vol)
        result = run_backtest(bars, pred, strategy=strategy, broker=broker, symbol=SYMBOL, funding=funding)
        exits.update(t.exit_reason for t in result.trades)
        reasons.update(result.decision_counts)
        funding_paid += sum(abs(t.funding) for t in result.trades)
    assert set(EXIT_REASONS) <= set(exits), exits
    for reason in ("kill_switch", "cooldown", "short_disabled", "no_prediction", "no_signal", "in_position"):
        assert reasons[reason] > 0, reasons
    assert reasons["signal_long"] > 0 and reasons["signal_short"] > 0
    assert funding_paid > 0


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 500),
    name=st.sampled_from(sorted(PARAM_SETS)),
    vol=st.sampled_from([3e-4, 1e-3, 4e-3]),
    skill=st.floats(0.0, 1.0),
    noise_bps=st.floats(0.0, 20.0),
    nan_frac=st.sampled_from([0.0, 0.1, 0.6]),
    gap_frac=st.sampled_from([0.0, 0.05]),
    with_funding=st.booleans(),
)
def test_fast_engine_equals_reference_on_random_series(
    seed: int,
    n: int,
    name: str,
    vol: float,
    skill: float,
    noise_bps: float,
    nan_frac: float,
    gap_frac: float,
    with_funding: bool,
) -> None:
    strategy, broker = PARAM_SETS[name]
    bars, pred, funding = scenario(seed, n, vol=vol, skill=skill, noise_bps=noise_bps, nan_frac=nan_frac,
                                   gap_frac=gap_frac)  # fmt: skip
    fast, ref = both(bars, pred, funding if with_funding else None, strategy, broker)
    assert_identical(fast, ref)
    assert_components_add_up(fast)


def flat_bars(prices: list[float], start_ms: int = T0) -> dict[str, np.ndarray]:
    """One bar per price with open = high = low = close (all moves happen between bars)."""
    p = np.asarray(prices, dtype=np.float64)
    ts = start_ms + MIN * np.arange(len(p), dtype=np.int64)
    return {"ts_ms": ts, "open": p, "high": p.copy(), "low": p.copy(), "close": p.copy()}


def test_a_signal_cannot_trade_the_bar_it_was_computed_from() -> None:
    """Bar 9's signal knows the +10 % jump to bar 10; filling at bar 9's close would earn it. It fills at
    bar 10's open, after the jump: the price PnL is zero and only the costs remain."""
    prices = [100.0] * 10 + [110.0] * 10
    pred = np.zeros(20)
    pred[9] = 1_000.0  # = the future return, computed at bar 9's close
    bars = flat_bars(prices)
    fast, ref = both(bars, pred, None)
    assert_identical(fast, ref)
    entry = fast.fills[0]
    assert entry.ts_ms == bars["ts_ms"][10] and entry.reference_price == 110.0
    assert fast.equity[9] == P.base_capital  # nothing happened at the decision bar
    (trade,) = fast.trades
    assert trade.exit_reason == "end_of_data" and trade.gross_pnl == pytest.approx(0.0, abs=1e-9)
    assert fast.totals.net_pnl == pytest.approx(-(trade.fees + trade.slippage_cost), abs=1e-9)
    assert fast.totals.net_pnl < 0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(2, 399))
def test_results_up_to_a_bar_do_not_depend_on_later_bars(seed: int, cut: int) -> None:
    """Causality: replacing every bar after ``cut`` changes nothing before it."""
    bars, pred, funding = scenario(seed, 400, vol=1.5e-3)
    other, other_pred, _ = scenario(seed + 1, 400, vol=1.5e-3)
    mixed = {k: v if k == "ts_ms" else np.concatenate([v[:cut], other[k][cut:]]) for k, v in bars.items()}
    mixed_pred = np.concatenate([pred[:cut], other_pred[cut:]])
    strategy = PARAM_SETS["tight"][0]
    a = run_backtest(bars, pred, strategy=strategy, broker=B, symbol=SYMBOL, funding=funding)
    b = run_backtest(mixed, mixed_pred, strategy=strategy, broker=B, symbol=SYMBOL, funding=funding)
    np.testing.assert_array_equal(a.equity[:cut], b.equity[:cut])
    np.testing.assert_array_equal(a.position_qty[:cut], b.position_qty[:cut])
    last_open = bars["ts_ms"][cut - 1]
    assert [f for f in a.fills if f.ts_ms <= last_open] == [f for f in b.fills if f.ts_ms <= last_open]
    assert [d for d in a.decisions if d.bar_ts_ms <= last_open] == [d for d in b.decisions if d.bar_ts_ms <= last_open]


def test_funding_is_charged_on_the_position_carried_into_the_settlement_bar() -> None:
    prices = [100.0] * 10 + [100.5] * 25
    bars = flat_bars(prices, start_ms=T0)
    keep = np.ones(35, dtype=bool)
    keep[[25, 26]] = False  # a gap: bars 25 and 26 are missing
    bars = {k: v[keep] for k, v in bars.items()}
    pred = np.zeros(33)
    pred[2] = 50.0  # enter long at bar 2's close -> filled at bar 3's open
    ts = T0 + MIN * np.arange(35)
    funding = {
        "ts_ms": np.array([ts[3], ts[10], ts[20] + 17, ts[25] + 5, ts[0] - 1, ts[34] + MIN], dtype=np.int64),
        "funding_rate": np.array([0.01, 0.001, -0.002, 0.003, 0.5, 0.5]),
    }
    fast, ref = both(bars, pred, funding)
    assert_identical(fast, ref)
    qty = fast.fills[0].qty
    assert fast.fills[0].ts_ms == ts[3]
    # ts[3]: the position carried into bar 3 is flat (the entry fills at that open): nothing is paid.
    # ts[10]: long, marked at bar 10's open (100.5, not bar 9's close 100). ts[20] + 17 ms: within bar 20.
    # ts[25] + 5: in the gap, charged at the next bar (index 27 of the full grid) at its open.
    # Settlements before the first bar or after the last close are ignored.
    expected = qty * 100.5 * 0.001 + qty * 100.5 * -0.002 + qty * 100.5 * 0.003
    (trade,) = fast.trades
    assert trade.funding == pytest.approx(expected, rel=1e-12)
    assert fast.totals.funding == pytest.approx(expected, rel=1e-12)
    applied = fast.broker.to_dict()["funding_applied"]
    assert applied == [f"{SYMBOL}|{t}" for t in (ts[3], ts[10], ts[20] + 17, ts[25] + 5)]
    assert_components_add_up(fast)


def test_a_decision_on_the_last_bar_is_not_executed() -> None:
    pred = np.zeros(12)
    pred[-1] = 100.0
    fast, ref = both(flat_bars([100.0] * 12), pred, None)
    assert_identical(fast, ref)
    assert fast.decisions[-1].action == "enter_long" and fast.decisions[-1].bar_ts_ms == fast.ts_ms[-1]
    assert fast.fills == [] and fast.trades == [] and fast.position_qty[-1] == 0.0
    assert fast.broker.open_orders() == []


def test_stop_loss_take_profit_and_exit_timing() -> None:
    """Long at bar 3's open: its stop guards bar 3 already; a take-profit round trip follows, then an exit."""
    prices = [100.0] * 3 + [100.0, 100.0, 98.0] + [98.0] * 4 + [98.0, 98.0, 102.0] + [102.0] * 5 + [101.0] * 3
    bars = flat_bars(prices)
    bars["low"][3] = 98.9  # the entry bar itself dips through the 1 % stop of the ~100.0 fill
    pred = np.zeros(len(prices))
    pred[2] = 50.0  # -> long at bar 3's open, stopped in bar 3
    pred[9] = 50.0  # -> long at bar 10's open (98), take-profit (+3 %, ~100.95) hit by bar 12 opening at 102
    pred[14] = 50.0  # blocked: bar 12's take-profit exit started a cooldown until bar 15's close
    pred[15] = -50.0  # -> short at bar 16's open
    pred[17] = 20.0  # reversal exit at bar 18's open
    fast, ref = both(bars, pred, None)
    assert_identical(fast, ref)
    reasons = [t.exit_reason for t in fast.trades]
    assert reasons == ["stop_loss", "take_profit", "reversal"]
    stop_trade, tp_trade, short_trade = fast.trades
    assert stop_trade.entry_ts_ms == stop_trade.exit_ts_ms == bars["ts_ms"][3]
    assert tp_trade.entry_ts_ms == bars["ts_ms"][10] and tp_trade.exit_ts_ms == bars["ts_ms"][12]
    assert short_trade.side == "short" and short_trade.exit_ts_ms == bars["ts_ms"][18]
    assert fast.decision_counts["cooldown"] == 1
    assert tp_trade.exit_price < 102.0 and tp_trade.gross_pnl > 0  # gapped through: filled at the open
    assert_components_add_up(fast)


def test_kill_switch_day_then_a_fresh_day() -> None:
    """A 4 % loss trips the 3 % kill switch: exit, no entries for the rest of the UTC day, trading resumes
    on the next day (the first bar of a day is always evaluated)."""
    start = T0 + 2 * 3_600_000 - 7 * MIN  # 23:53 UTC; bar 6 closes at midnight: a new UTC day
    prices = [100.0, 100.0, 100.0, 96.0, 96.0, 96.0, 96.0, 96.0, 96.0]
    bars = flat_bars(prices, start_ms=start)
    strategy = StrategyParams(stop_loss_pct=10.0, cooldown_minutes=0.0)
    pred = np.array([0.0, 50.0, 0.0, 0.0, 50.0, 0.0, 0.0, 50.0, 0.0])
    fast, ref = both(bars, pred, None, strategy)
    assert_identical(fast, ref)
    assert [t.exit_reason for t in fast.trades] == ["kill_switch", "end_of_data"]
    assert fast.decision_counts["kill_switch"] == 3  # the exit decided at bar 3, then bars 4-5 blocked
    assert fast.trades[1].entry_ts_ms == bars["ts_ms"][8]  # bar 7's signal, on the new day, fills at bar 8
    assert not fast.strategy_state.kill_switch_tripped


def test_wiped_out_account_cannot_enter() -> None:
    """10x long through a -15 % gap: equity goes negative; later signals are refused with no_equity."""
    prices = [100.0] * 3 + [85.0] * 3000  # the gap through the stop happens at bar 3's open
    bars = flat_bars(prices)
    pred = np.zeros(len(prices))
    pred[1] = 50.0
    pred[2000:2100] = 50.0  # on the next UTC day: no kill-switch baseline above zero, so no_equity
    strategy = StrategyParams(position_fraction=10.0)
    fast, ref = both(bars, pred, None, strategy)
    assert_identical(fast, ref)
    assert fast.equity[-1] < 0
    assert fast.decision_counts["no_equity"] == 100
    assert [t.exit_reason for t in fast.trades] == ["stop_loss"]


def test_shorts_disabled_and_gaps_in_the_bars() -> None:
    bars, pred, funding = scenario(11, 3_000, gap_frac=0.2)
    strategy = StrategyParams(allow_short=False)
    fast, ref = both(bars, pred, funding, strategy)
    assert_identical(fast, ref)
    assert all(t.side == "long" for t in fast.trades) and fast.decision_counts["short_disabled"] > 0


def test_accepts_a_store_frame_and_reports_trade_rows() -> None:
    bars, pred, funding = scenario(5, 1_000)
    frame = pd.DataFrame(bars)
    frame["volume"] = 1.0
    fund = pd.DataFrame(funding).assign(mark_price=100.0)
    a = run_backtest(frame, pred, strategy=P, broker=B, symbol=SYMBOL, funding=fund)
    b = run_backtest(bars, pd.Series(pred), strategy=P, broker=B, symbol=SYMBOL, funding=funding)
    assert a.trades == b.trades and a.trades
    rows = a.trade_rows()
    assert list(rows[0]) == [f.name for f in dataclasses.fields(a.trades[0])]
    assert rows[0]["side"] in ("long", "short") and math.isfinite(rows[0]["net_pnl"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b, p, f: b.pop("close"), "missing column 'close'"),
        (lambda b, p, f: b.update(ts_ms=b["ts_ms"][::-1].copy()), "must increase by at least bar_ms"),
        (lambda b, p, f: b.update(ts_ms=b["ts_ms"].astype(float)), "integer array of epoch ms"),
        (lambda b, p, f: b["low"].__setitem__(5, b["high"][5] * 2), r"bars\[5\].*need low <= open"),
        (lambda b, p, f: b["open"].__setitem__(7, -1.0), r"bars.open\[7\].*finite price > 0"),
        (lambda b, p, f: b.update(high=b["high"][:-1]), "bars.high must hold 50 values"),
        (lambda b, p, f: f.update(funding_rate=np.full(len(f["ts_ms"]), np.nan)), "funding_rate.*finite"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(change, message) -> None:
    bars, pred, funding = scenario(0, 50)
    change(bars, pred, funding)
    with pytest.raises(DataValidationError, match=message):
        run_backtest(bars, pred, strategy=P, broker=B, symbol=SYMBOL, funding=funding)


def test_bad_signal_length_symbol_and_empty_bars() -> None:
    bars, pred, _ = scenario(0, 50)
    with pytest.raises(DataValidationError, match="one value per bar"):
        run_backtest(bars, pred[:-1], strategy=P, broker=B, symbol=SYMBOL)
    with pytest.raises(DataValidationError, match="symbol"):
        run_backtest(bars, pred, strategy=P, broker=B, symbol="")
    empty = {k: v[:0] for k, v in bars.items()}
    with pytest.raises(DataValidationError, match="no bars"):
        run_backtest(empty, pred[:0], strategy=P, broker=B, symbol=SYMBOL)


def test_real_btc_month_fast_equals_reference() -> None:
    """The real BTC/USDT 1m month with a model-like signal (a forward return seen through heavy noise)."""
    month = pd.read_parquet(shared_file("binance_spot_btcusdt_1m_20230417-20230517.parquet"))
    ts = ((month["date"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)).to_numpy(np.int64)
    bars = {"ts_ms": ts, **{c: month[c].to_numpy(np.float64) for c in ("open", "high", "low", "close")}}
    close = bars["close"]
    fwd = np.full(len(close), np.nan)
    fwd[:-10] = np.log(close[10:] / close[:-10]) * 1e4
    rng = np.random.default_rng(0)
    pred = 0.3 * fwd + rng.normal(0.0, 3.0, len(close))
    settle = np.arange(ts[0] - ts[0] % (8 * 3_600_000), ts[-1], 8 * 3_600_000)
    funding = {"ts_ms": settle, "funding_rate": np.full(len(settle), 1e-4)}
    fast, ref = both(bars, pred, funding)
    assert_identical(fast, ref)
    assert_components_add_up(fast)
    assert_next_open_fills(fast, bars)
    assert len(fast.trades) > 50 and fast.bars_evaluated < len(close) / 2


def test_trade_records_are_the_constructors_instances() -> None:
    fields = ("short", 1.5, T0, 100.0, T0 + 5 * MIN, 99.0, "signal_short", "reversal", 1.5, 0.12, 0.03, -0.01, 1.36)
    built, made = engine._trade(*fields), Trade(*fields)
    assert type(built) is Trade and built == made and hash(built) == hash(made) and repr(built) == repr(made)
    assert list(vars(built)) == [f.name for f in dataclasses.fields(Trade)] and built.to_dict() == made.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.qty = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("enabled", [True, False])
def test_a_run_leaves_the_garbage_collector_as_it_found_it(enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both engines pause the cyclic collector while they run; it is enabled again only if it was on, also
    when the run fails half-way."""
    bars, pred, funding = scenario(1, 300)
    calls = 0

    def decide_then_fail(*args, **kwargs):  # the real _decide(), until the run is well under way
        nonlocal calls
        calls += 1
        if calls > 20:
            raise RuntimeError("failed half-way")
        return engine_decide(*args, **kwargs)

    engine_decide = engine._decide
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        fast, ref = both(bars, pred, funding)
        assert gc.isenabled() is enabled
        assert_identical(fast, ref)
        monkeypatch.setattr(engine, "_decide", decide_then_fail)
        for run in (run_backtest, run_backtest_reference):
            calls = 0
            with pytest.raises(RuntimeError, match="half-way"):
                run(bars, pred, strategy=P, broker=B, symbol=SYMBOL, funding=funding)
            assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
