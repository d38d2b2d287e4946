"""The rule set: each rule fires in a constructed case, timing is look-ahead free, and decisions replay exactly."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.trading.strategy import (
    DAY_MS,
    Decision,
    StrategyParams,
    StrategyState,
    decide,
    protective_prices,
    reset_kill_switch,
)

MINUTE_MS = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC, a bar open time
P = StrategyParams()
StateLong = StrategyState(expected_position_sign=1)  # the last decision entered long
StateShort = StrategyState(expected_position_sign=-1)


def step(
    state: StrategyState,
    bar_ts_ms: int,
    *,
    pred: float | None = 0.0,
    close: float = 100.0,
    high: float | None = None,
    low: float | None = None,
    qty: float = 0.0,
    entry: float = 0.0,
    equity: float = 10_000.0,
    age_ms: int = 0,
    params: StrategyParams = P,
) -> tuple[Decision, StrategyState]:
    """Decide at the close of the bar opening at ``bar_ts_ms``, ``age_ms`` after that close."""
    return decide(
        state,
        params,
        bar_ts_ms=bar_ts_ms,
        now_ms=bar_ts_ms + MINUTE_MS + age_ms,
        close=close,
        high=close if high is None else high,
        low=close if low is None else low,
        predicted_return_bps=pred,
        position_qty=qty,
        entry_price=entry,
        equity=equity,
    )


# ----- params -----------------------------------------------------------------------------------------
def test_default_params_are_valid_and_match_the_issue() -> None:
    P.validate()
    assert (P.entry_bps, P.exit_reversal_bps, P.stop_loss_pct, P.take_profit_pct) == (8.0, 4.5, 1.0, 3.0)
    assert (P.cooldown_minutes, P.kill_switch_drawdown_pct, P.base_capital) == (3.0, 3.0, 10_000.0)
    assert (P.max_bar_age_seconds, P.allow_short) == (150.0, True)
    assert all(isinstance(getattr(P, f.name), int | float | bool) for f in dataclasses.fields(P))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("entry_bps", -1.0),
        ("entry_bps", math.nan),
        ("exit_reversal_bps", -0.5),
        ("stop_loss_pct", 0.0),
        ("stop_loss_pct", 100.0),
        ("take_profit_pct", -3.0),
        ("cooldown_minutes", -1.0),
        ("kill_switch_drawdown_pct", 0.0),
        ("kill_switch_drawdown_pct", 101.0),
        ("base_capital", 0.0),
        ("position_fraction", 0.0),
        ("position_fraction", math.inf),
        ("max_bar_age_seconds", 0.0),
        ("allow_short", "yes"),
    ],
)
def test_invalid_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"strategy\.{field}"):
        dataclasses.replace(P, **{field: value}).validate()


# ----- entries ----------------------------------------------------------------------------------------
def test_entry_thresholds_are_strict_and_size_from_equity() -> None:
    d, s = step(StrategyState(), T0, pred=8.01, close=50_000.0, equity=12_000.0)
    assert (d.action, d.reason, d.side) == ("enter_long", "signal_long", "buy")
    assert d.qty == pytest.approx(12_000.0 / 50_000.0) and d.target_qty == d.qty
    assert (d.stop_price, d.take_profit_price) == pytest.approx((49_500.0, 51_500.0))
    assert d.decided_at_ms == T0 + MINUTE_MS and s.expected_position_sign == 1

    assert step(StrategyState(), T0, pred=8.0)[0].reason == "no_signal"
    assert step(StrategyState(), T0, pred=-8.0)[0].reason == "no_signal"
    d, _ = step(StrategyState(), T0, pred=-8.01)
    assert (d.action, d.side, d.target_qty) == ("enter_short", "sell", -d.qty)
    assert (d.stop_price, d.take_profit_price) == pytest.approx((101.0, 97.0))
    half = dataclasses.replace(P, position_fraction=0.5)
    assert step(StrategyState(), T0, pred=9.0, params=half)[0].qty == pytest.approx(50.0)


def test_no_entry_without_equity() -> None:
    assert step(StrategyState(), T0, pred=20.0, equity=0.0)[0].reason == "no_equity"


def test_shorts_can_be_disabled() -> None:
    no_short = dataclasses.replace(P, allow_short=False)
    assert step(StrategyState(), T0, pred=-20.0, params=no_short)[0].reason == "short_disabled"
    assert step(StrategyState(), T0, pred=20.0, params=no_short)[0].action == "enter_long"


@pytest.mark.parametrize("pred", [None, math.nan, math.inf])
def test_missing_prediction_holds(pred: float | None) -> None:
    d, _ = step(StrategyState(), T0, pred=pred)
    assert (d.action, d.reason, d.predicted_return_bps) == ("hold", "no_prediction", None)
    # In a position, a missing prediction does not block the stop.
    d, _ = step(StateLong, T0, pred=pred, low=98.0, qty=1.0, entry=100.0)
    assert (d.action, d.reason) == ("exit", "stop_loss")


# ----- exits ------------------------------------------------------------------------------------------
def test_stop_loss_and_take_profit_of_a_long() -> None:
    stop, take = protective_prices(P, 1, 100.0)
    d, s = step(StateLong, T0, close=99.5, low=stop, high=99.9, qty=2.0, entry=100.0)
    assert (d.action, d.reason, d.side, d.qty, d.target_qty) == ("exit", "stop_loss", "sell", 2.0, 0.0)
    assert s.expected_position_sign == 0
    d, _ = step(StateLong, T0, close=99.5, low=math.nextafter(stop, 200.0), high=99.9, qty=2.0, entry=100.0)
    assert (d.action, d.reason) == ("hold", "in_position")
    d, _ = step(StateLong, T0, close=102.0, low=101.0, high=take, qty=2.0, entry=100.0)
    assert (d.action, d.reason) == ("exit", "take_profit")


def test_stop_loss_and_take_profit_of_a_short() -> None:
    stop, take = protective_prices(P, -1, 100.0)
    assert (stop, take) == pytest.approx((101.0, 97.0))
    d, _ = step(StateShort, T0, close=100.5, high=stop, low=100.0, qty=-1.0, entry=100.0)
    assert (d.action, d.reason, d.side, d.qty) == ("exit", "stop_loss", "buy", 1.0)
    d, _ = step(StateShort, T0, close=97.5, high=98.0, low=take, qty=-1.0, entry=100.0)
    assert (d.action, d.reason) == ("exit", "take_profit")


def test_both_levels_in_one_bar_the_stop_wins() -> None:
    d, _ = step(StateLong, T0, close=100.0, low=98.0, high=104.0, qty=1.0, entry=100.0, pred=50.0)
    assert (d.action, d.reason) == ("exit", "stop_loss")
    d, _ = step(StateShort, T0, close=100.0, low=96.0, high=102.0, qty=-1.0, entry=100.0, pred=-50.0)
    assert (d.action, d.reason) == ("exit", "stop_loss")


def test_reversal_exit_is_strict_and_opposite_only() -> None:
    assert step(StateLong, T0, pred=-4.51, qty=1.0, entry=100.0)[0].reason == "reversal"
    assert step(StateLong, T0, pred=-4.5, qty=1.0, entry=100.0)[0].reason == "in_position"
    assert step(StateLong, T0, pred=30.0, qty=1.0, entry=100.0)[0].reason == "in_position"
    d, _ = step(StateShort, T0, pred=4.51, qty=-1.0, entry=100.0)
    assert (d.action, d.reason, d.side) == ("exit", "reversal", "buy")
    assert step(StateShort, T0, pred=-30.0, qty=-1.0, entry=100.0)[0].reason == "in_position"


# ----- cooldown ---------------------------------------------------------------------------------------
def test_cooldown_blocks_entries_for_three_minutes_after_an_exit() -> None:
    d, s = step(StateLong, T0, pred=-20.0, qty=1.0, entry=100.0)
    assert d.reason == "reversal"
    exit_ms = T0 + MINUTE_MS
    assert s.cooldown_until_ms == exit_ms + 3 * MINUTE_MS
    # Bars closing 1 and 2 minutes after the exit are blocked; 3 minutes after, entries are allowed again.
    d, s = step(s, T0 + MINUTE_MS, pred=-20.0)
    assert d.reason == "cooldown"
    d, s = step(s, T0 + 2 * MINUTE_MS, pred=-20.0)
    assert d.reason == "cooldown"
    d, s = step(s, T0 + 3 * MINUTE_MS, pred=-20.0)
    assert d.action == "enter_short"


def test_an_exit_made_by_the_broker_starts_the_cooldown_too() -> None:
    d, s = step(StrategyState(), T0, pred=20.0)
    assert d.action == "enter_long"
    # The position is gone at the next close without an exit decision: a broker stop filled during the bar.
    d, s = step(s, T0 + MINUTE_MS, pred=20.0, qty=0.0)
    assert d.reason == "cooldown"
    assert s.cooldown_until_ms == T0 + 2 * MINUTE_MS + 3 * MINUTE_MS
    assert step(s, T0 + 4 * MINUTE_MS, pred=20.0)[0].action == "enter_long"


# ----- kill switch ------------------------------------------------------------------------------------
def test_kill_switch_trips_at_three_percent_and_flattens() -> None:
    _, s = step(StrategyState(), T0, equity=10_000.0)
    assert (s.day_start_equity, s.kill_switch_tripped) == (10_000.0, False)
    _, s2 = step(s, T0 + MINUTE_MS, qty=1.0, entry=100.0, equity=9_701.0)
    assert not s2.kill_switch_tripped
    d, s3 = step(s, T0 + MINUTE_MS, qty=1.0, entry=100.0, equity=9_700.0, pred=50.0)
    assert s3.kill_switch_tripped and s3.kill_switch_tripped_at_ms == T0 + 2 * MINUTE_MS
    assert (d.action, d.reason, d.side) == ("exit", "kill_switch", "sell")
    # Tripped: no entries for the rest of the day, even after equity recovers.
    d, s4 = step(s3, T0 + 10 * MINUTE_MS, pred=50.0, equity=10_500.0)
    assert (d.action, d.reason) == ("hold", "kill_switch")
    last_bar_of_day = T0 + DAY_MS - 2 * MINUTE_MS  # closes 23:59, still the same UTC day
    d, s5 = step(s4, last_bar_of_day, pred=50.0, equity=10_500.0)
    assert d.reason == "kill_switch"
    # The bar opening 23:59 closes at 00:00: the first decision of the next UTC day resets the switch.
    d, s6 = step(s5, T0 + DAY_MS - MINUTE_MS, pred=50.0, equity=10_500.0)
    assert (d.action, s6.kill_switch_tripped, s6.day_start_equity) == ("enter_long", False, 10_500.0)


def test_kill_switch_counts_from_the_day_start_not_the_peak() -> None:
    _, s = step(StrategyState(), T0, equity=10_000.0)
    _, s = step(s, T0 + MINUTE_MS, equity=11_000.0)  # a new high does not move the baseline
    _, s = step(s, T0 + 2 * MINUTE_MS, equity=9_750.0)
    assert not s.kill_switch_tripped
    _, s = step(s, T0 + 3 * MINUTE_MS, equity=9_699.0)
    assert s.kill_switch_tripped


def test_kill_switch_explicit_reset_rebases_on_the_next_equity() -> None:
    _, s = step(StrategyState(), T0, equity=10_000.0)
    _, s = step(s, T0 + MINUTE_MS, equity=9_500.0)
    assert s.kill_switch_tripped
    s = reset_kill_switch(s)
    d, s = step(s, T0 + 2 * MINUTE_MS, equity=9_500.0, pred=20.0)
    assert (d.action, s.kill_switch_tripped, s.day_start_equity) == ("enter_long", False, 9_500.0)
    _, s = step(s, T0 + 3 * MINUTE_MS, qty=1.0, entry=100.0, equity=9_216.0)  # 2.99 % below the new base
    assert not s.kill_switch_tripped


# ----- stale data -------------------------------------------------------------------------------------
def test_stale_data_blocks_entries_but_not_exits() -> None:
    assert step(StrategyState(), T0, pred=20.0, age_ms=150_000)[0].action == "enter_long"
    d, _ = step(StrategyState(), T0, pred=20.0, age_ms=150_001)
    assert (d.action, d.reason) == ("hold", "stale_data")
    d, _ = step(StateLong, T0, pred=20.0, low=98.0, qty=1.0, entry=100.0, age_ms=3_600_000)
    assert (d.action, d.reason) == ("exit", "stop_loss")
    d, _ = step(StateLong, T0, pred=-20.0, qty=1.0, entry=100.0, age_ms=3_600_000)
    assert (d.action, d.reason) == ("exit", "reversal")


# ----- timing and input checks ------------------------------------------------------------------------
def test_an_unclosed_bar_is_refused() -> None:
    with pytest.raises(DataValidationError, match="not closed"):
        decide(
            StrategyState(), P, bar_ts_ms=T0, now_ms=T0 + MINUTE_MS - 1, close=100.0, high=100.0, low=100.0,
            predicted_return_bps=20.0, position_qty=0.0, entry_price=0.0, equity=10_000.0,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"close": math.nan}, "close"),
        ({"high": -1.0}, "high"),
        ({"low": 101.0}, "low <= close"),
        ({"equity": math.inf}, "equity"),
        ({"position_qty": 1.0, "entry_price": math.nan}, "entry_price"),
        ({"bar_ts_ms": float(T0)}, "bar_ts_ms"),
        ({"predicted_return_bps": "9"}, "predicted_return_bps"),
        ({"predicted_return_bps": True}, "predicted_return_bps"),
        ({"now_ms": float(T0 + MINUTE_MS)}, "now_ms"),
        ({"bar_ms": 0}, "bar_ms must be > 0"),
        ({"low": math.inf}, "low must be a finite price"),
        ({"high": 99.0}, "low <= close <= high"),
        ({"position_qty": math.nan}, "position_qty"),
        ({"equity": np.float64(math.nan)}, "equity"),
    ],
)
def test_bad_inputs_name_what_is_wrong(changes: dict[str, object], name: str) -> None:
    kwargs: dict[str, object] = {
        "bar_ts_ms": T0, "now_ms": T0 + MINUTE_MS, "close": 100.0, "high": 100.0, "low": 100.0,
        "predicted_return_bps": 0.0, "position_qty": 0.0, "entry_price": 0.0, "equity": 10_000.0,
    }  # fmt: skip
    kwargs.update(changes)
    with pytest.raises(DataValidationError, match=name):
        decide(StrategyState(), P, **kwargs)  # type: ignore[arg-type]


def test_bars_going_back_in_time_are_refused() -> None:
    _, s = step(StrategyState(), T0 + 5 * MINUTE_MS)
    step(s, T0 + 5 * MINUTE_MS)  # the same bar again is allowed (replay)
    with pytest.raises(DataValidationError, match="earlier"):
        step(s, T0)


def test_infinite_or_missing_predictions_of_any_number_type_are_no_prediction() -> None:
    for pred in (None, math.nan, math.inf, -math.inf, np.float64(math.nan), np.float32(math.inf)):
        d, _ = step(StrategyState(), T0, pred=pred)  # type: ignore[arg-type]
        assert d.reason == "no_prediction" and d.predicted_return_bps is None
    d, _ = step(StrategyState(), T0, pred=9)  # an int prediction is a number like any other
    assert d.action == "enter_long" and type(d.predicted_return_bps) is float


def test_the_fast_builders_make_the_constructors_instances() -> None:
    from cryptoml.trading import strategy

    decision_fields = ("exit", "reversal", T0, T0 + MINUTE_MS, -5.0, "sell", 1.5, 0.0, None, None)
    state_fields = (19_723, 10_000.0, True, T0, T0 + 4 * MINUTE_MS, -1, T0)
    for built, made in (
        (strategy._decision(*decision_fields), Decision(*decision_fields)),
        (strategy._state(*state_fields), StrategyState(*state_fields)),
    ):
        assert type(built) is type(made) and built == made and hash(built) == hash(made) and repr(built) == repr(made)
        assert list(vars(built)) == [f.name for f in dataclasses.fields(made)] and vars(built) == vars(made)
        assert built.to_dict() == made.to_dict()
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.action = "hold"  # type: ignore[misc, union-attr]


def test_numpy_scalars_are_accepted_and_outputs_are_plain_python() -> None:
    d, s = decide(
        StrategyState(), P, bar_ts_ms=np.int64(T0), now_ms=np.int64(T0 + MINUTE_MS), close=np.float64(100.0),
        high=np.float32(100.5), low=np.float64(99.5), predicted_return_bps=np.float32(12.0),
        position_qty=np.float64(0.0), entry_price=np.float64(0.0), equity=np.float64(10_000.0),
    )  # fmt: skip
    assert d.action == "enter_long"
    assert json.loads(json.dumps(d.to_dict())) == d.to_dict()
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict()


# ----- determinism and persistence --------------------------------------------------------------------
bars = st.lists(
    st.tuples(
        st.floats(-30.0, 30.0) | st.none(),  # prediction (bps)
        st.floats(-0.02, 0.02),  # close-to-close return
        st.floats(0.0, 0.02),  # high above max(open, close), as a fraction
        st.floats(0.0, 0.02),  # low below min(open, close)
        st.integers(0, 200_000),  # decision latency after the close (ms)
    ),
    min_size=1,
    max_size=120,
)


def run_with_toy_fills(state: StrategyState, rows: list, *, roundtrip: bool) -> list[dict]:
    """Drive decide() with fills at the close (a toy account) to check determinism and state persistence."""
    out, price, qty, entry, cash = [], 100.0, 0.0, 0.0, 10_000.0
    for i, (pred, ret, up, down, latency) in enumerate(rows):
        close = price * (1.0 + ret)
        high, low = max(price, close) * (1.0 + up), min(price, close) * (1.0 - down)
        bar = T0 + i * 17 * MINUTE_MS  # sparse bars also cross UTC days
        d, state = decide(
            state, P, bar_ts_ms=bar, now_ms=bar + MINUTE_MS + latency, close=close, high=high, low=low,
            predicted_return_bps=pred, position_qty=qty, entry_price=entry, equity=cash + qty * close,
        )  # fmt: skip
        if roundtrip:
            state = StrategyState.from_dict(json.loads(json.dumps(state.to_dict())))
        if d.action == "exit":
            cash, qty, entry = cash + qty * close, 0.0, 0.0
        elif d.action.startswith("enter"):
            cash, qty, entry = cash - d.target_qty * close, d.target_qty, close
        out.append(d.to_dict())
        price = close
    return out


@settings(max_examples=60, deadline=None)
@given(bars)
def test_decisions_are_deterministic_and_survive_a_state_round_trip(rows: list) -> None:
    first = run_with_toy_fills(StrategyState(), rows, roundtrip=False)
    assert first == run_with_toy_fills(StrategyState(), rows, roundtrip=True)
    for d in first:
        assert d["action"] in ("enter_long", "enter_short", "exit", "hold") and d["reason"]
        assert (d["side"] is None) == (d["action"] == "hold")


def test_state_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(DataValidationError, match="unknown keys"):
        StrategyState.from_dict({"cooldown_until": 5})


@settings(max_examples=40, deadline=None)
@given(bars)
def test_the_engine_entry_point_decides_as_decide(rows: list) -> None:
    """``_decide`` (decide() past its input checks, the backtest engine's call) takes the same decisions."""
    from cryptoml.trading.strategy import _decide

    public = private = StrategyState()
    qty, entry, cash, price = 0.0, 0.0, 10_000.0, 100.0
    for i, (pred, ret, up, down, latency) in enumerate(rows):
        close = price * (1.0 + ret)
        high, low = max(price, close) * (1.0 + up), min(price, close) * (1.0 - down)
        bar, now, equity = T0 + i * 17 * MINUTE_MS, T0 + i * 17 * MINUTE_MS + MINUTE_MS + latency, cash + qty * close
        d1, public = decide(
            public, P, bar_ts_ms=bar, now_ms=now, close=close, high=high, low=low, predicted_return_bps=pred,
            position_qty=qty, entry_price=entry, equity=equity,
        )  # fmt: skip
        d2, private = _decide(private, P, bar, now, close, high, low, pred, qty, entry, equity, MINUTE_MS)
        assert d1 == d2 and public == private
        if d1.action == "exit":
            cash, qty, entry = cash + qty * close, 0.0, 0.0
        elif d1.action.startswith("enter"):
            cash, qty, entry = cash - d1.target_qty * close, d1.target_qty, close
        price = close
