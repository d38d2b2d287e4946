"""A broker that sends real orders to the exchange through ccxt, for ``cryptoml live --live`` only.

:class:`LiveBroker` implements the :class:`~cryptoml.trading.broker.Broker` protocol (plus the runner's
``on_bar`` / ``summary`` / ``to_dict`` / ``load_dict``) with ccxt's ``create_order``, ``cancel_order``,
``fetch_order``, ``fetch_positions`` and ``fetch_balance``. Written against Binance USDⓈ-M
(``binanceusdm``) and checked against the stub exchange's copy of its signed endpoints.

**Idempotent orders.** Every order carries the runner's deterministic client order id (Binance's
``newClientOrderId``; for the stop-loss / take-profit orders, which ccxt 4.5 sends to the conditional
"algo" endpoint, ``clientAlgoId``). Before sending, the broker asks the exchange for that id; only when the
exchange does not know it is the order created. A replay after a crash therefore adopts the order the
killed process sent instead of sending it twice, and a duplicate that slips through (two processes) is
refused by the exchange (-4116 "ClientOrderId is duplicated.") and adopted the same way. Binance keeps
client ids unique only among *open* orders, which is why the lookup comes first.

**Accounting.** The exchange is the source of truth: position size and entry price come from
``fetch_positions``, wallet and margin balance from ``fetch_balance`` (in the quote currency, USDT), read
after each fill and on each bar. Fill prices are the exchange's average price; fees are estimated at
``taker_fee_bps`` (the exchange's trade list has the exact figures); realised PnL is booked per fill
against the entry price the exchange reported before it. A protective order seen closed fills at its
trigger price (an estimate; the trade list has the actual price).

**Keys.** :func:`credentials_from_env` reads ``CRYPTOML_API_KEY`` and ``CRYPTOML_API_SECRET`` and refuses to
start without them; :func:`guard_logging` keeps them out of every log line (ccxt's DEBUG request dump
carries the key header, so ccxt's logger is held at INFO, and a filter on the root handlers masks both
strings in anything else). Neither value is stored in the broker's state, repr or error messages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptoml.errors import ConfigError, DataValidationError, SourceError
from cryptoml.trading.broker import AccountSummary, Fill, Order, OrderBook, Position

__all__ = ["ENV_KEY", "ENV_SECRET", "Credentials", "LiveBroker", "credentials_from_env", "guard_logging"]

log = logging.getLogger("cryptoml.live")

ENV_KEY, ENV_SECRET = "CRYPTOML_API_KEY", "CRYPTOML_API_SECRET"
STATE_FORMAT = 1
_DUPLICATE_CODES = ('"code":-4116', '"code":-20132')  # Binance: client order id / client algo id in use
_PROTECTIVE = ("stop", "take_profit")


@dataclass(frozen=True)
class Credentials:
    """An exchange API key and secret; never shown (repr and str are masked)."""

    api_key: str = dataclasses.field(repr=False)
    secret: str = dataclasses.field(repr=False)

    def __str__(self) -> str:
        return "Credentials(<masked>)"


def credentials_from_env(environ: Mapping[str, str] | None = None) -> Credentials:
    """The API key and secret from ``CRYPTOML_API_KEY`` / ``CRYPTOML_API_SECRET``; ConfigError naming the
    missing variables (and never their values) when either is unset or blank."""
    env = os.environ if environ is None else environ
    missing = [name for name in (ENV_KEY, ENV_SECRET) if not env.get(name, "").strip()]
    if missing:
        raise ConfigError(
            f"--live trades real money and needs the exchange API key and secret in the environment: "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set (export them, e.g. from a "
            "systemd EnvironmentFile readable by the service user only; never put them in params.yaml or on "
            "the command line). Without them, run --paper."
        )
    return Credentials(env[ENV_KEY].strip(), env[ENV_SECRET].strip())


class _Masking(logging.Filter):
    """Replaces the secret strings in a record's formatted message (and its exception text) by ``***``."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self._mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if self._mask(text) != text:
                record.exc_info, record.exc_text = None, self._mask(text)
        return True


def guard_logging(credentials: Credentials) -> None:
    """Keep the key and secret out of the logs: ccxt's logger (whose DEBUG lines dump request headers,
    the key among them) is held at INFO or above, and every handler of the root logger masks both strings."""
    ccxt_logger = logging.getLogger("ccxt")
    ccxt_logger.setLevel(max(logging.INFO, ccxt_logger.getEffectiveLevel()))
    masking = _Masking((credentials.api_key, credentials.secret))
    for handler in logging.getLogger().handlers:
        handler.addFilter(masking)


def _is_duplicate(error: BaseException) -> bool:
    return any(code in str(error).replace(" ", "") for code in _DUPLICATE_CODES)


class LiveBroker:
    """Real orders on ``client`` (a ccxt exchange, e.g. ``make_exchange("binanceusdm")``); see the module doc.

    The credentials are handed to ccxt (its ``apiKey`` / ``secret``) and kept nowhere else. ``taker_fee_bps``
    estimates the fee of a fill. Errors: ccxt's network errors propagate (the runner retries the bar's
    fetch; an order call is retried by the replay, whose lookup makes it safe); an exchange refusal becomes
    :class:`~cryptoml.errors.SourceError` naming the call and the client order id.
    """

    def __init__(self, client: Any, credentials: Credentials, *, taker_fee_bps: float = 4.0) -> None:
        self.client = client
        client.apiKey = credentials.api_key
        client.secret = credentials.secret
        # With keys set, ccxt's load_markets also reads the currency list from the spot wallet API (sapi),
        # which a futures-only key may not be allowed to call; nothing here needs it.
        client.options["fetchCurrencies"] = False
        guard_logging(credentials)
        self.taker_fee_bps = float(taker_fee_bps)
        self._orders: dict[str, Order] = {}
        self._kinds: dict[str, str] = {}  # client order id -> our order kind
        self._fill_ids: list[str] = []
        self._positions: dict[str, Position] = {}
        self._cash = 0.0  # wallet balance (quote currency)
        self._equity = 0.0  # margin balance: wallet + unrealised, at the exchange's marks
        self._realised_pnl = 0.0
        self._fees_paid = 0.0
        self._slippage_cost = 0.0

    def __repr__(self) -> str:
        return f"LiveBroker({getattr(self.client, 'id', '?')}, {len(self._orders)} orders)"

    # ----- exchange calls -------------------------------------------------------------------------------
    def _call(self, what: str, client_order_id: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import ccxt

        try:
            return fn(*args, **kwargs)
        except ccxt.NetworkError:
            raise
        except ccxt.BaseError as e:
            raise SourceError(f"{self.client.id} {what} {client_order_id}: {type(e).__name__}: {e}") from e

    def _lookup(self, client_order_id: str, symbol: str, kind: str) -> dict[str, Any] | None:
        """The exchange's order with this client id, None when it does not know it."""
        import ccxt

        params = (
            {"clientAlgoId": client_order_id, "trigger": True}
            if kind in _PROTECTIVE
            else {"origClientOrderId": client_order_id}
        )
        try:
            return dict(self.client.fetch_order(None, symbol, params))
        except ccxt.OrderNotFound:
            return None
        except ccxt.NetworkError:
            raise
        except ccxt.BaseError as e:
            raise SourceError(f"{self.client.id} fetch_order {client_order_id}: {type(e).__name__}: {e}") from e

    def _place(
        self, client_order_id: str, symbol: str, kind: str, side: str, qty: float, price: float | None
    ) -> dict[str, Any]:
        """Create the order unless the exchange already has this client id (then adopt it)."""
        import ccxt

        found = self._lookup(client_order_id, symbol, kind)
        if found is not None:
            log.info("order %s already on the exchange (%s): adopted, not sent again", client_order_id, found["status"])
            return found
        params: dict[str, Any] = {"clientOrderId" if kind in _PROTECTIVE else "newClientOrderId": client_order_id}
        ccxt_type = "limit" if kind == "limit" else "market"
        if kind == "stop":
            params.update(stopLossPrice=price, reduceOnly=True)
        elif kind == "take_profit":
            params.update(takeProfitPrice=price, reduceOnly=True)
        try:
            limit_price = price if kind == "limit" else None
            return dict(self.client.create_order(symbol, ccxt_type, side, qty, limit_price, params))
        except ccxt.NetworkError:
            raise
        except ccxt.BaseError as e:
            if _is_duplicate(e):  # sent meanwhile (another process, or a retried request that got through)
                again = self._lookup(client_order_id, symbol, kind)
                if again is not None:
                    return again
            raise SourceError(f"{self.client.id} create_order {client_order_id}: {type(e).__name__}: {e}") from e

    # ----- orders -------------------------------------------------------------------------------------
    def _submit(
        self, client_order_id: str, symbol: str, kind: str, side: str, qty: float, price: float | None, ts_ms: int,
        reference: float | None = None,
    ) -> Order:  # fmt: skip
        if side not in ("buy", "sell") or not qty > 0:
            raise DataValidationError(f"order {client_order_id}: side must be buy or sell and qty > 0")
        known = self._orders.get(client_order_id)
        if known is not None:
            if (known.symbol, known.side, known.kind) != (symbol, side, kind):
                raise DataValidationError(f"client order id {client_order_id!r} names another order already")
            return known
        raw = self._place(client_order_id, symbol, kind, side, qty, price)
        order = Order(client_order_id, symbol, kind, side, qty, price, ts_ms, "open")
        self._kinds[client_order_id] = kind
        self._orders[client_order_id] = order
        return self._update(order, raw, ts_ms, reference)

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
        """A market order; ``price`` (the bar's close) is the reference its slippage is measured against."""
        reference = book.mid() if book is not None else price
        return self._submit(client_order_id, symbol, "market", side, qty, None, ts_ms, reference)

    def submit_limit(
        self, client_order_id: str, symbol: str, side: str, qty: float, limit_price: float, *, ts_ms: int
    ) -> Order:
        return self._submit(client_order_id, symbol, "limit", side, qty, limit_price, ts_ms, limit_price)

    def submit_stop(
        self, client_order_id: str, symbol: str, side: str, qty: float, trigger_price: float, *, ts_ms: int
    ) -> Order:
        """A reduce-only stop-market order resting on the exchange."""
        return self._submit(client_order_id, symbol, "stop", side, qty, trigger_price, ts_ms, trigger_price)

    def submit_take_profit(
        self, client_order_id: str, symbol: str, side: str, qty: float, trigger_price: float, *, ts_ms: int
    ) -> Order:
        """A reduce-only take-profit-market order resting on the exchange."""
        return self._submit(client_order_id, symbol, "take_profit", side, qty, trigger_price, ts_ms, trigger_price)

    def cancel(self, client_order_id: str, *, ts_ms: int) -> Order:
        """Cancel an open order; one the exchange already filled or closed comes back with its final state."""
        import ccxt

        order = self._orders.get(client_order_id)
        if order is None:
            raise DataValidationError(f"cancel: unknown client order id {client_order_id!r}")
        if order.status != "open":
            return order
        kind = self._kinds.get(client_order_id, order.kind)
        params = (
            {"clientAlgoId": client_order_id, "trigger": True}
            if kind in _PROTECTIVE
            else {"origClientOrderId": client_order_id}
        )
        try:
            self.client.cancel_order(None, order.symbol, params)
        except ccxt.OrderNotFound:
            pass  # filled or gone meanwhile: the lookup below says which
        except ccxt.NetworkError:
            raise
        except ccxt.BaseError as e:
            raise SourceError(f"{self.client.id} cancel_order {client_order_id}: {type(e).__name__}: {e}") from e
        raw = self._lookup(client_order_id, order.symbol, kind)
        if raw is None:
            closed = dataclasses.replace(
                order, status="cancelled", closed_ms=ts_ms, cancel_reason="unknown_to_exchange"
            )
            self._orders[client_order_id] = closed
            return closed
        return self._update(order, raw, ts_ms, order.price)

    def get_order(self, client_order_id: str) -> Order | None:
        return self._orders.get(client_order_id)

    def open_orders(self, symbol: str | None = None) -> list[Order]:
        return [o for o in self._orders.values() if o.status == "open" and (symbol is None or o.symbol == symbol)]

    def _update(self, order: Order, raw: Mapping[str, Any], ts_ms: int, reference: float | None) -> Order:
        """Apply the exchange's view of an order: a fill when it closed with an executed quantity."""
        status = raw.get("status")
        if order.status != "open" or status in ("open", None):
            return order
        filled = float(raw.get("filled") or 0.0)
        if order.kind in _PROTECTIVE and status == "closed" and not filled:
            filled = order.qty  # a triggered conditional order reports no fill of its own
        if status == "closed" and filled > 0:
            price = float(raw.get("average") or raw.get("price") or order.price or reference or 0.0)
            if not price > 0:
                raise SourceError(f"{self.client.id}: order {order.client_order_id} closed without a fill price")
            fill = self._book_fill(order, filled, price, reference if reference else price, ts_ms)
            new = dataclasses.replace(order, status="filled", fill=fill, closed_ms=ts_ms)
        else:
            new = dataclasses.replace(order, status="cancelled", closed_ms=ts_ms, cancel_reason=str(status))
        self._orders[order.client_order_id] = new
        return new

    def _book_fill(self, order: Order, qty: float, price: float, reference: float, ts_ms: int) -> Fill:
        position = self.position(order.symbol)
        sign = 1.0 if order.side == "buy" else -1.0
        realised = 0.0
        if position.qty and (position.qty > 0) != (sign > 0):
            closed = min(qty, abs(position.qty))
            realised = closed * (price - position.avg_entry_price) * (1.0 if position.qty > 0 else -1.0)
        fee = qty * price * self.taker_fee_bps / 10_000.0
        slippage = sign * (price - reference) * qty
        self._realised_pnl += realised
        self._fees_paid += fee
        self._slippage_cost += slippage
        fill = Fill(order.client_order_id, order.symbol, order.side, qty, price, reference, ts_ms, "taker", fee,
                    slippage, realised)  # fmt: skip
        self._fill_ids.append(order.client_order_id)
        self.refresh_account([order.symbol])
        return fill

    # ----- market data and account ----------------------------------------------------------------------
    def refresh_account(self, symbols: list[str]) -> None:
        """Position and balance as the exchange reports them now."""
        for symbol in symbols:
            rows = self._call("fetch_positions", symbol, self.client.fetch_positions, [symbol])
            amount, entry = 0.0, 0.0
            for row in rows or []:
                info = row.get("info") or {}
                if row.get("symbol") == symbol and info.get("positionAmt") is not None:
                    amount, entry = float(info["positionAmt"]), float(info.get("entryPrice") or 0.0)
            old = self._positions.get(symbol, Position(symbol))
            self._positions[symbol] = Position(
                symbol, amount, entry if amount else 0.0, old.realised_pnl, old.fees_paid
            )
        balance = self._call("fetch_balance", "", self.client.fetch_balance)
        quote = self._quote(symbols[0]) if symbols else "USDT"
        for asset in (balance.get("info") or {}).get("assets", []):
            if asset.get("asset") == quote:
                self._cash = float(asset.get("walletBalance") or 0.0)
                self._equity = float(asset.get("marginBalance") or self._cash)

    def _quote(self, symbol: str) -> str:
        return symbol.split("/")[1].split(":")[0] if "/" in symbol else "USDT"

    def on_bar(self, symbol: str, ts_ms: int, open: float, high: float, low: float, close: float) -> list[Fill]:
        """Read the exchange's state of the symbol's open orders (protective ones may have triggered), then
        its position and balance; returns the fills found."""
        fills = []
        for order in self.open_orders(symbol):
            raw = self._lookup(order.client_order_id, symbol, self._kinds.get(order.client_order_id, order.kind))
            if raw is None:
                continue
            new = self._update(order, raw, ts_ms, order.price)
            if new.fill is not None:
                fills.append(new.fill)
        self.refresh_account([symbol])
        return fills

    def position(self, symbol: str) -> Position:
        return self._positions.get(symbol, Position(symbol))

    def positions(self) -> dict[str, Position]:
        return {s: p for s, p in self._positions.items() if p.qty}

    def cash(self) -> float:
        return self._cash

    def equity(self, marks: Mapping[str, float] | None = None) -> float:
        """Wallet balance plus the positions' PnL at ``marks`` (default: the exchange's margin balance)."""
        if not marks:
            return self._equity
        return self._cash + sum(p.unrealised_pnl(marks.get(s, p.avg_entry_price)) for s, p in self.positions().items())

    def summary(self, marks: Mapping[str, float] | None = None) -> AccountSummary:
        equity = self.equity(marks)
        return AccountSummary(self._cash, equity, self._realised_pnl, equity - self._cash, self._fees_paid,
                              self._slippage_cost, 0.0)  # fmt: skip

    def fills(self) -> list[Fill]:
        out = [self._orders[i].fill for i in self._fill_ids]
        return [f for f in out if f is not None]

    # ----- persistence (no credentials in here) ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "kind": "live",
            "exchange": str(getattr(self.client, "id", "")),
            "orders": [
                {**vars(o), "fill": None if o.fill is None else vars(o.fill).copy()} for o in self._orders.values()
            ],
            "kinds": dict(self._kinds),
            "fill_ids": list(self._fill_ids),
            "positions": [vars(p).copy() for p in self._positions.values()],
            "cash": self._cash,
            "equity": self._equity,
            "realised_pnl": self._realised_pnl,
            "fees_paid": self._fees_paid,
            "slippage_cost": self._slippage_cost,
        }

    def load_dict(self, data: Mapping[str, Any]) -> None:
        """Restore the cache of :meth:`to_dict` (after a restart); the exchange stays the source of truth."""
        if data.get("kind") != "live" or data.get("format") != STATE_FORMAT:
            raise DataValidationError(
                "the state file was written by a paper broker (or another format): a --live run needs its own "
                "--state file"
            )
        try:
            for o in data["orders"]:
                fill = Fill(**o["fill"]) if o.get("fill") is not None else None
                self._orders[o["client_order_id"]] = Order(**{**o, "fill": fill})
            self._kinds = dict(data["kinds"])
            self._fill_ids = list(data["fill_ids"])
            self._positions = {p["symbol"]: Position(**p) for p in data["positions"]}
            self._cash, self._equity = float(data["cash"]), float(data["equity"])
            self._realised_pnl, self._fees_paid = float(data["realised_pnl"]), float(data["fees_paid"])
            self._slippage_cost = float(data["slippage_cost"])
        except (KeyError, TypeError) as e:
            raise DataValidationError(f"live broker state is malformed: {e!r}") from e
