"""Backtest engine: the edge runner's strategy and paper broker over one symbol's 1-minute bars and precomputed signals.

There is no trading logic here: every decision is :func:`cryptoml.trading.strategy.decide` and every fill a
:class:`~cryptoml.trading.broker.PaperBroker` fill, with the runner's client order ids and protective
orders. What differs from the runner is only when orders execute.

Timing of bar ``i`` (``ts_ms[i]`` is its **open**; it closes at ``ts_ms[i] + bar_ms``), in this order:

1. **Funding**: settlements of the ``funding`` table are applied with
   :meth:`~cryptoml.trading.broker.PaperBroker.apply_funding` to the position carried *into* the bar, at
   the bar whose ``[open, close)`` holds the settlement time (or the first bar after it when it falls in a
   gap), before any of that bar's fills; the mark price is that bar's ``open``. A settlement exactly at a
   bar open therefore charges the position held before that open's fill: it was held up to the settlement,
   and the order filling at the open was only decided at the previous close. Settlements before the first
   bar's open or after the last bar's close are ignored.
2. **The order decided at the previous close** fills at this bar's ``open`` (``submit_market(...,
   ts_ms=ts_ms[i], price=open[i])``, slippage by the broker's model). An exit first cancels the resting
   protective orders (at the decision time, as the runner does); an entry is followed at once by its
   stop-loss and take-profit orders (levels from the real fill price, :func:`protective_prices`),
   submitted at ``ts_ms[i]`` so they already guard this bar.
3. **Resting orders** run against the bar (:meth:`PaperBroker.on_bar`: stops before take-profits).
4. **Decision at the close**: ``decide(now_ms = close time, equity marked at close)`` with
   ``predicted_bps[i]`` (a prediction from bar ``i`` and earlier; NaN = none). An entry or exit it asks for
   executes at step 2 of bar ``i + 1``; on the last bar it is recorded but not executed.

So a signal cannot trade at the prices of the bar it was computed from: the earliest price it can reach is
the next bar's open.

Two engines, identical results:

- :func:`run_backtest_reference` runs steps 1-4 on every bar (about a hundred thousand bars/s).
- :func:`run_backtest` runs steps 3-4 only on bars where something *can* happen and fills the others in
  with numpy. Flat, only a bar with a tradeable signal (``|prediction| > entry_bps`` outside the
  cooldown, shorts allowed, equity > 0) can act, or the bar right after an exit fill (its cash may trip the
  kill switch); in a position, only a bar whose low / high touches a protective level, whose prediction
  passes the reversal threshold, or whose close marks equity down to the kill-switch level. Always
  processed: the first and last bar, the first bar of each UTC day (the kill-switch baseline) and funding
  bars; a bar with an order to fill always gets steps 1-2. The tests are conservative (a relative slack of
  1e-9), and the skipped bars' hold reasons, equity (``cash + qty * close``, the broker's own formula) and
  positions are filled in exactly (recorded per run of bars, written in one vectorised pass at the end);
  the tests compare both engines fill by fill. Its cost is per trade (~50 µs of CPU for a round trip:
  two decisions, four orders through the broker, the skip scans) plus ~25 ms per year of bars (input
  checks, the skip plan, ~1,500 day and funding bars): about 2 million bars/s at a dozen round trips a
  day on a quiet core. Decisions, bars and orders go through the same code as the runner's, past the
  argument checks that the engine's values pass by construction (``strategy._decide``,
  ``PaperBroker._on_bar`` / ``_market`` / ``_resting``).

PnL components (quote currency): ``gross_pnl`` is price PnL at the reference prices (before slippage);
``slippage_cost``, ``fees`` and ``funding`` (> 0 = paid) are costs; ``net_pnl = gross_pnl - slippage_cost
- fees - funding`` equals the change of equity (to floating-point rounding), overall and per trade.
"""

from __future__ import annotations

import dataclasses
import gc
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryptoml.config import PaperBrokerParams, StrategyParams
from cryptoml.errors import DataValidationError
from cryptoml.trading.broker import Fill, PaperBroker, make_client_order_id
from cryptoml.trading.strategy import DAY_MS, Decision, StrategyState, _decide, protective_prices

BAR_COLUMNS = ("ts_ms", "open", "high", "low", "close")
EXIT_REASONS = ("reversal", "stop_loss", "take_profit", "kill_switch", "end_of_data")
# Relative slack of the skip tests: a level compared a hair too early costs one extra processed bar; a
# level missed by a rounding difference (avg entry vs fill price) would change the result.
_SLACK = 1e-9
_FIRST_SCAN = 64  # bars looked at by the first vectorised scan of a position; each next scan 4x more
# Bars of a position stepped through in Python before the vectorised scan: most holdings end within a few
# bars (a reversal signal bounds them), where a numpy scan costs more than the bars it covers.
_STEP_BARS = 10


@dataclass(frozen=True)
class Trade:
    """One round trip (flat -> position -> flat), quote-currency amounts, times in epoch ms.

    ``entry_ts_ms`` / ``exit_ts_ms`` are fill times (a bar open; a stop or take-profit fill is stamped with
    the open of the bar it triggered in); prices are fill prices (slippage included). A position still
    open after the last bar exits as ``end_of_data`` at the last close (``exit_ts_ms`` = that close time;
    no exit fee). ``gross_pnl`` is the price PnL at reference prices; ``net_pnl = gross_pnl -
    slippage_cost - fees - funding``.
    """

    side: str  # "long" | "short"
    qty: float  # base units
    entry_ts_ms: int
    entry_price: float
    exit_ts_ms: int
    exit_price: float
    entry_reason: str  # signal_long | signal_short
    exit_reason: str  # one of EXIT_REASONS
    gross_pnl: float
    fees: float
    slippage_cost: float
    funding: float  # > 0 = paid
    net_pnl: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _trade(
    side: str,
    qty: float,
    entry_ts_ms: int,
    entry_price: float,
    exit_ts_ms: int,
    exit_price: float,
    entry_reason: str,
    exit_reason: str,
    gross_pnl: float,
    fees: float,
    slippage_cost: float,
    funding: float,
    net_pnl: float,
) -> Trade:
    """The same instance as ``Trade(...)``, built the way pickle restores a frozen dataclass: filling its
    ``__dict__`` costs a third of the generated ``__init__`` (one object.__setattr__ per field). Every field,
    in field order (a test compares it with the constructor)."""
    trade: Trade = object.__new__(Trade)
    fields = trade.__dict__
    fields["side"] = side
    fields["qty"] = qty
    fields["entry_ts_ms"] = entry_ts_ms
    fields["entry_price"] = entry_price
    fields["exit_ts_ms"] = exit_ts_ms
    fields["exit_price"] = exit_price
    fields["entry_reason"] = entry_reason
    fields["exit_reason"] = exit_reason
    fields["gross_pnl"] = gross_pnl
    fields["fees"] = fees
    fields["slippage_cost"] = slippage_cost
    fields["funding"] = funding
    fields["net_pnl"] = net_pnl
    return trade


@dataclass(frozen=True)
class PnLTotals:
    """Where the equity change came from (quote currency); ``net_pnl`` equals ``equity_change``."""

    initial_equity: float
    final_equity: float  # marked at the last close
    equity_change: float
    gross_pnl: float  # realised + unrealised price PnL at reference prices
    slippage_cost: float
    fees: float
    funding: float  # > 0 = paid
    net_pnl: float  # gross_pnl - slippage_cost - fees - funding

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class BacktestResult:
    """Everything one run produced. Per-bar arrays are aligned with the input bars (``ts_ms`` = bar open).

    ``equity[i]`` is the account marked at bar ``i``'s close, ``position_qty[i]`` the signed position then
    (after that bar's fills). ``decisions`` are the non-hold decisions (entries and exits; the last bar's
    is not executed); ``decision_counts`` counts every bar's decision reason. ``bars_evaluated`` is how
    many bars went through the strategy and broker (all of them in the reference loop).
    """

    symbol: str
    bar_ms: int
    ts_ms: np.ndarray
    equity: np.ndarray
    position_qty: np.ndarray
    trades: list[Trade]
    fills: list[Fill]
    decisions: list[Decision]
    decision_counts: dict[str, int]
    totals: PnLTotals
    bars_evaluated: int
    strategy_state: StrategyState
    broker: PaperBroker

    def trade_rows(self) -> list[dict[str, Any]]:
        """The trades as plain dicts (one per round trip), e.g. for a CSV."""
        return [t.to_dict() for t in self.trades]


def run_backtest(
    bars: Any,
    predicted_bps: Any,
    *,
    strategy: StrategyParams,
    broker: PaperBrokerParams,
    symbol: str,
    funding: Any = None,
    bar_ms: int = 60_000,
) -> BacktestResult:
    """Backtest ``strategy`` on ``bars`` with precomputed signals, processing only the bars that can act.

    ``bars``: anything indexable by column name (a DataFrame in the store's ohlcv schema, a dict of
    arrays) with ``ts_ms`` (int64 bar opens, strictly increasing, at least ``bar_ms`` apart) and
    ``open`` / ``high`` / ``low`` / ``close`` (float64). ``predicted_bps[i]``: the model's forward return in
    basis points known at bar ``i``'s close (NaN = no prediction). ``funding``: optional table with
    ``ts_ms`` (settlement times) and ``funding_rate`` (fraction per interval). Returns the same result as
    :func:`run_backtest_reference`, much faster; the timing rules are in the module docstring.
    """
    sim = _Simulation(_Inputs.build(bars, predicted_bps, funding, bar_ms), strategy, broker, symbol)
    plan = _SkipPlan(sim.data, strategy)
    last = sim.data.n - 1
    position, open_bar, close_bar = sim.broker.position, sim.open_bar, sim.close_bar
    with _cyclic_gc_paused():
        sim.step(0)
        i = 0
        while i < last:
            k = i + 1
            if sim.pending is not None:
                open_bar(k)  # funding and the fill at bar k's open; its close may still be skippable
            i = (plan.skip_flat if position(symbol).qty == 0.0 else plan.skip_position)(sim, k)
            if sim.pending is not None or sim.next_funding_bar <= i:
                open_bar(i)  # idempotent: a bar opened above is only closed here
            close_bar(i)
        return sim.result()


def run_backtest_reference(
    bars: Any,
    predicted_bps: Any,
    *,
    strategy: StrategyParams,
    broker: PaperBrokerParams,
    symbol: str,
    funding: Any = None,
    bar_ms: int = 60_000,
) -> BacktestResult:
    """The plain loop: every bar goes through the broker and ``decide`` (the specification of :func:`run_backtest`)."""
    sim = _Simulation(_Inputs.build(bars, predicted_bps, funding, bar_ms), strategy, broker, symbol)
    with _cyclic_gc_paused():
        for i in range(sim.data.n):
            sim.step(i)
        return sim.result()


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector for one run (reference counting still frees everything).

    A run allocates a dozen small objects per trade and keeps the broker's orders and fills: the collector
    would traverse that growing heap again and again (a fifth of the run time at 50 trades a day) while the
    loop makes no reference cycles to find. Only re-enabled if it was enabled on entry, so nested or
    concurrent runs never leave it off (other threads' cycles wait for the end of the run).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- inputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    n: int
    bar_ms: int
    ts: np.ndarray  # int64 bar opens
    close_ms: np.ndarray  # int64 bar closes
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    pred: np.ndarray  # float64, NaN where there is no usable prediction
    funding_bar: np.ndarray  # int64 bar index of each settlement, ascending
    funding_ts: np.ndarray
    funding_rate: np.ndarray

    @classmethod
    def build(cls, bars: Any, predicted_bps: Any, funding: Any, bar_ms: int) -> _Inputs:
        if isinstance(bar_ms, bool) or not isinstance(bar_ms, int | np.integer) or bar_ms <= 0:
            raise DataValidationError(f"bar_ms must be a positive integer of milliseconds, got {bar_ms!r}")
        bar_ms = int(bar_ms)
        ts = _int_column(bars, "ts_ms", "bars")
        n = len(ts)
        if n == 0:
            raise DataValidationError("bars: no bars to backtest")
        prices = {name: _float_column(bars, name, "bars", n) for name in BAR_COLUMNS[1:]}
        o, h, lo, c = prices["open"], prices["high"], prices["low"], prices["close"]
        for name, values in prices.items():
            bad = ~(np.isfinite(values) & (values > 0))
            if bad.any():
                k = int(bad.argmax())
                raise DataValidationError(
                    f"bars.{name}[{k}] (ts_ms {ts[k]}) must be a finite price > 0, got {values[k]}"
                )
        bad = (lo > np.minimum(o, c)) | (h < np.maximum(o, c))
        if bad.any():
            k = int(bad.argmax())
            raise DataValidationError(
                f"bars[{k}] (ts_ms {ts[k]}): need low <= open, close <= high, got open {o[k]}, high {h[k]}, "
                f"low {lo[k]}, close {c[k]}"
            )
        steps = np.diff(ts)
        if (steps < bar_ms).any():
            k = int((steps < bar_ms).argmax())
            raise DataValidationError(
                f"bars.ts_ms must increase by at least bar_ms ({bar_ms}) per bar: ts_ms[{k}] = {ts[k]}, "
                f"ts_ms[{k + 1}] = {ts[k + 1]}"
            )
        try:
            pred = np.asarray(predicted_bps, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataValidationError(f"predicted_bps must be numbers (NaN = no prediction): {e}") from e
        if pred.shape != (n,):
            raise DataValidationError(f"predicted_bps must hold one value per bar ({n}), got shape {pred.shape}")
        pred = np.where(np.isfinite(pred), pred, np.nan)  # decide() reads inf like NaN: no prediction
        close_ms = ts + bar_ms
        if funding is None:
            f_bar = f_ts = np.zeros(0, dtype=np.int64)
            f_rate = np.zeros(0, dtype=np.float64)
        else:
            f_ts = _int_column(funding, "ts_ms", "funding")
            f_rate = _float_column(funding, "funding_rate", "funding", len(f_ts))
            if not np.isfinite(f_rate).all():
                k = int((~np.isfinite(f_rate)).argmax())
                raise DataValidationError(f"funding.funding_rate[{k}] must be finite, got {f_rate[k]}")
            order = np.argsort(f_ts, kind="stable")
            f_ts, f_rate = f_ts[order], f_rate[order]
            # The bar whose [open, close) holds the settlement, or the first bar after a gap holding it.
            f_bar = np.searchsorted(close_ms, f_ts, side="right").astype(np.int64)
            keep = (f_ts >= ts[0]) & (f_bar < n)
            f_bar, f_ts, f_rate = f_bar[keep], f_ts[keep], f_rate[keep]
        return cls(n, bar_ms, ts, close_ms, o, h, lo, c, pred, f_bar, f_ts, f_rate)


def _column(table: Any, name: str, what: str) -> Any:
    try:
        return table[name]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DataValidationError(f"{what}: missing column {name!r}") from e


def _int_column(table: Any, name: str, what: str) -> np.ndarray:
    values = np.asarray(_column(table, name, what))
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise DataValidationError(f"{what}.{name} must be a 1-D integer array of epoch ms, got {values.dtype}")
    return values.astype(np.int64, copy=False)


def _float_column(table: Any, name: str, what: str, n: int) -> np.ndarray:
    try:
        # contiguous: the skip scans slice these arrays many times
        values = np.ascontiguousarray(_column(table, name, what), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"{what}.{name} must be numbers: {e}") from e
    if values.shape != (n,):
        raise DataValidationError(f"{what}.{name} must hold {n} values like ts_ms, got shape {values.shape}")
    return values


# --- the per-bar steps, shared by both engines -------------------------------------------------------


@dataclass
class _OpenTrade:
    side: str
    qty: float
    entry_ts_ms: int
    entry_price: float
    entry_reason: str
    gross_pnl: float = 0.0
    fees: float = 0.0
    slippage_cost: float = 0.0
    funding: float = 0.0


class _Simulation:
    """State of one run and the four steps of a bar (module docstring); both engines drive it."""

    def __init__(self, data: _Inputs, strategy: StrategyParams, broker_params: PaperBrokerParams, symbol: str):
        if not isinstance(symbol, str) or not symbol:
            raise DataValidationError(f"symbol must be a non-empty string, got {symbol!r}")
        strategy.validate()
        self.data = data
        self.params = strategy
        self.symbol = symbol
        self.broker = PaperBroker(strategy.base_capital, broker_params)
        self.state = StrategyState()
        self.pending: Decision | None = None  # decided at the last processed close, fills at the next open
        self.equity = np.empty(data.n, dtype=np.float64)
        self.position = np.empty(data.n, dtype=np.float64)
        self.counts: Counter[str] = Counter()
        self.decisions: list[Decision] = []
        self.trades: list[Trade] = []
        self.open_trade: _OpenTrade | None = None
        self.bars_evaluated = 0
        # Runs of bars skipped by run_backtest, filled into equity / position by result(): bars
        # [start, stop) held `qty` with constant `cash` (equity = cash + qty * close, the broker's formula).
        # array.array: cheap appends, and numpy reads it without a per-element conversion.
        self._held_start = array("q")
        self._held_stop = array("q")
        self._held_cash = array("d")
        self._held_qty = array("d")
        self._next_funding = 0  # settlements before this one are applied
        self._n_funding = len(data.funding_bar)
        self._funding_bar: list[int] = data.funding_bar.tolist()
        self._funding_ts: list[int] = data.funding_ts.tolist()
        self._funding_rate: list[float] = data.funding_rate.tolist()
        self.next_funding_bar = self._funding_bar[0] if self._n_funding else data.n  # bar of the next one

    def step(self, i: int) -> None:
        """Steps 1-4 of bar ``i`` (module docstring)."""
        self.open_bar(i)
        self.close_bar(i)

    def open_bar(self, i: int) -> None:
        """Steps 1-2 of bar ``i``: funding settlements, then the order decided at the previous close.

        Idempotent: the settlements are consumed in order and the pending order is cleared once filled.
        """
        if self.next_funding_bar <= i:
            self._settle_funding(i)
        if self.pending is not None:
            d = self.data
            self._execute(self.pending, d.ts.item(i), d.open.item(i))
            self.pending = None

    def _settle_funding(self, i: int) -> None:
        """Step 1 of bar ``i``: the settlements due by its close, at its open price."""
        k, o = self._next_funding, self.data.open.item(i)
        while k < self._n_funding and self._funding_bar[k] <= i:
            paid = self.broker.apply_funding(self.symbol, self._funding_ts[k], self._funding_rate[k], o)
            if self.open_trade is not None:
                self.open_trade.funding += paid
            k += 1
        self._next_funding = k
        self.next_funding_bar = self._funding_bar[k] if k < self._n_funding else self.data.n

    def close_bar(self, i: int) -> None:
        """Steps 3-4 of bar ``i``: resting orders against the bar, then the decision at its close."""
        d, broker, symbol = self.data, self.broker, self.symbol
        # ndarray.item(): the same Python int / float as int(a[i]) / float(a[i]), without a numpy scalar.
        ts = d.ts.item(i)
        h, lo, c = d.high.item(i), d.low.item(i), d.close.item(i)
        for fill in broker._on_bar(symbol, ts, d.open.item(i), h, lo, c):
            order = broker.get_order(fill.client_order_id)
            self._on_fill(fill, "stop_loss" if order is not None and order.kind == "stop" else "take_profit")
        position = broker.position(symbol)
        equity = broker.equity({symbol: c})
        pred = d.pred.item(i)  # NaN (no prediction) or finite: _Inputs.build made inf NaN
        decision, self.state = _decide(
            self.state, self.params, ts, ts + d.bar_ms, c, h, lo, None if pred != pred else pred, position.qty,
            position.avg_entry_price, equity, d.bar_ms,
        )  # fmt: skip
        self.counts[decision.reason] += 1
        self.equity[i] = equity
        self.position[i] = position.qty
        self.bars_evaluated += 1
        if decision.action != "hold":
            self.decisions.append(decision)
            if decision.side is not None and decision.qty > 0 and i + 1 < d.n:
                self.pending = decision

    def hold(self, start: int, stop: int, cash: float, qty: float) -> None:
        """Record that bars ``[start, stop)`` held ``qty`` with constant ``cash`` (skipped; see result())."""
        if stop > start:
            self._held_start.append(start)
            self._held_stop.append(stop)
            self._held_cash.append(cash)
            self._held_qty.append(qty)

    def _fill_held(self) -> None:
        """Equity and position of every held run at once: ``cash + qty * close`` elementwise, the same float
        operations as broker.equity() (cash + 0.0 when flat), so a skipped bar matches a processed one."""
        if not self._held_start:
            return
        start = np.frombuffer(self._held_start, dtype=np.int64)
        stop = np.frombuffer(self._held_stop, dtype=np.int64)
        # [0, n) as alternating segments: processed bars before run 0, run 0, processed bars, run 1, ...,
        # processed bars after the last run. Per-bar values come from one np.repeat each (no index arrays).
        runs = len(start)
        lengths = np.empty(2 * runs + 1, dtype=np.int64)
        lengths[0] = start[0]
        lengths[1:-1:2] = stop - start
        lengths[2:-1:2] = start[1:] - stop[:-1]
        lengths[-1] = self.data.n - stop[-1]
        cash = np.zeros(2 * runs + 1, dtype=np.float64)
        qty = np.zeros(2 * runs + 1, dtype=np.float64)
        held = np.zeros(2 * runs + 1, dtype=bool)
        cash[1::2] = np.frombuffer(self._held_cash, dtype=np.float64)
        qty[1::2] = np.frombuffer(self._held_qty, dtype=np.float64)
        held[1::2] = True
        bar_qty = np.repeat(qty, lengths)
        bar_held = np.repeat(held, lengths)
        np.copyto(self.equity, np.repeat(cash, lengths) + bar_qty * self.data.close, where=bar_held)
        np.copyto(self.position, bar_qty, where=bar_held)

    def _execute(self, decision: Decision, ts: int, open_price: float) -> None:
        broker, symbol = self.broker, self.symbol
        assert decision.side is not None  # only orders with a side are left pending
        # The orders go through the broker's entry points past their argument checks (_market / _resting):
        # every argument here is valid by construction (ids from make_client_order_id, the side and a
        # quantity > 0 from decide(), prices from the validated bars and protective_prices()).
        if decision.action == "exit":
            for order in broker.open_orders(symbol):  # the strategy's exit replaces the protective orders
                broker.cancel(order.client_order_id, ts_ms=decision.decided_at_ms)
            oid = make_client_order_id(symbol, decision.bar_ts_ms, "exit")
            order = broker._market(oid, symbol, decision.side, decision.qty, ts, open_price)
            if order.fill is not None:
                self._on_fill(order.fill, decision.reason)
            return
        oid = make_client_order_id(symbol, decision.bar_ts_ms, "entry")
        order = broker._market(oid, symbol, decision.side, decision.qty, ts, open_price)
        fill = order.fill
        if fill is None:
            return
        self._on_fill(fill, decision.reason)
        sign = 1 if decision.side == "buy" else -1
        stop, take = protective_prices(self.params, sign, fill.price)
        side, qty = ("sell" if sign > 0 else "buy"), fill.qty
        broker._resting(make_client_order_id(symbol, decision.bar_ts_ms, "stop"), symbol, side, qty, stop, ts, "stop")
        broker._resting(
            make_client_order_id(symbol, decision.bar_ts_ms, "take_profit"), symbol, side, qty, take, ts, "take_profit"
        )

    def _on_fill(self, fill: Fill, reason: str) -> None:
        """Book ``fill`` on the round trip: a fill from flat opens one (``reason`` = the entry's), a fill back
        to flat closes it (``reason`` = the exit's)."""
        trade = self.open_trade
        if trade is None:
            trade = self.open_trade = _OpenTrade(
                "long" if fill.side == "buy" else "short", fill.qty, fill.ts_ms, fill.price, reason
            )
        trade.gross_pnl += fill.realised_pnl + fill.slippage_cost
        trade.fees += fill.fee
        trade.slippage_cost += fill.slippage_cost
        if self.broker.position(self.symbol).qty == 0.0:
            self._close_trade(trade, fill.ts_ms, fill.price, reason, 0.0)

    def _close_trade(self, trade: _OpenTrade, ts_ms: int, price: float, reason: str, unrealised: float) -> None:
        gross = trade.gross_pnl + unrealised
        net = gross - trade.slippage_cost - trade.fees - trade.funding
        self.trades.append(
            _trade(
                trade.side, trade.qty, trade.entry_ts_ms, trade.entry_price, ts_ms, price, trade.entry_reason,
                reason, gross, trade.fees, trade.slippage_cost, trade.funding, net,
            )
        )  # fmt: skip
        self.open_trade = None

    def result(self) -> BacktestResult:
        d, broker, symbol = self.data, self.broker, self.symbol
        self._fill_held()
        last_close = float(d.close[-1])
        if self.open_trade is not None:
            position = broker.position(symbol)
            self._close_trade(
                self.open_trade, int(d.close_ms[-1]), last_close, "end_of_data", position.unrealised_pnl(last_close)
            )
        s = broker.summary({symbol: last_close})
        gross = s.realised_pnl + s.unrealised_pnl + s.slippage_cost
        totals = PnLTotals(
            initial_equity=broker.initial_cash,
            final_equity=s.equity,
            equity_change=s.equity - broker.initial_cash,
            gross_pnl=gross,
            slippage_cost=s.slippage_cost,
            fees=s.fees_paid,
            funding=s.funding_paid,
            net_pnl=gross - s.slippage_cost - s.fees_paid - s.funding_paid,
        )
        return BacktestResult(
            symbol=symbol,
            bar_ms=d.bar_ms,
            ts_ms=d.ts,
            equity=self.equity,
            position_qty=self.position,
            trades=self.trades,
            fills=broker.fills(),
            decisions=self.decisions,
            decision_counts=dict(sorted(self.counts.items())),
            totals=totals,
            bars_evaluated=self.bars_evaluated,
            strategy_state=self.state,
            broker=broker,
        )


# --- what run_backtest may skip ----------------------------------------------------------------------


class _Marks:
    """The sorted bar indices where a per-bar condition holds: next one at or after a bar, count in a range.

    Python lists and bisect: cheaper to build than per-bar lookup arrays, and as fast to query.
    """

    def __init__(self, mask: np.ndarray) -> None:
        self.index: list[int] = np.flatnonzero(mask).tolist()
        self.n = len(mask)

    def next(self, k: int) -> int:
        """The first marked bar ``>= k`` (``n`` when none)."""
        at = bisect_left(self.index, k)
        return self.index[at] if at < len(self.index) else self.n

    def count(self, start: int, stop: int) -> int:
        """Marked bars in ``[start, stop)``."""
        return bisect_left(self.index, stop) - bisect_left(self.index, start)


class _SkipPlan:
    """Per-bar conditions indexed once, so that finding the next bar that can act is a lookup or one short scan."""

    def __init__(self, data: _Inputs, params: StrategyParams) -> None:
        n, pred = data.n, data.pred
        self.data, self.params = data, params
        always = np.zeros(n, dtype=bool)
        always[0] = always[-1] = True
        day = data.close_ms // DAY_MS  # the strategy's day is that of the bar close
        always[1:] |= day[1:] != day[:-1]
        always[data.funding_bar] = True
        self.always = _Marks(always)
        long_sig = pred > params.entry_bps  # NaN compares False: no prediction is never a signal
        short_sig = pred < -params.entry_bps
        self.long, self.short = _Marks(long_sig), _Marks(short_sig)
        self.signal = _Marks(long_sig | short_sig)
        self.entry = self.signal if params.allow_short else self.long
        self.exit_long = _Marks(pred < -params.exit_reversal_bps)
        self.exit_short = _Marks(pred > params.exit_reversal_bps)
        self.missing = _Marks(np.isnan(pred))

    def skip_flat(self, sim: _Simulation, k: int) -> int:
        """Flat at bar ``k``'s open (after any fill there): fill the holding bars ``k..j-1``; return bar ``j``.

        Flat, equity is the cash and stays constant, so the kill switch can only trip at bar ``k`` (an exit
        at its open changed the cash) or on a new day / funding bar (always processed); otherwise only an
        entry can happen, on a signal bar outside the cooldown with equity > 0. The skipped bars' reasons
        follow decide()'s flat rule order.
        """
        state = sim.state
        bound = self.always.next(k)
        base = state.day_start_equity
        if bound == k or base is None:
            return k
        params, counts, cash = self.params, sim.counts, sim.broker.cash()
        if state.kill_switch_tripped:
            j = bound
            _add(counts, "kill_switch", j - k)
        else:
            if base > 0 and (base - cash) / base * 100.0 >= params.kill_switch_drawdown_pct * (1.0 - _SLACK):
                return k  # decide() trips the switch at this close
            # First bar out of the cooldown (decide: in it while close_ms < cooldown_until_ms); usually a
            # few bars on, where stepping is cheaper than a search.
            free, until, close_ms = k, state.cooldown_until_ms, self.data.close_ms
            while free < bound and free < k + 8 and close_ms.item(free) < until:
                free += 1
            if free == k + 8 and close_ms.item(free) < until:
                free = int(np.searchsorted(close_ms, until, side="left"))
            j = min(bound, self.entry.next(free)) if cash > 0 else bound
            free = min(free, j)
            # With equity, bar j is the first entry signal out of the cooldown: no long (nor, with shorts
            # allowed, short) signal lies in [free, j). Long and short signals are disjoint (entry_bps >= 0).
            n_long = 0 if cash > 0 else self.long.count(free, j)
            n_short = 0 if cash > 0 and params.allow_short else self.short.count(free, j)
            n_cooldown = self.signal.count(k, free) if free > k else 0
            n_missing = self.missing.count(k, j)
            n_no_signal = j - k - n_missing - n_cooldown - n_long - n_short
            if n_missing:  # (only reasons that occurred get a key, as in the reference loop)
                counts["no_prediction"] += n_missing
            if n_no_signal:
                counts["no_signal"] += n_no_signal
            if n_cooldown:
                counts["cooldown"] += n_cooldown
            if not params.allow_short:
                _add(counts, "short_disabled", n_short)
            if cash <= 0:  # only reachable signals here: equity <= 0 blocks every entry
                _add(counts, "no_equity", n_long + (n_short if params.allow_short else 0))
        sim.hold(k, j, cash, 0.0)  # broker.equity() of a flat account: cash + an empty sum
        return j

    def skip_position(self, sim: _Simulation, k: int) -> int:
        """In a position at bar ``k``'s open (after any fill there): fill the holding bars; return the next event.

        Until the next always-processed bar the position, cash and day baseline are constant, so a bar can
        only act through its prediction (reversal), its low / high (protective levels) or its close (the
        kill switch): the first is a precomputed mask, the others one short vectorised scan.
        """
        state = sim.state
        position = sim.broker.position(sim.symbol)
        qty = position.qty
        long = qty > 0
        bound = min(self.always.next(k), (self.exit_long if long else self.exit_short).next(k))
        base = state.day_start_equity
        if bound == k or base is None:
            return k
        d, params, cash = self.data, self.params, sim.broker.cash()
        # Price levels that end the holding when touched: the strategy's own levels from the average entry
        # and the resting orders' triggers (from the fill price; they can differ in the last bits).
        stop, take = protective_prices(params, 1 if long else -1, position.avg_entry_price)
        low_levels, high_levels = ([stop], [take]) if long else ([take], [stop])
        for order in sim.broker.open_orders(sim.symbol):
            if order.price is not None:
                above = (order.side == "buy") == (order.kind == "stop")  # the broker's trigger side
                (high_levels if above else low_levels).append(order.price)
        low_trigger = max(low_levels) * (1.0 + _SLACK)
        high_trigger = min(high_levels) * (1.0 - _SLACK)
        # The kill switch trips when equity = cash + qty * close falls to base * (1 - pct / 100), i.e. when
        # the close crosses kill_price. When that lies beyond a protective level, the low / high test
        # already stops at any bar whose close could trip it (low <= close <= high).
        watch_kill = not state.kill_switch_tripped and base > 0
        if watch_kill:
            kill_price = (base * (1.0 - params.kill_switch_drawdown_pct / 100.0) - cash) / qty
            margin = 1e-6 * (abs(kill_price) + abs(cash / qty) + 1.0)
            watch_kill = kill_price + margin > low_trigger if long else kill_price - margin < high_trigger
        kill_pct = params.kill_switch_drawdown_pct * (1.0 - _SLACK)
        j, hi, width = bound, k, _FIRST_SCAN
        if not watch_kill:  # the first bars one by one: the same test as the scan below
            low, high, end = d.low, d.high, min(bound, k + _STEP_BARS)
            while hi < end and low.item(hi) > low_trigger and high.item(hi) < high_trigger:
                hi += 1
            if hi < end:  # bar hi touches a level
                j, hi = hi, bound
        while hi < bound:
            lo, hi = hi, min(bound, hi + width)
            hit = (d.low[lo:hi] <= low_trigger) | (d.high[lo:hi] >= high_trigger)
            if watch_kill:
                # decide()'s own drawdown test on the broker's equity formula, with a hair of slack.
                hit |= (base - (cash + qty * d.close[lo:hi])) / base * 100.0 >= kill_pct
            first = int(hit.argmax())
            if hit[first]:
                j = lo + first
                break
            width *= 4
        missing = self.missing.count(k, j)
        if missing:  # (only reasons that occurred get a key, as in the reference loop)
            sim.counts["no_prediction"] += missing
        if j - k - missing:
            sim.counts["in_position"] += j - k - missing
        sim.hold(k, j, cash, qty)  # the broker's equity(): cash + qty * mark
        return j


def _add(counts: Counter[str], reason: str, count: int) -> None:
    if count:  # the reference loop only has keys for reasons that occurred
        counts[reason] += count
