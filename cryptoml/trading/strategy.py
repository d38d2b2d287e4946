"""The trading rules, in one pure function shared by the edge runner and the walk-forward backtest.

Timing (one call of :func:`decide` per closed bar):

- ``bar_ts_ms`` is the bar's **open** time; the bar closes at ``bar_close_ms = bar_ts_ms + bar_ms``. The
  decision is made at that close, from that bar's ``close`` / ``high`` / ``low`` and a prediction computed
  from features of that bar and earlier only. All rule clocks (cooldown, kill-switch day) use
  ``bar_close_ms``, never ``now_ms``, so the live runner and the backtest take the same decisions on the
  same bars; ``now_ms`` only measures staleness and must be ``>= bar_close_ms`` (an unclosed bar is refused).
- The order a decision asks for is executed after the close: the live runner sends it at once, the
  backtest fills it at the next bar's open. ``position_qty`` / ``entry_price`` / ``equity`` are the broker's
  figures at the close of this bar (equity marked at ``close``).
- Stop-loss and take-profit compare the bar's ``low`` / ``high`` with levels set from ``entry_price``; the
  caller passes only bars that began at or after the entry. When one bar touches both levels the stop-loss
  wins (the conservative reading: the order of the two touches inside a bar is unknown).
- Exits are always allowed (stale data, missing prediction, tripped kill switch included). A position that
  disappears without an exit decided here (a broker-side stop or take-profit filled during the bar) counts
  as an exit at this bar's close and starts the cooldown from there.

Rules, first match wins. In a position: kill switch -> ``exit``/``kill_switch``; ``low <= stop`` (long) or
``high >= stop`` (short) -> ``exit``/``stop_loss``; take-profit level reached -> ``exit``/``take_profit``;
prediction missing -> ``hold``/``no_prediction``; prediction past the reversal threshold against the
position (long: ``< -exit_reversal_bps``, short: ``> +exit_reversal_bps``) -> ``exit``/``reversal``; else
``hold``/``in_position``. Flat: kill switch -> ``kill_switch``; bar older than ``max_bar_age_seconds`` at
``now_ms`` -> ``stale_data``; prediction missing or NaN -> ``no_prediction``; ``|prediction| <= entry_bps``
-> ``no_signal``; inside the cooldown -> ``cooldown``; short signal with shorts off -> ``short_disabled``;
``equity <= 0`` -> ``no_equity``; else ``enter_long``/``signal_long`` or ``enter_short``/``signal_short``.

Kill switch: the UTC day of ``bar_close_ms`` starts with the equity passed at its first decision. When
``equity`` falls ``kill_switch_drawdown_pct`` percent or more below it, the switch trips and stays tripped
until the first decision of a later UTC day or :func:`reset_kill_switch`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from cryptoml.config import StrategyParams
from cryptoml.errors import DataValidationError

DAY_MS = 86_400_000
_INF = math.inf
ACTIONS = ("enter_long", "enter_short", "exit", "hold")


@dataclass(frozen=True)
class StrategyState:
    """Everything :func:`decide` remembers between bars (JSON-safe via to_dict / from_dict).

    ``day`` is the UTC day number (``bar_close_ms // 86_400_000``) of the last decision; ``day_start_equity``
    its first equity (None until then or after :func:`reset_kill_switch`); ``expected_position_sign`` the
    position sign the last decision asked for (+1, -1, 0), used to notice exits made by the broker.
    """

    day: int | None = None
    day_start_equity: float | None = None
    kill_switch_tripped: bool = False
    kill_switch_tripped_at_ms: int | None = None
    cooldown_until_ms: int = 0
    expected_position_sign: int = 0
    last_bar_ts_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StrategyState:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise DataValidationError(f"strategy state: unknown keys {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Decision:
    """What to do at the close of bar ``bar_ts_ms``.

    ``side`` ('buy' / 'sell') and ``qty`` (> 0, base units) describe the order to send for ``enter_*`` and
    ``exit``; both are None / 0.0 for ``hold``. ``target_qty`` is the signed position wanted afterwards.
    For entries ``stop_price`` / ``take_profit_price`` are the protective levels from ``close`` (recompute
    them from the real fill with :func:`protective_prices`).
    """

    action: str
    reason: str
    bar_ts_ms: int
    decided_at_ms: int  # the bar's close time
    predicted_return_bps: float | None
    side: str | None = None
    qty: float = 0.0
    target_qty: float = 0.0
    stop_price: float | None = None
    take_profit_price: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Builders of the same instances as Decision(...) and StrategyState(...) for decide(): a frozen dataclass's
# __init__ pays one object.__setattr__ per field, filling the instance __dict__ directly (the way pickle
# restores frozen dataclasses) a third of that. Every field, in field order (a test compares them).
_new = object.__new__


def _decision(
    action: str,
    reason: str,
    bar_ts_ms: int,
    decided_at_ms: int,
    predicted_return_bps: float | None,
    side: str | None,
    qty: float,
    target_qty: float,
    stop_price: float | None,
    take_profit_price: float | None,
) -> Decision:
    decision: Decision = _new(Decision)
    fields = decision.__dict__
    fields["action"] = action
    fields["reason"] = reason
    fields["bar_ts_ms"] = bar_ts_ms
    fields["decided_at_ms"] = decided_at_ms
    fields["predicted_return_bps"] = predicted_return_bps
    fields["side"] = side
    fields["qty"] = qty
    fields["target_qty"] = target_qty
    fields["stop_price"] = stop_price
    fields["take_profit_price"] = take_profit_price
    return decision


def _state(
    day: int | None,
    day_start_equity: float | None,
    kill_switch_tripped: bool,
    kill_switch_tripped_at_ms: int | None,
    cooldown_until_ms: int,
    expected_position_sign: int,
    last_bar_ts_ms: int | None,
) -> StrategyState:
    state: StrategyState = _new(StrategyState)
    fields = state.__dict__
    fields["day"] = day
    fields["day_start_equity"] = day_start_equity
    fields["kill_switch_tripped"] = kill_switch_tripped
    fields["kill_switch_tripped_at_ms"] = kill_switch_tripped_at_ms
    fields["cooldown_until_ms"] = cooldown_until_ms
    fields["expected_position_sign"] = expected_position_sign
    fields["last_bar_ts_ms"] = last_bar_ts_ms
    return state


def protective_prices(params: StrategyParams, position_sign: int, entry_price: float) -> tuple[float, float]:
    """(stop-loss price, take-profit price) of a long (+1) or short (-1) entered at ``entry_price``."""
    if position_sign not in (1, -1):
        raise DataValidationError(f"position_sign must be +1 or -1, got {position_sign!r}")
    stop = entry_price * (1.0 - position_sign * params.stop_loss_pct / 100.0)
    take = entry_price * (1.0 + position_sign * params.take_profit_pct / 100.0)
    return stop, take


def reset_kill_switch(state: StrategyState) -> StrategyState:
    """Explicit reset: untrip, and measure the day's drawdown from the equity of the next decision."""
    return dataclasses.replace(state, kill_switch_tripped=False, kill_switch_tripped_at_ms=None, day_start_equity=None)


def decide(
    state: StrategyState,
    params: StrategyParams,
    *,
    bar_ts_ms: int,
    now_ms: int,
    close: float,
    high: float,
    low: float,
    predicted_return_bps: float | None,
    position_qty: float,
    entry_price: float,
    equity: float,
    bar_ms: int = 60_000,
) -> tuple[Decision, StrategyState]:
    """One decision at the close of bar ``bar_ts_ms`` (see the module docstring); pure and deterministic.

    ``position_qty`` is signed (base units, + long); ``entry_price`` its average entry price (ignored when
    flat); ``equity`` the account equity marked at ``close``; ``predicted_return_bps`` the model's forward
    return in basis points (None or NaN = no prediction). Returns the decision and the new state.
    """
    # Validation in two tiers (the backtest calls this on every bar that can act): plain ints and finite
    # floats pass the inline tests; anything else goes through the converters, which raise in the same
    # order as they are listed here (a chained comparison is False for NaN).
    if not (type(bar_ts_ms) is int and type(now_ms) is int and type(bar_ms) is int):
        bar_ts_ms, now_ms, bar_ms = (
            _as_int("bar_ts_ms", bar_ts_ms),
            _as_int("now_ms", now_ms),
            _as_int("bar_ms", bar_ms),
        )
    if not (type(close) is float and type(high) is float and type(low) is float and 0.0 < low <= close <= high < _INF):
        close, high, low = _as_price("close", close), _as_price("high", high), _as_price("low", low)
    if not (
        type(position_qty) is float and type(equity) is float and -_INF < position_qty < _INF and -_INF < equity < _INF
    ):
        position_qty, equity = _as_finite("position_qty", position_qty), _as_finite("equity", equity)
    if bar_ms <= 0 or not low <= close <= high or now_ms < bar_ts_ms + bar_ms:
        _check_bar(bar_ts_ms, now_ms, bar_ms, close, high, low)
    if position_qty != 0 and not (type(entry_price) is float and 0.0 < entry_price < _INF):
        entry_price = _as_price("entry_price", entry_price)
    if state.last_bar_ts_ms is not None and bar_ts_ms < state.last_bar_ts_ms:
        raise DataValidationError(f"bar_ts_ms {bar_ts_ms} is earlier than the last decided bar {state.last_bar_ts_ms}")
    # None or NaN / inf: the model had no usable answer (warm-up, missing features) -> no prediction.
    if type(predicted_return_bps) is float:
        pred = predicted_return_bps if -_INF < predicted_return_bps < _INF else None
    elif predicted_return_bps is None:
        pred = None
    elif isinstance(predicted_return_bps, bool) or not isinstance(predicted_return_bps, numbers.Real):
        raise DataValidationError(f"predicted_return_bps must be a number or None, got {predicted_return_bps!r}")
    else:
        pred = float(predicted_return_bps)
        if not math.isfinite(pred):
            pred = None
    return _decide(state, params, bar_ts_ms, now_ms, close, high, low, pred, position_qty, entry_price, equity, bar_ms)


def _decide(
    state: StrategyState,
    params: StrategyParams,
    bar_ts_ms: int,
    now_ms: int,
    close: float,
    high: float,
    low: float,
    pred: float | None,
    position_qty: float,
    entry_price: float,
    equity: float,
    bar_ms: int,
) -> tuple[Decision, StrategyState]:
    """:func:`decide` past its input checks, for a caller whose inputs are valid by construction (the
    backtest engine: validated bars in time order, the broker's own position and equity): plain ints,
    finite floats, ``0 < low <= close <= high``, a closed bar, ``pred`` None or finite."""
    close_ms = bar_ts_ms + bar_ms
    sign = 0 if position_qty == 0 else (1 if position_qty > 0 else -1)

    # The state is rebuilt once at the end (the backtest calls this once per bar: keep it cheap).
    day, day_start_equity = state.day, state.day_start_equity
    tripped, tripped_at_ms = state.kill_switch_tripped, state.kill_switch_tripped_at_ms
    cooldown_until_ms = state.cooldown_until_ms
    # A position the last decision wanted but which is gone now was closed by the broker during this bar.
    if state.expected_position_sign != 0 and sign == 0:
        cooldown_until_ms = max(cooldown_until_ms, close_ms + round(params.cooldown_minutes * 60_000))
    today = close_ms // DAY_MS
    if day != today:  # first decision of a UTC day: new baseline, switch untripped
        day, day_start_equity, tripped, tripped_at_ms = today, equity, False, None
    elif day_start_equity is None:  # first decision after reset_kill_switch
        day_start_equity = equity
    if (
        not tripped
        and day_start_equity is not None
        and day_start_equity > 0
        and (day_start_equity - equity) / day_start_equity * 100.0 >= params.kill_switch_drawdown_pct
    ):
        tripped, tripped_at_ms = True, close_ms

    action, reason, side, qty, target_qty = "hold", "", None, 0.0, position_qty
    stop_price = take_profit_price = None
    if sign != 0:
        exit_reason = "kill_switch" if tripped else _exit_reason(params, sign, high, low, entry_price, pred)
        if exit_reason is None:
            reason = "no_prediction" if pred is None else "in_position"
        else:
            action, reason, side = "exit", exit_reason, ("sell" if sign > 0 else "buy")
            qty, target_qty = abs(position_qty), 0.0
            cooldown_until_ms = max(cooldown_until_ms, close_ms + round(params.cooldown_minutes * 60_000))
    elif tripped:
        reason = "kill_switch"
    elif now_ms - close_ms > params.max_bar_age_seconds * 1000.0:
        reason = "stale_data"
    elif pred is None:
        reason = "no_prediction"
    elif -params.entry_bps <= pred <= params.entry_bps:
        reason = "no_signal"
    elif close_ms < cooldown_until_ms:
        reason = "cooldown"
    elif pred < 0 and not params.allow_short:
        reason = "short_disabled"
    elif equity <= 0:
        reason = "no_equity"
    else:
        new_sign = 1 if pred > 0 else -1
        action = "enter_long" if new_sign > 0 else "enter_short"
        reason = "signal_long" if new_sign > 0 else "signal_short"
        side = "buy" if new_sign > 0 else "sell"
        qty = equity * params.position_fraction / close
        target_qty = new_sign * qty
        stop_price, take_profit_price = protective_prices(params, new_sign, close)

    decision = _decision(
        action, reason, bar_ts_ms, close_ms, pred, side, qty, target_qty, stop_price, take_profit_price
    )
    expected_sign = 0 if target_qty == 0 else (1 if target_qty > 0 else -1)
    new_state = _state(day, day_start_equity, tripped, tripped_at_ms, cooldown_until_ms, expected_sign, bar_ts_ms)
    return decision, new_state


def _exit_reason(
    params: StrategyParams, sign: int, high: float, low: float, entry_price: float, pred: float | None
) -> str | None:
    stop, take = protective_prices(params, sign, entry_price)
    # Stop before take-profit: when a bar touches both, assume the adverse touch came first.
    if (sign > 0 and low <= stop) or (sign < 0 and high >= stop):
        return "stop_loss"
    if (sign > 0 and high >= take) or (sign < 0 and low <= take):
        return "take_profit"
    if pred is None:
        return None
    if (sign > 0 and pred < -params.exit_reversal_bps) or (sign < 0 and pred > params.exit_reversal_bps):
        return "reversal"
    return None


def _finite(x: Any) -> bool:
    if type(x) is float or type(x) is int:  # fast path: ABC isinstance checks dominate a per-bar call
        return math.isfinite(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _as_int(name: str, value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataValidationError(f"{name} must be an integer (epoch ms), got {value!r}")
    return int(value)


def _as_finite(name: str, value: Any) -> float:
    if not _finite(value):
        raise DataValidationError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _as_price(name: str, value: Any) -> float:
    if not _finite(value) or value <= 0:
        raise DataValidationError(f"{name} must be a finite price > 0, got {value!r}")
    return float(value)


def _check_bar(bar_ts_ms: int, now_ms: int, bar_ms: int, close: float, high: float, low: float) -> None:
    if bar_ms <= 0:
        raise DataValidationError(f"bar_ms must be > 0, got {bar_ms}")
    if not low <= close <= high:
        raise DataValidationError(f"bar {bar_ts_ms}: need low <= close <= high, got {low}, {close}, {high}")
    if now_ms < bar_ts_ms + bar_ms:
        raise DataValidationError(
            f"bar {bar_ts_ms} has not closed at now_ms {now_ms} (closes at {bar_ts_ms + bar_ms}): no look-ahead"
        )
