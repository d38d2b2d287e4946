"""The paper broker: fill prices, protective and limit orders, idempotent ids, exact accounting and persistence."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptoml.config import SimulateParams
from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.simulate.slippage import slippage_frac_one
from cryptoml.trading import broker as paper
from cryptoml.trading.broker import (
    Broker,
    Fill,
    Order,
    OrderBook,
    PaperBroker,
    PaperBrokerParams,
    Position,
    make_client_order_id,
    walk_book,
)
from cryptoml.trading.strategy import StrategyParams, StrategyState, decide
from tests.conftest import shared_file

SYM = "BTC/USDT:USDT"
T0 = 1_704_067_200_000
MINUTE_MS = 60_000
FREE = PaperBrokerParams(taker_fee_bps=0.0, maker_fee_bps=0.0, spread_pct=0.0)  # no costs: exact prices


def broker(params: PaperBrokerParams = FREE, cash: float = 10_000.0) -> PaperBroker:
    return PaperBroker(cash, params)


def long_at(b: PaperBroker, price: float = 100.0, qty: float = 1.0) -> None:
    b.submit_market("entry", SYM, "buy", qty, ts_ms=T0, price=price)


def test_paper_broker_implements_the_protocol() -> None:
    assert isinstance(broker(), Broker)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("taker_fee_bps", -1.0),
        ("maker_fee_bps", math.nan),
        ("limit_fill_probability", 1.5),
        ("seed", -1),
        ("spread_pct", -0.1),
        ("depth_usd", 0.0),
        ("book_exhausted_penalty_bps", math.inf),
    ],
)
def test_invalid_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"broker\.{field}"):
        dataclasses.replace(PaperBrokerParams(), **{field: value}).validate()


# ----- market orders ----------------------------------------------------------------------------------
def test_market_order_uses_the_slippage_model_and_the_taker_fee() -> None:
    params = PaperBrokerParams()  # 1 bp assumed spread, 250k depth, 4 bps taker
    b = broker(params)
    order = b.submit_market("a1", SYM, "buy", 0.1, ts_ms=T0, price=50_000.0)
    slip = slippage_frac_one(0.01, 250_000.0, 5_000.0, SimulateParams())
    assert slip == pytest.approx(0.01 / 100 / 2 * 1.5)  # 5k / 250k = 2 % of depth: the 1.5x tier
    fill = order.fill
    assert fill is not None and order.status == "filled"
    assert fill.price == pytest.approx(50_000.0 * (1 + slip))
    assert fill.reference_price == 50_000.0 and fill.liquidity == "taker"
    assert fill.fee == pytest.approx(0.1 * fill.price * 4e-4)
    assert fill.slippage_cost == pytest.approx(0.1 * 50_000.0 * slip)
    assert b.cash() == pytest.approx(10_000.0 - 0.1 * fill.price - fill.fee)
    sell = b.submit_market("a2", SYM, "sell", 0.1, ts_ms=T0 + 1, price=50_000.0).fill
    assert sell is not None and sell.price == pytest.approx(50_000.0 * (1 - slip))


def test_market_order_defaults_to_the_last_mark_and_needs_one() -> None:
    b = broker()
    with pytest.raises(DataValidationError, match="no price"):
        b.submit_market("m1", SYM, "buy", 1.0, ts_ms=T0)
    b.on_bar(SYM, T0, 100.0, 101.0, 99.0, 100.5)
    fill = b.submit_market("m1", SYM, "buy", 1.0, ts_ms=T0 + MINUTE_MS).fill
    assert fill is not None and fill.price == 100.5


def test_marks_value_positions_and_flat_symbols_drop_out() -> None:
    b = broker()
    b.submit_market("e1", SYM, "buy", 2.0, ts_ms=T0, price=100.0)
    b.submit_market("e2", "ETH/USDT:USDT", "sell", 10.0, ts_ms=T0, price=10.0)
    b.mark(SYM, 105.0)
    assert b.equity() == pytest.approx(10_000.0 + 10.0)
    assert b.equity({"ETH/USDT:USDT": 9.0}) == pytest.approx(10_000.0 + 10.0 + 10.0)
    b.submit_market("x2", "ETH/USDT:USDT", "buy", 10.0, ts_ms=T0, price=10.0)
    assert set(b.positions()) == {SYM} and b.position("ETH/USDT:USDT").qty == 0.0
    with pytest.raises(DataValidationError, match="price"):
        b.mark(SYM, 0.0)


BOOK = OrderBook(bids=((99.0, 1.0), (98.0, 2.0)), asks=((100.0, 1.0), (101.0, 2.0), (102.0, 1.0)))


def test_book_walk_matches_a_hand_computed_example() -> None:
    assert walk_book(BOOK, "buy", 0.5, 50.0) == (100.0, 0.0)
    assert walk_book(BOOK, "buy", 2.5, 50.0) == (pytest.approx((1 * 100 + 1.5 * 101) / 2.5), 0.0)
    # 5 > the 4 on offer: the last unit fills at 102 worsened by 50 bps.
    avg, unfilled = walk_book(BOOK, "buy", 5.0, 50.0)
    assert unfilled == 1.0 and avg == pytest.approx((100 + 2 * 101 + 102 + 102 * 1.005) / 5)
    avg, unfilled = walk_book(BOOK, "sell", 4.0, 50.0)
    assert unfilled == 1.0 and avg == pytest.approx((99 + 2 * 98 + 98 * 0.995) / 4)


def test_market_order_with_a_book_walks_it_against_the_mid() -> None:
    b = broker(dataclasses.replace(FREE, taker_fee_bps=5.0))
    fill = b.submit_market("b1", SYM, "buy", 2.5, ts_ms=T0, price=1_000.0, book=BOOK).fill  # book wins
    assert fill is not None
    assert fill.price == pytest.approx(100.6) and fill.reference_price == 99.5
    assert fill.slippage_cost == pytest.approx((100.6 - 99.5) * 2.5)
    assert fill.fee == pytest.approx(2.5 * 100.6 * 5e-4)


def test_book_validation() -> None:
    with pytest.raises(DataValidationError, match="asks"):
        walk_book(OrderBook(bids=((99.0, 1.0),), asks=()), "buy", 1.0, 0.0)
    with pytest.raises(DataValidationError, match="bids\\[1\\]"):
        OrderBook(bids=((99.0, 1.0), (99.5, 1.0)), asks=())
    with pytest.raises(DataValidationError, match="asks\\[0\\]"):
        OrderBook(bids=(), asks=((math.nan, 1.0),))


def test_book_walk_on_a_real_binance_futures_snapshot() -> None:
    path = shared_file("tardis_binance-futures_btcusdt_book_snapshot_25_20200901.csv")
    with path.open() as f:
        row = next(csv.DictReader(f))  # 25 levels a side, BTCUSDT perpetual, 2020-09-01 00:00:03 UTC
    side = {
        s: [(float(row[f"{s}[{i}].price"]), float(row[f"{s}[{i}].amount"])) for i in range(25)]
        for s in ("bids", "asks")
    }
    book = OrderBook(tuple(side["bids"]), tuple(side["asks"]))
    asks = side["asks"]
    total_ask = sum(q for _, q in asks)
    prices = [walk_book(book, "buy", q, 50.0)[0] for q in (0.001, 1.0, 10.0, total_ask)]
    assert prices[0] == asks[0][0]
    assert prices == sorted(prices)
    assert prices[-1] < asks[-1][0]  # the whole book fits: no penalty
    assert walk_book(book, "buy", 2 * total_ask, 50.0)[1] == pytest.approx(total_ask)
    assert walk_book(book, "sell", 10.0, 50.0)[0] <= book.bids[0][0] < book.mid() < asks[0][0]


# ----- protective orders ------------------------------------------------------------------------------
def test_stop_loss_fills_at_the_trigger_or_the_gapped_open() -> None:
    b = broker()
    long_at(b)
    b.submit_stop("sl", SYM, "sell", 1.0, 99.0, ts_ms=T0 + MINUTE_MS)
    assert b.on_bar(SYM, T0 + MINUTE_MS, 100.0, 100.5, 99.01, 99.5) == []
    fills = b.on_bar(SYM, T0 + 2 * MINUTE_MS, 99.5, 99.6, 98.5, 98.8)
    assert [(f.price, f.realised_pnl) for f in fills] == [(99.0, -1.0)]
    assert b.position(SYM).qty == 0.0 and b.get_order("sl").status == "filled"  # type: ignore[union-attr]

    gap = broker()
    long_at(gap)
    gap.submit_stop("sl", SYM, "sell", 1.0, 99.0, ts_ms=T0 + MINUTE_MS)
    (fill,) = gap.on_bar(SYM, T0 + MINUTE_MS, 97.0, 97.5, 96.0, 97.2)  # opened below the stop
    assert fill.price == 97.0 and fill.realised_pnl == -3.0


def test_take_profit_of_a_short_and_a_buy_stop_above_it() -> None:
    b = broker()
    b.submit_market("entry", SYM, "sell", 2.0, ts_ms=T0, price=100.0)
    b.submit_stop("sl", SYM, "buy", 2.0, 101.0, ts_ms=T0)
    b.submit_take_profit("tp", SYM, "buy", 2.0, 97.0, ts_ms=T0)
    (fill,) = b.on_bar(SYM, T0 + MINUTE_MS, 98.0, 98.5, 96.5, 97.5)
    assert (fill.client_order_id, fill.side, fill.price, fill.realised_pnl) == ("tp", "buy", 97.0, 6.0)
    assert b.get_order("sl").cancel_reason == "position_closed"  # type: ignore[union-attr]


def test_stop_and_take_profit_touched_in_one_bar_the_stop_fills() -> None:
    b = broker()
    long_at(b)
    b.submit_take_profit("tp", SYM, "sell", 1.0, 103.0, ts_ms=T0)  # submitted first, still processed second
    b.submit_stop("sl", SYM, "sell", 1.0, 99.0, ts_ms=T0)
    (fill,) = b.on_bar(SYM, T0 + MINUTE_MS, 100.0, 104.0, 98.0, 101.0)
    assert (fill.client_order_id, fill.price) == ("sl", 99.0)
    assert b.get_order("tp").status == "cancelled"  # type: ignore[union-attr]
    assert b.equity() == pytest.approx(9_999.0)


def test_protective_orders_are_reduce_only_and_wait_for_their_bar() -> None:
    b = broker()
    b.submit_stop("sl", SYM, "sell", 1.0, 99.0, ts_ms=T0 + MINUTE_MS)
    assert b.on_bar(SYM, T0, 100.0, 100.0, 90.0, 95.0) == []  # bar opened before the order existed
    assert b.get_order("sl").status == "open"  # type: ignore[union-attr]
    b.on_bar(SYM, T0 + MINUTE_MS, 95.0, 95.0, 90.0, 92.0)  # triggers with no long to protect
    assert b.get_order("sl").cancel_reason == "reduce_only_no_position"  # type: ignore[union-attr]
    assert b.position(SYM).qty == 0.0 and b.fills() == []

    b2 = broker()
    long_at(b2, qty=0.5)
    b2.submit_stop("sl", SYM, "sell", 2.0, 99.0, ts_ms=T0)
    (fill,) = b2.on_bar(SYM, T0 + MINUTE_MS, 100.0, 100.0, 98.0, 98.5)
    assert fill.qty == 0.5 and b2.position(SYM).qty == 0.0  # clipped: never flips into a short


# ----- limit orders -----------------------------------------------------------------------------------
def test_limit_fills_only_through_the_price_and_at_it() -> None:
    b = broker(dataclasses.replace(FREE, limit_fill_probability=1.0, maker_fee_bps=2.0))
    b.submit_limit("l1", SYM, "buy", 1.0, 99.0, ts_ms=T0)
    assert b.on_bar(SYM, T0, 100.0, 100.0, 99.0, 99.5) == []  # a touch is not a trade-through
    (fill,) = b.on_bar(SYM, T0 + MINUTE_MS, 99.5, 99.8, 98.9, 99.2)
    assert (fill.price, fill.liquidity, fill.fee) == (99.0, "maker", pytest.approx(99.0 * 2e-4))
    never = broker(dataclasses.replace(FREE, limit_fill_probability=0.0))
    never.submit_limit("l1", SYM, "sell", 1.0, 101.0, ts_ms=T0)
    assert never.on_bar(SYM, T0, 100.0, 105.0, 100.0, 104.0) == []


def test_a_limit_the_bar_opens_through_fills_at_the_open_as_taker() -> None:
    b = broker(dataclasses.replace(PaperBrokerParams(), limit_fill_probability=0.0))
    b.submit_limit("l1", SYM, "buy", 1.0, 99.0, ts_ms=T0)
    (fill,) = b.on_bar(SYM, T0, 97.0, 97.5, 96.0, 97.2)
    assert fill.liquidity == "taker" and fill.reference_price == 97.0 and 97.0 < fill.price <= 99.0


def test_limit_fill_probability_converges_and_replays() -> None:
    params = dataclasses.replace(FREE, limit_fill_probability=0.3, seed=11)
    a, b, other_seed = broker(params), broker(params), broker(dataclasses.replace(params, seed=12))
    n = 3_000
    outcomes = []
    for x in (a, b, other_seed):
        for i in range(n):
            x.submit_limit(f"lim-{i}", SYM, "buy", 1.0, 99.0, ts_ms=T0)
        x.on_bar(SYM, T0, 100.0, 100.0, 98.0, 99.0)
        outcomes.append([x.get_order(f"lim-{i}").status == "filled" for i in range(n)])  # type: ignore[union-attr]
    rate = sum(outcomes[0]) / n
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert outcomes[0] == outcomes[1]  # same seed and ids: same outcome
    assert outcomes[0] != outcomes[2]
    # Replaying the bar changes nothing; a later bar is a fresh draw for the orders still open.
    before = len(a.fills())
    a.on_bar(SYM, T0, 100.0, 100.0, 98.0, 99.0)
    assert len(a.fills()) == before
    a.on_bar(SYM, T0 + MINUTE_MS, 99.0, 99.0, 98.0, 98.5)
    assert len(a.fills()) > before


# ----- idempotency and bad input ----------------------------------------------------------------------
def test_client_order_ids_are_idempotent() -> None:
    b = broker(PaperBrokerParams())
    first = b.submit_market("same", SYM, "buy", 1.0, ts_ms=T0, price=100.0)
    state = b.to_dict()
    again = b.submit_market("same", SYM, "buy", 3.0, ts_ms=T0 + 5_000, price=120.0)  # replay: new price, qty
    assert again == first and b.to_dict() == state and len(b.fills()) == 1
    with pytest.raises(DataValidationError, match="already names"):
        b.submit_market("same", SYM, "sell", 1.0, ts_ms=T0, price=100.0)
    with pytest.raises(DataValidationError, match="already names"):
        b.submit_stop("same", SYM, "buy", 1.0, 90.0, ts_ms=T0)
    stop = b.submit_stop("s1", SYM, "sell", 1.0, 90.0, ts_ms=T0)
    assert b.submit_stop("s1", SYM, "sell", 1.0, 95.0, ts_ms=T0) == stop
    assert b.cancel("s1", ts_ms=T0 + 1).status == "cancelled"
    assert b.cancel("s1", ts_ms=T0 + 2).closed_ms == T0 + 1  # unchanged the second time
    with pytest.raises(DataValidationError, match="unknown client order id"):
        b.cancel("nope", ts_ms=T0)


def test_make_client_order_id_is_deterministic_and_exchange_safe() -> None:
    ids = {make_client_order_id(s, T0 + k * MINUTE_MS, p) for s in (SYM, "ETH/USDT:USDT") for k in range(3)
           for p in ("entry", "exit", "stop", "take_profit")}  # fmt: skip
    assert len(ids) == 24 and all(len(i) <= 36 for i in ids)
    assert make_client_order_id(SYM, T0, "entry") == make_client_order_id(SYM, T0, "entry")
    with pytest.raises(DataValidationError, match="purpose"):
        make_client_order_id(SYM, T0, "open")


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda b: b.submit_market("x", SYM, "buy", 0.0, ts_ms=T0, price=1.0), "qty"),
        (lambda b: b.submit_market("x", SYM, "buy", -1.0, ts_ms=T0, price=1.0), "qty"),
        (lambda b: b.submit_market("x", SYM, "buy", math.nan, ts_ms=T0, price=1.0), "qty"),
        (lambda b: b.submit_market("x", SYM, "buy", 1.0, ts_ms=T0, price=math.nan), "price"),
        (lambda b: b.submit_market("x", SYM, "long", 1.0, ts_ms=T0, price=1.0), "side"),
        (lambda b: b.submit_market("", SYM, "buy", 1.0, ts_ms=T0, price=1.0), "client_order_id"),
        (lambda b: b.submit_market("x", SYM, "buy", 1.0, ts_ms=True, price=1.0), "ts_ms"),
        (lambda b: b.submit_limit("x", SYM, "buy", 1.0, -5.0, ts_ms=T0), "limit_price"),
        (lambda b: b.submit_stop("x", SYM, "sell", 1.0, math.inf, ts_ms=T0), "trigger_price"),
        (lambda b: b.on_bar(SYM, T0, 100.0, 99.0, 98.0, 100.0), "low <= open"),
        (lambda b: b.on_bar(SYM, T0, math.nan, 99.0, 98.0, 100.0), "open"),
        (lambda b: b.apply_funding(SYM, T0, math.nan, 100.0), "funding_rate"),
    ],
)
def test_bad_input_names_what_is_wrong(call, name: str) -> None:
    with pytest.raises(DataValidationError, match=name):
        call(broker())


@pytest.mark.parametrize("field", ["open", "high", "low", "close"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -1.0, "100"])
def test_a_bad_bar_price_is_named(field: str, bad: object) -> None:
    prices: dict[str, Any] = {"open": 100.0, "high": 101.0, "low": 99.0, "close": 100.5}
    prices[field] = bad
    with pytest.raises(DataValidationError, match=rf"^{field} must be a finite price > 0"):
        broker().on_bar(SYM, T0, **prices)


def test_bars_accept_numpy_scalars_and_ints_and_mark_plain_floats() -> None:
    b = broker()
    long_at(b)
    b.submit_stop("sl", SYM, "sell", 1.0, np.float64(99.0), ts_ms=np.int64(T0))
    assert b.on_bar(SYM, np.int64(T0 + MINUTE_MS), np.float64(100.0), 101, np.float32(99.5), 100) == []
    assert type(b.to_dict()["marks"][SYM]) is float and b.to_dict()["marks"][SYM] == 100.0
    (fill,) = b.on_bar(SYM, T0 + 2 * MINUTE_MS, 99.5, 99.6, np.float64(98.5), 98.8)
    assert fill.price == 99.0 and type(fill.price) is float and type(b.get_order("sl").price) is float


def test_client_order_ids_from_the_cache_are_the_computed_ones() -> None:
    digest = hashlib.sha256(b"SOL/USDT:USDT").hexdigest()[:6]
    for _ in range(2):  # computed (and cached), then from the cache
        assert make_client_order_id("SOL/USDT:USDT", T0, "stop", prefix="cache-t") == f"cache-t-{digest}-{T0}-sl"
    assert make_client_order_id("SOL/USDT:USDT", np.int64(T0 + 1), "take_profit", "cache-t").endswith(f"-{T0 + 1}-tp")
    for _ in range(2):  # nothing invalid is cached: it fails every time
        with pytest.raises(DataValidationError, match="prefix 'bad prefix' makes it invalid"):
            make_client_order_id(SYM, T0, "entry", prefix="bad prefix")
        with pytest.raises(DataValidationError, match="too long"):
            make_client_order_id(SYM, T0, "entry", prefix="x" * 20)
        with pytest.raises(DataValidationError, match="purpose"):
            make_client_order_id(SYM, T0, "open")


def assert_same_instance(built: object, made: object) -> None:
    """``built`` is indistinguishable from the dataclass instance ``made``: equality, hash, repr, field order."""
    assert type(built) is type(made)
    assert built == made and hash(built) == hash(made) and repr(built) == repr(made)
    assert list(vars(built)) == [f.name for f in dataclasses.fields(made)]  # type: ignore[arg-type]
    assert vars(built) == vars(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.qty = 0.0  # type: ignore[attr-defined]


def test_fast_builders_make_the_constructors_instances() -> None:
    fill_fields = ("f1", SYM, "sell", 1.5, 99.0, 99.2, T0, "taker", 0.06, 0.3, -1.5)
    fill = paper._fill(*fill_fields)
    assert_same_instance(fill, Fill(*fill_fields))
    order_fields = ("f1", SYM, "stop", "sell", 2.0, 99.0, T0 - MINUTE_MS, "filled", fill, T0, None)
    assert_same_instance(paper._order(*order_fields), Order(*order_fields))
    position_fields = (SYM, -2.0, 101.0, 3.5, 0.25)
    assert_same_instance(paper._position(*position_fields), Position(*position_fields))


def test_the_engine_entry_points_leave_the_state_of_the_checked_ones() -> None:
    """``_market`` / ``_resting`` / ``_on_bar`` (the backtest engine's calls, argument checks skipped) are the
    public calls."""
    public, private = broker(PaperBrokerParams()), broker(PaperBrokerParams())
    public.submit_market("e", SYM, "buy", 2.0, ts_ms=T0, price=100.0)
    public.submit_stop("s", SYM, "sell", 2.0, 99.0, ts_ms=T0)
    public.submit_take_profit("t", SYM, "sell", 2.0, 103.0, ts_ms=T0)
    private._market("e", SYM, "buy", 2.0, T0, 100.0)
    private._resting("s", SYM, "sell", 2.0, 99.0, T0, "stop")
    private._resting("t", SYM, "sell", 2.0, 103.0, T0, "take_profit")
    assert private.to_dict() == public.to_dict()
    # the take-profit fills, the stop is cancelled with the position
    assert private._on_bar(SYM, T0 + MINUTE_MS, 100.0, 103.5, 99.5, 103.0) == public.on_bar(
        SYM, T0 + MINUTE_MS, 100.0, 103.5, 99.5, 103.0
    )
    assert private.to_dict() == public.to_dict() and private.fills() == public.fills()
    assert private.position(SYM).qty == 0.0 and private.get_order("s").cancel_reason == "position_closed"
    assert private._market("e", SYM, "buy", 5.0, T0, 1.0) == public.submit_market("e", SYM, "buy", 5.0, ts_ms=T0)
    with pytest.raises(DataValidationError, match="already names"):
        private._resting("e", SYM, "sell", 1.0, 90.0, T0, "stop")


# ----- accounting -------------------------------------------------------------------------------------
def test_realised_pnl_fees_and_flips_by_hand() -> None:
    b = broker(dataclasses.replace(FREE, taker_fee_bps=10.0))
    b.submit_market("o1", SYM, "buy", 2.0, ts_ms=T0, price=100.0)
    b.submit_market("o2", SYM, "buy", 2.0, ts_ms=T0, price=110.0)
    assert b.position(SYM).avg_entry_price == pytest.approx(105.0)
    b.submit_market("o3", SYM, "sell", 6.0, ts_ms=T0, price=120.0)  # closes 4 (+60) and opens a 2 short
    pos = b.position(SYM)
    assert (pos.qty, pos.avg_entry_price, pos.realised_pnl) == (-2.0, 120.0, pytest.approx(60.0))
    fees = (200 + 220 + 720) * 1e-3
    assert pos.fees_paid == pytest.approx(fees)
    assert b.equity({SYM: 115.0}) == pytest.approx(10_000.0 + 60.0 + 10.0 - fees)
    assert b.apply_funding(SYM, T0 + 8 * 3_600_000, 0.001, 115.0) == pytest.approx(-0.23)  # shorts receive
    assert b.apply_funding(SYM, T0 + 8 * 3_600_000, 0.001, 115.0) == 0.0  # same event: applied once
    s = b.summary({SYM: 115.0})
    assert (s.realised_pnl, s.unrealised_pnl, s.funding_paid) == pytest.approx((60.0, 10.0, -0.23))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("market"), st.sampled_from(["buy", "sell"]), st.floats(0.001, 5.0), st.floats(50.0, 150.0)),
        st.tuples(st.just("book"), st.sampled_from(["buy", "sell"]), st.floats(0.001, 8.0), st.floats(50.0, 150.0)),
        st.tuples(st.just("stop"), st.sampled_from(["buy", "sell"]), st.floats(0.001, 5.0), st.floats(50.0, 150.0)),
        st.tuples(st.just("tp"), st.sampled_from(["buy", "sell"]), st.floats(0.001, 5.0), st.floats(50.0, 150.0)),
        st.tuples(st.just("limit"), st.sampled_from(["buy", "sell"]), st.floats(0.001, 5.0), st.floats(50.0, 150.0)),
        st.tuples(st.just("bar"), st.floats(-0.05, 0.05), st.floats(0.0, 0.05), st.floats(0.0, 0.05)),
        st.tuples(st.just("funding"), st.floats(-0.003, 0.003), st.just(0.0), st.just(0.0)),
    ),
    min_size=1,
    max_size=40,
)


def apply_ops(b: PaperBroker, steps: list, start: int = 0) -> None:
    price = b._marks.get(SYM, 100.0)
    for i, (kind, a, q, p) in enumerate(steps, start=start):
        ts = T0 + i * MINUTE_MS
        if kind == "market":
            b.submit_market(f"m{i}", SYM, a, q, ts_ms=ts, price=p)
            price = p
        elif kind == "book":
            book = OrderBook(((p - 0.5, 1.0), (p - 1.5, 2.0)), ((p + 0.5, 1.0), (p + 1.5, 2.0)))
            b.submit_market(f"k{i}", SYM, a, q, ts_ms=ts, book=book)
            price = p
        elif kind in ("stop", "tp", "limit"):
            submit = {"stop": b.submit_stop, "tp": b.submit_take_profit, "limit": b.submit_limit}[kind]
            submit(f"{kind}{i}", SYM, a, q, p, ts_ms=ts)
        elif kind == "bar":
            close = price * (1.0 + a)
            b.on_bar(SYM, ts, price, max(price, close) * (1 + q), min(price, close) * (1 - p), close)
            price = close
        else:
            b.apply_funding(SYM, ts, a, price)


def check_identities(b: PaperBroker) -> None:
    fills = b.fills()
    s = b.summary() if SYM in b._marks else None
    scale = 1.0 + sum(f.qty * f.price for f in fills)
    assert b._fees_paid == pytest.approx(sum(f.fee for f in fills), abs=1e-9 * scale)
    assert b._realised_pnl == pytest.approx(sum(f.realised_pnl for f in fills), abs=1e-9 * scale)
    assert b._slippage_cost == pytest.approx(sum(f.slippage_cost for f in fills), abs=1e-9 * scale)
    assert all(f.slippage_cost >= -1e-9 * scale for f in fills)  # slippage never helps a taker
    if s is None:
        assert b.cash() == b.initial_cash
        return
    pos = b.position(SYM)
    assert s.equity == pytest.approx(s.cash + pos.qty * b._marks[SYM], abs=1e-9 * scale)
    pnl = s.realised_pnl + s.unrealised_pnl - s.fees_paid - s.funding_paid
    assert s.equity - b.initial_cash == pytest.approx(pnl, abs=1e-7 * scale)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(0, 40))
def test_accounting_identities_and_an_exact_state_round_trip(steps: list, cut: int) -> None:
    params = PaperBrokerParams(limit_fill_probability=0.5, seed=3)
    cut = min(cut, len(steps))
    whole = PaperBroker(10_000.0, params)
    apply_ops(whole, steps)
    check_identities(whole)

    # Persist after `cut` steps (through JSON), restore, finish: the same broker as the uninterrupted run.
    first = PaperBroker(10_000.0, params)
    apply_ops(first, steps[:cut])
    check_identities(first)
    saved = json.dumps(first.to_dict(), allow_nan=False)  # strict JSON: no NaN / inf anywhere
    restored = PaperBroker.from_dict(json.loads(saved))
    assert restored.to_dict() == first.to_dict()
    apply_ops(restored, steps[cut:], start=cut)
    assert restored.to_dict() == whole.to_dict()
    assert restored.fills() == whole.fills()


def test_from_dict_refuses_other_formats_and_malformed_state() -> None:
    with pytest.raises(DataValidationError, match="format"):
        PaperBroker.from_dict({"format": 99})
    data = broker().to_dict()
    del data["cash"]
    with pytest.raises(DataValidationError, match="malformed"):
        PaperBroker.from_dict(data)


# ----- strategy and broker together -------------------------------------------------------------------
def test_strategy_and_paper_broker_on_real_btc_minutes() -> None:
    """Decide at each close, fill at the next open (the backtest's timing); every exit rule ends up used."""
    import numpy as np
    import pandas as pd

    bars = pd.read_parquet(shared_file("binance_spot_btcusdt_1m_20230417-20230517.parquet")).iloc[:6_000]
    ts = (bars["date"].astype("int64") // 1_000_000).to_numpy() if "date" in bars else bars["ts_ms"].to_numpy()
    o, h, lo, c = (bars[k].to_numpy(np.float64) for k in ("open", "high", "low", "close"))
    # A noisy oracle: the next 10 minutes' log return in bps plus noise (enough to trade, not to be right).
    fwd = np.log(np.roll(c, -10) / c) * 1e4
    pred = fwd + np.random.default_rng(5).normal(0, 15, len(c))
    params = StrategyParams(stop_loss_pct=0.3, take_profit_pct=0.6)
    b, state, pending = PaperBroker(params.base_capital), StrategyState(), None
    reasons: set[str] = set()
    for i in range(len(c) - 10):
        if pending is not None:  # the previous close's order fills at this bar's open
            b.submit_market(make_client_order_id(SYM, int(ts[i - 1]), pending[0]), SYM, pending[1], pending[2],
                            ts_ms=int(ts[i]), price=float(o[i]))  # fmt: skip
            pending = None
        b.on_bar(SYM, int(ts[i]), o[i], h[i], lo[i], c[i])
        pos = b.position(SYM)
        d, state = decide(
            state, params, bar_ts_ms=int(ts[i]), now_ms=int(ts[i]) + MINUTE_MS, close=c[i], high=h[i], low=lo[i],
            predicted_return_bps=pred[i], position_qty=pos.qty, entry_price=pos.avg_entry_price, equity=b.equity(),
        )  # fmt: skip
        reasons.add(d.reason)
        if d.action != "hold":
            pending = ("exit" if d.action == "exit" else "entry", d.side, d.qty)
    assert {"signal_long", "signal_short", "stop_loss", "take_profit", "reversal", "cooldown"} <= reasons
    assert len(b.fills()) > 50
    check_identities(b)
