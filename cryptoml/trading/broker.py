"""The broker interface the runner and the backtest trade through, and a paper broker that simulates fills.

Accounting (quote currency, e.g. USDT; quantities in base units, positions signed, + = long): a fill of
signed quantity ``dq`` at ``price`` moves ``cash -= dq * price + fee``; ``equity = cash + Σ qty * mark``.
Positions carry an average entry price; reducing a position realises ``closed_qty * (price - avg_entry)``
(sign-adjusted for shorts), so at every moment::

    equity - initial_cash == realised_pnl + unrealised_pnl - fees_paid - funding_paid

``realised_pnl`` / ``unrealised_pnl`` are price PnL at the actual fill prices (slippage included);
``slippage_cost`` says how much of it slippage took (fill price vs reference price, > 0 = cost), so the
price PnL at reference prices is ``realised + unrealised + slippage_cost``. There is no margin model:
cash may go negative (a financed long); size positions with ``StrategyParams.position_fraction``.

Fill rules of :class:`PaperBroker` (all quantities fill in full; there are no partial fills):

- **market**: with an L2 ``book``, walk the opposite side level by level (average price of the walked
  quantity); quantity beyond the book's depth fills at the last level's price worsened by
  ``book_exhausted_penalty_bps``; the reference price is the book's mid. Without a book, the reference is
  ``price`` (or the symbol's last mark) and the fill is worsened by :mod:`cryptoml.simulate.slippage`
  (half the assumed spread ``spread_pct`` times the size/depth tier multiplier for ``depth_usd``). Taker fee.
- **stop** / **take_profit**: reduce-only protective orders, evaluated by :meth:`PaperBroker.on_bar` on bars
  that opened at or after their submission. A sell stop triggers when ``low <= trigger`` (a buy stop when
  ``high >= trigger``), a sell take-profit when ``high >= trigger`` (buy: ``low <= trigger``). They fill as
  taker market orders at the trigger price, or at the bar's ``open`` when the bar opened beyond the trigger
  (gap through), plus model slippage. In one bar stops are processed before take-profits (the conservative
  reading when both are touched). The quantity is clipped to the open position; an order with no position to
  reduce is cancelled, and all protective orders of a symbol are cancelled when its position goes flat.
- **limit**: evaluated on later bars too. When the bar opens through the limit (buy: ``open < limit``) the
  order was marketable and fills as taker at the open plus model slippage, capped at the limit. Otherwise,
  when the bar trades through the limit (buy: ``low < limit``, sell: ``high > limit``; a touch is not
  enough) it fills at the limit price as maker with probability ``limit_fill_probability``, drawn from a
  generator seeded by ``(seed, client_order_id, bar ts_ms)``: a replay draws the same outcome.
- A client order id names one order forever: submitting it again returns the stored order (with its
  fill, if any) and changes nothing; reusing it for another symbol, side or kind is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cryptoml.config import PaperBrokerParams, SimulateParams
from cryptoml.errors import DataValidationError
from cryptoml.simulate.slippage import slippage_frac_one

SIDES = ("buy", "sell")
ORDER_KINDS = ("market", "limit", "stop", "take_profit")
PROTECTIVE_KINDS = ("stop", "take_profit")
STATE_FORMAT = 1
_ORDER_ID_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,64}$")
_PURPOSE_CODES = {"entry": "en", "exit": "ex", "stop": "sl", "take_profit": "tp", "limit": "lm"}
_INF = math.inf
_KIND_RANK = {"stop": 0, "take_profit": 1, "limit": 2}  # on_bar's processing order of resting orders
# make_client_order_id's cache of the valid texts around an id's bar time. A process trades a handful of
# symbols with one or two prefixes; the cap only guards against misuse.
_ID_PARTS: dict[tuple[str, str, str], tuple[str, str]] = {}
_ID_PARTS_MAX = 4096


@dataclass(frozen=True)
class OrderBook:
    """An L2 snapshot: ``bids`` best (highest) first, ``asks`` best (lowest) first, as (price, size) pairs."""

    bids: tuple[tuple[float, float], ...]
    asks: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        for name, levels, step in (("bids", self.bids, -1), ("asks", self.asks, 1)):
            prev = None
            for i, (price, size) in enumerate(levels):
                if not _finite(price) or price <= 0 or not _finite(size) or size < 0:
                    raise DataValidationError(f"book {name}[{i}]: need price > 0 and size >= 0, got {price}, {size}")
                if prev is not None and (price - prev) * step <= 0:
                    raise DataValidationError(f"book {name}[{i}]: prices must run away from the best level")
                prev = price

    @classmethod
    def from_arrays(
        cls,
        bid_prices: Sequence[float] | np.ndarray,
        bid_sizes: Sequence[float] | np.ndarray,
        ask_prices: Sequence[float] | np.ndarray,
        ask_sizes: Sequence[float] | np.ndarray,
    ) -> OrderBook:
        """From per-side arrays ordered by level (0 = best), e.g. one ``ts_ms`` of the stored book layout."""
        if len(bid_prices) != len(bid_sizes) or len(ask_prices) != len(ask_sizes):
            raise DataValidationError("book: prices and sizes of a side must have the same length")
        bids = tuple((float(p), float(s)) for p, s in zip(bid_prices, bid_sizes, strict=True))
        asks = tuple((float(p), float(s)) for p, s in zip(ask_prices, ask_sizes, strict=True))
        return cls(bids, asks)

    def mid(self) -> float:
        """Mid price; with one side empty, the other side's best price."""
        if self.bids and self.asks:
            return (self.bids[0][0] + self.asks[0][0]) / 2.0
        if self.bids or self.asks:
            return (self.bids or self.asks)[0][0]
        raise DataValidationError("book: both sides are empty")


def walk_book(book: OrderBook, side: str, qty: float, exhausted_penalty_bps: float) -> tuple[float, float]:
    """Average fill price of a taker ``side`` order of ``qty`` walking ``book``, and the quantity beyond its depth.

    A buy takes the asks from the best level outwards, a sell the bids. Quantity the book cannot absorb
    fills at the last level's price worsened by ``exhausted_penalty_bps`` (buy: higher, sell: lower).
    """
    _check_side(side)
    levels = book.asks if side == "buy" else book.bids
    if not levels:
        raise DataValidationError(f"book has no {'asks' if side == 'buy' else 'bids'} to fill a {side}")
    remaining, cost = qty, 0.0
    for price, size in levels:
        take = min(size, remaining)
        cost += take * price
        remaining -= take
        if remaining <= 0:
            break
    unfilled = max(remaining, 0.0)
    if unfilled > 0:
        direction = 1.0 if side == "buy" else -1.0
        cost += unfilled * levels[-1][0] * (1.0 + direction * exhausted_penalty_bps / 10_000.0)
    return cost / qty, unfilled


@dataclass(frozen=True)
class Fill:
    """One execution. ``fee`` and ``slippage_cost`` are in quote currency; ``realised_pnl`` is the price PnL
    this fill realised on the position it reduced (before fees)."""

    client_order_id: str
    symbol: str
    side: str
    qty: float
    price: float
    reference_price: float
    ts_ms: int
    liquidity: str  # "taker" | "maker"
    fee: float
    slippage_cost: float
    realised_pnl: float


@dataclass(frozen=True)
class Order:
    """An order and what became of it (``status``: open | filled | cancelled)."""

    client_order_id: str
    symbol: str
    kind: str
    side: str
    qty: float
    price: float | None  # limit price (limit) or trigger price (stop, take_profit); None for market
    submitted_ms: int
    status: str
    fill: Fill | None = None
    closed_ms: int | None = None
    cancel_reason: str | None = None


@dataclass(frozen=True)
class Position:
    """Signed quantity and average entry price (0.0 when flat), with the symbol's cumulative PnL and fees."""

    symbol: str
    qty: float = 0.0
    avg_entry_price: float = 0.0
    realised_pnl: float = 0.0
    fees_paid: float = 0.0

    def unrealised_pnl(self, mark_price: float) -> float:
        return self.qty * (mark_price - self.avg_entry_price) if self.qty else 0.0


# Builders of the same instances as Order(...), Fill(...) and Position(...), for the fill path: a frozen
# dataclass's __init__ pays one object.__setattr__ per field (~1.3 µs for an Order, several per fill), while
# filling the instance __dict__ directly (the way pickle and copy restore frozen dataclasses) costs a third
# of that. They take every field, in field order (a test compares them with the constructors).
_new = object.__new__


def _order(
    client_order_id: str,
    symbol: str,
    kind: str,
    side: str,
    qty: float,
    price: float | None,
    submitted_ms: int,
    status: str,
    fill: Fill | None,
    closed_ms: int | None,
    cancel_reason: str | None,
) -> Order:
    order: Order = _new(Order)
    fields = order.__dict__
    fields["client_order_id"] = client_order_id
    fields["symbol"] = symbol
    fields["kind"] = kind
    fields["side"] = side
    fields["qty"] = qty
    fields["price"] = price
    fields["submitted_ms"] = submitted_ms
    fields["status"] = status
    fields["fill"] = fill
    fields["closed_ms"] = closed_ms
    fields["cancel_reason"] = cancel_reason
    return order


def _fill(
    client_order_id: str,
    symbol: str,
    side: str,
    qty: float,
    price: float,
    reference_price: float,
    ts_ms: int,
    liquidity: str,
    fee: float,
    slippage_cost: float,
    realised_pnl: float,
) -> Fill:
    fill: Fill = _new(Fill)
    fields = fill.__dict__
    fields["client_order_id"] = client_order_id
    fields["symbol"] = symbol
    fields["side"] = side
    fields["qty"] = qty
    fields["price"] = price
    fields["reference_price"] = reference_price
    fields["ts_ms"] = ts_ms
    fields["liquidity"] = liquidity
    fields["fee"] = fee
    fields["slippage_cost"] = slippage_cost
    fields["realised_pnl"] = realised_pnl
    return fill


def _position(symbol: str, qty: float, avg_entry_price: float, realised_pnl: float, fees_paid: float) -> Position:
    position: Position = _new(Position)
    fields = position.__dict__
    fields["symbol"] = symbol
    fields["qty"] = qty
    fields["avg_entry_price"] = avg_entry_price
    fields["realised_pnl"] = realised_pnl
    fields["fees_paid"] = fees_paid
    return position


@dataclass(frozen=True)
class AccountSummary:
    """Account figures at one set of marks (quote currency)."""

    cash: float
    equity: float
    realised_pnl: float
    unrealised_pnl: float
    fees_paid: float
    slippage_cost: float
    funding_paid: float


@runtime_checkable
class Broker(Protocol):
    """What the runner and the backtest need from a broker (paper here; a live ccxt broker elsewhere)."""

    def submit_market(
        self,
        client_order_id: str,
        symbol: str,
        side: str,
        qty: float,
        *,
        ts_ms: int,
        price: float | None = None,
        book: OrderBook | None = None,
    ) -> Order: ...

    def submit_limit(
        self, client_order_id: str, symbol: str, side: str, qty: float, limit_price: float, *, ts_ms: int
    ) -> Order: ...

    def submit_stop(
        self, client_order_id: str, symbol: str, side: str, qty: float, trigger_price: float, *, ts_ms: int
    ) -> Order: ...

    def submit_take_profit(
        self, client_order_id: str, symbol: str, side: str, qty: float, trigger_price: float, *, ts_ms: int
    ) -> Order: ...

    def cancel(self, client_order_id: str, *, ts_ms: int) -> Order: ...

    def get_order(self, client_order_id: str) -> Order | None: ...

    def open_orders(self, symbol: str | None = None) -> list[Order]: ...

    def position(self, symbol: str) -> Position: ...

    def positions(self) -> dict[str, Position]: ...

    def cash(self) -> float: ...

    def equity(self, marks: Mapping[str, float] | None = None) -> float: ...

    def fills(self) -> list[Fill]: ...


def make_client_order_id(symbol: str, bar_ts_ms: int, purpose: str, prefix: str = "cml") -> str:
    """Deterministic client order id of the order placed for ``purpose`` at bar ``bar_ts_ms`` (≤ 36 chars).

    ``purpose`` is one of entry, exit, stop, take_profit, limit. The same decision replayed after a crash
    gets the same id, which is what makes resubmission harmless.
    """
    # "{prefix}-{sha256(symbol)[:6]}-{bar_ts_ms}-{code}": the text around bar_ts_ms is cached per (symbol,
    # purpose, prefix) once they proved valid plain strings (ids are made on every trade).
    try:
        head, tail = _ID_PARTS[symbol, purpose, prefix]
    except (KeyError, TypeError):
        head, tail = _id_parts(symbol, bar_ts_ms, purpose, prefix)
    order_id = f"{head}{bar_ts_ms if type(bar_ts_ms) is int else int(bar_ts_ms)}{tail}"
    if len(order_id) > 36:
        raise DataValidationError(f"client order id {order_id!r}: prefix {prefix!r} makes it invalid or too long")
    return order_id


def _id_parts(symbol: str, bar_ts_ms: int, purpose: str, prefix: str) -> tuple[str, str]:
    """The text before and after ``bar_ts_ms`` in an id; raises when ``purpose`` or ``prefix`` is invalid.

    The middle (digits, '-') and the purpose code are always allowed characters: the head decides.
    """
    code = _PURPOSE_CODES.get(purpose) if isinstance(purpose, str) else None
    if code is None:
        raise DataValidationError(f"purpose must be one of {sorted(_PURPOSE_CODES)}, got {purpose!r}")
    head = f"{prefix}-{hashlib.sha256(symbol.encode()).hexdigest()[:6]}-"
    if not _ORDER_ID_RE.match(head):
        order_id = f"{head}{int(bar_ts_ms)}-{code}"
        raise DataValidationError(f"client order id {order_id!r}: prefix {prefix!r} makes it invalid or too long")
    parts = (head, f"-{code}")
    if type(symbol) is str and type(purpose) is str and type(prefix) is str and len(_ID_PARTS) < _ID_PARTS_MAX:
        _ID_PARTS[(symbol, purpose, prefix)] = parts
    return parts


class PaperBroker:
    """A simulated account implementing :class:`Broker` (fill rules in the module docstring)."""

    def __init__(
        self,
        initial_cash: float,
        params: PaperBrokerParams | None = None,
        slippage: SimulateParams | None = None,
    ) -> None:
        self.params = params or PaperBrokerParams()
        self.params.validate()
        # Only the slippage tiers and multipliers of SimulateParams are used.
        self.slippage = slippage or SimulateParams()
        self.initial_cash = _number("initial_cash", initial_cash)
        self._cash = self.initial_cash
        self._fees_paid = 0.0
        self._slippage_cost = 0.0
        self._funding_paid = 0.0
        self._realised_pnl = 0.0
        self._positions: dict[str, Position] = {}
        self._marks: dict[str, float] = {}
        self._orders: dict[str, Order] = {}
        self._open: dict[str, None] = {}  # ids of open orders, in submission order (an ordered set)
        self._fill_ids: list[str] = []  # client order ids in fill order
        self._funding_applied: dict[str, None] = {}  # "symbol|ts_ms" of settled funding events

    # ----- orders -------------------------------------------------------------------------------------
    def submit_market(
        self,
        client_order_id: str,
        symbol: str,
        side: str,
        qty: float,
        *,
        ts_ms: int,
        price: float | None = None,
        book: OrderBook | None = None,
    ) -> Order:
        """Fill at once: from ``book`` when given, else at ``price`` (default: the last mark) plus slippage."""
        qty, ts_ms = self._check_order(client_order_id, symbol, side, qty, ts_ms)
        if price is not None and not (type(price) is float and 0.0 < price < _INF):
            price = _price("price", price)
        return self._market(client_order_id, symbol, side, qty, ts_ms, price, book)

    def _market(
        self,
        client_order_id: str,
        symbol: str,
        side: str,
        qty: float,
        ts_ms: int,
        price: float | None,
        book: OrderBook | None = None,
    ) -> Order:
        """:meth:`submit_market` past its argument checks, for a caller whose arguments are valid by
        construction (the backtest engine: ids from make_client_order_id, prices from validated bars)."""
        existing = self._orders.get(client_order_id)
        if existing is not None:
            return self._replayed(existing, symbol, side, "market")
        if book is not None:
            fill_price, _ = walk_book(book, side, qty, self.params.book_exhausted_penalty_bps)
            reference = book.mid()
        else:
            known = price if price is not None else self._marks.get(symbol)
            if known is None:
                raise DataValidationError(f"market order {client_order_id}: no price, no book and no mark for {symbol}")
            reference = known
            fill_price = self._slipped(side, qty, reference)
        self._marks[symbol] = reference
        return self._execute(
            client_order_id, symbol, "market", side, qty, None, ts_ms, None, ts_ms, fill_price, reference, "taker", qty
        )

    def submit_limit(
        self, client_order_id: str, symbol: str, side: str, qty: float, limit_price: float, *, ts_ms: int
    ) -> Order:
        """Rest a limit order; it is evaluated by :meth:`on_bar` on bars opening at or after ``ts_ms``."""
        return self._rest(client_order_id, symbol, side, qty, limit_price, ts_ms, "limit")

    def submit_stop(
        self, client_order_id: str, symbol: str, side: str, qty: float, trigger_price: float, *, ts_ms: int
    ) -> Order:
        """Rest a reduce-only stop-loss (sell below a long, buy above a short)."""
        return self._rest(client_order_id, symbol, side, qty, trigger_price, ts_ms, "stop")

    def submit_take_profit(
        self, client_order_id: str, symbol: str, side: str, qty: float, trigger_price: float, *, ts_ms: int
    ) -> Order:
        """Rest a reduce-only take-profit (sell above a long, buy below a short)."""
        return self._rest(client_order_id, symbol, side, qty, trigger_price, ts_ms, "take_profit")

    def cancel(self, client_order_id: str, *, ts_ms: int) -> Order:
        """Cancel an open order; an order already filled or cancelled is returned unchanged."""
        if type(ts_ms) is not int:
            ts_ms = _int("ts_ms", ts_ms)
        order = self._orders.get(client_order_id)
        if order is None:
            raise DataValidationError(f"cancel: unknown client order id {client_order_id!r}")
        if order.status != "open":
            return order
        return self._close(order, ts_ms, "cancelled_by_client")

    def get_order(self, client_order_id: str) -> Order | None:
        return self._orders.get(client_order_id)

    def open_orders(self, symbol: str | None = None) -> list[Order]:
        orders = map(self._orders.__getitem__, self._open)
        return list(orders) if symbol is None else [o for o in orders if o.symbol == symbol]

    # ----- market data ----------------------------------------------------------------------------------
    def on_bar(self, symbol: str, ts_ms: int, open: float, high: float, low: float, close: float) -> list[Fill]:
        """Run the resting orders of ``symbol`` against the bar opening at ``ts_ms``; then mark at ``close``.

        Only orders submitted at or before ``ts_ms`` take part. Order of processing: stops, take-profits,
        limits (each in submission order). Replaying the same bar changes nothing more.
        """
        if type(ts_ms) is not int:
            ts_ms = _int("ts_ms", ts_ms)
        o, h, lo, c = open, high, low, close
        # Plain floats with 0 < low <= open, close <= high < inf are valid prices as they are (NaN fails
        # every comparison); anything else is converted and checked value by value.
        if not (
            type(o) is float
            and type(h) is float
            and type(lo) is float
            and type(c) is float
            and 0.0 < lo <= o <= h < _INF
            and lo <= c <= h
        ):
            o, h, lo, c = (_price(n, v) for n, v in (("open", open), ("high", high), ("low", low), ("close", close)))
            if not (lo <= o and lo <= c and h >= o and h >= c):
                raise DataValidationError(
                    f"bar {symbol} {ts_ms}: need low <= open, close <= high, got {o}, {h}, {lo}, {c}"
                )
        return self._on_bar(symbol, ts_ms, o, h, lo, c)

    def _on_bar(self, symbol: str, ts_ms: int, o: float, h: float, lo: float, c: float) -> list[Fill]:
        """:meth:`on_bar` past its input checks (see :meth:`_market`): plain floats, ``0 < low <= open,
        close <= high``."""
        fills: list[Fill] = []
        if self._open:
            orders = self._orders
            live = [x for x in map(orders.__getitem__, self._open) if x.symbol == symbol and x.submitted_ms <= ts_ms]
            if len(live) > 1:
                live.sort(key=lambda x: _KIND_RANK[x.kind])  # a stable sort: submission order kept within a kind
            for order in live:
                current = orders[order.client_order_id]
                if current.status != "open":  # cancelled by an earlier fill in this bar (position closed)
                    continue
                fill = self._try_fill(current, ts_ms, o, h, lo)
                if fill is not None:
                    fills.append(fill)
        self._marks[symbol] = c
        return fills

    def mark(self, symbol: str, price: float) -> None:
        """Set the mark price of ``symbol`` (e.g. from a live ticker) used by equity() and market orders."""
        self._marks[symbol] = _price("price", price)

    def apply_funding(self, symbol: str, ts_ms: int, funding_rate: float, mark_price: float) -> float:
        """Settle one perpetual funding event; returns the amount paid (> 0 = paid, < 0 = received).

        A long pays ``qty * mark_price * funding_rate`` when the rate is positive. Applying the same
        ``(symbol, ts_ms)`` twice does nothing the second time (returns 0.0).
        """
        ts_ms = _int("ts_ms", ts_ms)
        rate = _number("funding_rate", funding_rate)
        mark_price = _price("mark_price", mark_price)
        key = f"{symbol}|{ts_ms}"
        if key in self._funding_applied:
            return 0.0
        self._funding_applied[key] = None
        paid = self.position(symbol).qty * mark_price * rate
        self._cash -= paid
        self._funding_paid += paid
        return paid

    # ----- account --------------------------------------------------------------------------------------
    def position(self, symbol: str) -> Position:
        position = self._positions.get(symbol)
        return Position(symbol) if position is None else position

    def positions(self) -> dict[str, Position]:
        return {s: p for s, p in self._positions.items() if p.qty != 0}

    def cash(self) -> float:
        return self._cash

    def equity(self, marks: Mapping[str, float] | None = None) -> float:
        """Cash plus every position valued at ``marks`` (default: the last mark of each symbol)."""
        return self._cash + sum([p.qty * self._mark(p.symbol, marks) for p in self._positions.values() if p.qty])

    def unrealised_pnl(self, marks: Mapping[str, float] | None = None) -> float:
        return sum(p.unrealised_pnl(self._mark(p.symbol, marks)) for p in self._positions.values() if p.qty)

    def summary(self, marks: Mapping[str, float] | None = None) -> AccountSummary:
        return AccountSummary(
            cash=self._cash,
            equity=self.equity(marks),
            realised_pnl=self._realised_pnl,
            unrealised_pnl=self.unrealised_pnl(marks),
            fees_paid=self._fees_paid,
            slippage_cost=self._slippage_cost,
            funding_paid=self._funding_paid,
        )

    def fills(self) -> list[Fill]:
        fills = [self._orders[i].fill for i in self._fill_ids]
        return [f for f in fills if f is not None]

    def orders(self) -> list[Order]:
        return list(self._orders.values())

    # ----- persistence ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The whole broker (params included) as JSON-safe data; :meth:`from_dict` restores it exactly."""
        return {
            "format": STATE_FORMAT,
            "params": dataclasses.asdict(self.params),
            "slippage_tiers": list(self.slippage.slippage_tiers),
            "slippage_multipliers": list(self.slippage.slippage_multipliers),
            "initial_cash": self.initial_cash,
            "cash": self._cash,
            "fees_paid": self._fees_paid,
            "slippage_cost": self._slippage_cost,
            "funding_paid": self._funding_paid,
            "realised_pnl": self._realised_pnl,
            "positions": [vars(p).copy() for p in self._positions.values()],
            "marks": dict(self._marks),
            # vars() instead of dataclasses.asdict: the fields are scalars, and asdict's deep copies cost 10x.
            "orders": [
                {**vars(o), "fill": None if o.fill is None else vars(o.fill).copy()} for o in self._orders.values()
            ],
            "fill_ids": list(self._fill_ids),
            "funding_applied": list(self._funding_applied),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PaperBroker:
        if data.get("format") != STATE_FORMAT:
            raise DataValidationError(f"paper broker state: format {data.get('format')!r} is not {STATE_FORMAT}")
        try:
            slippage = SimulateParams(
                slippage_tiers=tuple(data["slippage_tiers"]), slippage_multipliers=tuple(data["slippage_multipliers"])
            )
            broker = cls(data["initial_cash"], PaperBrokerParams(**data["params"]), slippage)
            broker._cash = data["cash"]
            broker._fees_paid = data["fees_paid"]
            broker._slippage_cost = data["slippage_cost"]
            broker._funding_paid = data["funding_paid"]
            broker._realised_pnl = data["realised_pnl"]
            broker._positions = {p["symbol"]: Position(**p) for p in data["positions"]}
            broker._marks = dict(data["marks"])
            for o in data["orders"]:
                fill = Fill(**o["fill"]) if o.get("fill") is not None else None
                broker._orders[o["client_order_id"]] = Order(**{**o, "fill": fill})
            broker._fill_ids = list(data["fill_ids"])
            broker._open = {i: None for i, o in broker._orders.items() if o.status == "open"}
            broker._funding_applied = dict.fromkeys(data["funding_applied"])
        except (KeyError, TypeError) as e:
            raise DataValidationError(f"paper broker state is malformed: {e!r}") from e
        return broker

    # ----- internals ------------------------------------------------------------------------------------
    def _check_order(self, client_order_id: str, symbol: str, side: str, qty: float, ts_ms: int) -> tuple[float, int]:
        if not isinstance(client_order_id, str) or not _ORDER_ID_RE.match(client_order_id):
            raise DataValidationError(
                f"client_order_id must be 1-64 characters of [A-Za-z0-9._:/-], got {client_order_id!r}"
            )
        if not isinstance(symbol, str) or not symbol:
            raise DataValidationError(f"symbol must be a non-empty string, got {symbol!r}")
        if side != "buy" and side != "sell":
            _check_side(side)
        if not (type(qty) is float and 0.0 < qty < _INF):
            qty = _number("qty", qty)
            if qty <= 0:
                raise DataValidationError(f"qty must be > 0, got {qty!r}")
        return qty, ts_ms if type(ts_ms) is int else _int("ts_ms", ts_ms)

    def _replayed(self, existing: Order, symbol: str, side: str, kind: str) -> Order:
        """A resubmitted client order id: the stored order, if it is the same order."""
        if (existing.symbol, existing.side, existing.kind) != (symbol, side, kind):
            raise DataValidationError(
                f"client order id {existing.client_order_id!r} already names a {existing.kind} {existing.side} "
                f"order on {existing.symbol}, not a {kind} {side} on {symbol}"
            )
        return existing

    def _rest(
        self, client_order_id: str, symbol: str, side: str, qty: float, price: float, ts_ms: int, kind: str
    ) -> Order:
        qty, ts_ms = self._check_order(client_order_id, symbol, side, qty, ts_ms)
        if not (type(price) is float and 0.0 < price < _INF):
            price = _price("limit_price" if kind == "limit" else "trigger_price", price)
        return self._resting(client_order_id, symbol, side, qty, price, ts_ms, kind)

    def _resting(
        self, client_order_id: str, symbol: str, side: str, qty: float, price: float, ts_ms: int, kind: str
    ) -> Order:
        """Rest an order past the argument checks (see :meth:`_market`)."""
        existing = self._orders.get(client_order_id)
        if existing is not None:
            return self._replayed(existing, symbol, side, kind)
        order = _order(client_order_id, symbol, kind, side, qty, price, ts_ms, "open", None, None, None)
        self._orders[client_order_id] = order
        self._open[client_order_id] = None
        return order

    def _try_fill(self, order: Order, ts_ms: int, o: float, h: float, lo: float) -> Fill | None:
        assert order.price is not None  # resting orders always carry a price
        level, buy = order.price, order.side == "buy"
        if order.kind in PROTECTIVE_KINDS:
            # A buy stop sits above the market, a buy take-profit below it (and the reverse for sells).
            above = buy == (order.kind == "stop")
            if above and h >= level:
                reference = max(o, level)
            elif not above and lo <= level:
                reference = min(o, level)
            else:
                return None
            position_qty = self.position(order.symbol).qty
            qty = abs(position_qty)
            position_sign = math.copysign(1.0, position_qty) if qty else 0.0
            if qty == 0 or position_sign == (1.0 if buy else -1.0):
                self._close(order, ts_ms, "reduce_only_no_position")
                return None
            qty = min(qty, order.qty)
            return self._execute_resting(
                order, ts_ms, self._slipped(order.side, qty, reference), reference, "taker", qty
            )
        # limit
        if (buy and o < level) or (not buy and o > level):  # marketable at the open
            price = self._slipped(order.side, order.qty, o)
            price = min(price, level) if buy else max(price, level)
            return self._execute_resting(order, ts_ms, price, o, "taker", order.qty)
        traded_through = (buy and lo < level) or (not buy and h > level)
        if traded_through and self._draw(order.client_order_id, ts_ms) < self.params.limit_fill_probability:
            return self._execute_resting(order, ts_ms, level, level, "maker", order.qty)
        return None

    def _draw(self, client_order_id: str, ts_ms: int) -> float:
        digest = hashlib.sha256(client_order_id.encode()).digest()
        words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
        rng = np.random.default_rng(
            np.random.SeedSequence([self.params.seed, *words, ts_ms & 0xFFFFFFFF, (ts_ms >> 32) & 0xFFFFFFFF])
        )
        return float(rng.random())

    def _slipped(self, side: str, qty: float, reference: float) -> float:
        frac = slippage_frac_one(self.params.spread_pct, self.params.depth_usd, qty * reference, self.slippage)
        return reference * (1.0 + frac) if side == "buy" else reference * (1.0 - frac)

    def _execute_resting(
        self, order: Order, ts_ms: int, price: float, reference: float, liquidity: str, qty: float
    ) -> Fill:
        filled = self._execute(
            order.client_order_id, order.symbol, order.kind, order.side, order.qty, order.price, order.submitted_ms,
            order.cancel_reason, ts_ms, price, reference, liquidity, qty,
        )  # fmt: skip
        assert filled.fill is not None
        return filled.fill

    def _execute(
        self,
        client_order_id: str,
        symbol: str,
        kind: str,
        side: str,
        order_qty: float,
        order_price: float | None,
        submitted_ms: int,
        cancel_reason: str | None,
        ts_ms: int,
        price: float,
        reference: float,
        liquidity: str,
        qty: float,
    ) -> Order:
        """Fill ``qty`` of the order with these fields (market orders never exist unfilled) and store it filled.

        Takes the order's fields rather than an :class:`Order`: building frozen dataclasses is a large part of
        the cost of a fill, and a market order would otherwise be built twice (open, then filled).
        """
        params = self.params
        fee_bps = params.taker_fee_bps if liquidity == "taker" else params.maker_fee_bps
        fee = qty * price * fee_bps / 10_000.0
        direction = 1.0 if side == "buy" else -1.0
        slippage_cost = direction * (price - reference) * qty
        pos = self._positions.get(symbol)
        if pos is None:
            pos = Position(symbol)
        pos_qty = pos.qty
        dq = direction * qty
        realised = 0.0
        if pos_qty == 0 or (pos_qty > 0) == (dq > 0):
            new_qty = pos_qty + dq
            avg = (abs(pos_qty) * pos.avg_entry_price + qty * price) / abs(new_qty)
        else:
            closed = min(qty, abs(pos_qty))
            realised = closed * (price - pos.avg_entry_price) * (1.0 if pos_qty > 0 else -1.0)
            if qty > abs(pos_qty):  # flip through flat: the rest opens at this price
                new_qty, avg = dq + pos_qty, price
            elif qty == abs(pos_qty):
                new_qty, avg = 0.0, 0.0
            else:
                new_qty, avg = pos_qty + dq, pos.avg_entry_price
        self._positions[symbol] = _position(symbol, new_qty, avg, pos.realised_pnl + realised, pos.fees_paid + fee)
        self._cash -= dq * price + fee
        self._fees_paid += fee
        self._slippage_cost += slippage_cost
        self._realised_pnl += realised
        fill = _fill(
            client_order_id, symbol, side, qty, price, reference, ts_ms, liquidity, fee, slippage_cost, realised
        )
        filled = _order(
            client_order_id, symbol, kind, side, order_qty, order_price, submitted_ms, "filled", fill, ts_ms,
            cancel_reason,
        )  # fmt: skip
        self._orders[client_order_id] = filled
        self._open.pop(client_order_id, None)
        self._fill_ids.append(client_order_id)
        if new_qty == 0 and self._open:
            for other in self.open_orders(symbol):
                if other.kind in PROTECTIVE_KINDS:
                    self._close(other, ts_ms, "position_closed")
        return filled

    def _close(self, order: Order, ts_ms: int, reason: str) -> Order:
        # The fields spelled out: dataclasses.replace() costs several times as much, on every cancel.
        closed = _order(
            order.client_order_id, order.symbol, order.kind, order.side, order.qty, order.price, order.submitted_ms,
            "cancelled", order.fill, ts_ms, reason,
        )  # fmt: skip
        self._orders[order.client_order_id] = closed
        self._open.pop(order.client_order_id, None)
        return closed

    def _mark(self, symbol: str, marks: Mapping[str, float] | None) -> float:
        if marks is not None and symbol in marks:
            mark = marks[symbol]
            return mark if type(mark) is float and 0.0 < mark < _INF else _price(f"marks[{symbol!r}]", mark)
        if symbol not in self._marks:
            raise DataValidationError(f"no mark price for {symbol}")
        return self._marks[symbol]


def _finite(x: Any) -> bool:
    if type(x) is float or type(x) is int:  # fast path: ABC isinstance checks dominate a per-bar call
        return math.isfinite(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _number(name: str, value: Any) -> float:
    if not _finite(value):
        raise DataValidationError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _price(name: str, value: Any) -> float:
    if not _finite(value) or value <= 0:
        raise DataValidationError(f"{name} must be a finite price > 0, got {value!r}")
    return float(value)


def _int(name: str, value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataValidationError(f"{name} must be an integer (epoch ms), got {value!r}")
    return int(value)


def _check_side(side: Any) -> None:
    if side not in SIDES:
        raise DataValidationError(f"side must be 'buy' or 'sell', got {side!r}")
