"""The runner's opportunity scorer against the stub exchange: Binance USDⓈ-M perps and Binance spot through ccxt.

The spot legs live on another venue than the perps (``binance`` beside ``binanceusdm``): the scorer must
hold the spot series under that venue and price each leg with its own venue's taker fee, as the batch
simulator does (it looks a fee up by each leg's exchange).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cryptoml.config import OpportunityParams, SimulateParams, SnapshotParams
from cryptoml.edge.scorer import RULE_SOURCE, SPOT_CLIENT_OPTIONS, OpportunityScorer
from cryptoml.errors import ConfigError
from cryptoml.market.exchange import make_exchange
from cryptoml.simulate.entry import break_even_hours, leg_round_trip_cost
from cryptoml.simulate.slippage import fee_frac
from tests.support.stub_exchange import Book, StubExchange

pytestmark = pytest.mark.server

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
NOW_MS = 1_700_006_400_000  # a multiple of 8 h: a settlement and a grid time
RATE = 1e-3  # funding per 8 h: break-even within a day at these fees
FEES = {"binance": 10.0, "binanceusdm": 2.0, "default": 50.0}  # bps; the default would show a wrong lookup
SIM = SimulateParams(hold_hours=(1, 4, 8, 24, 48), taker_fee_bps=FEES)
SNAP = SnapshotParams()
BID, ASK, SIZE = 29_000.0, 29_000.5, 50.0
PERP_ID, OPPORTUNITY = "BTC/USDT:USDT", "spot_perp:BTC:binance-spot:binanceusdm-swap"


def _bars(scale: float) -> pd.DataFrame:
    """80 h of closed 1-minute bars up to NOW_MS, a gentle walk around 29,000."""
    ts = NOW_MS - 80 * HOUR_MS + MINUTE_MS * np.arange(80 * 60)
    close = scale * 29_000.0 * np.exp(np.cumsum(np.random.default_rng(5).normal(0, 2e-4, len(ts))))
    return pd.DataFrame(
        {"ts_ms": ts, "open": close, "high": close * 1.0002, "low": close * 0.9998, "close": close, "volume": 40.0}
    )


@pytest.fixture(scope="module")
def stub() -> Iterator[StubExchange]:
    with StubExchange() as server:
        server.set_candles("BTCUSDT", _bars(1.0))
        server.set_spot_candles("BTCUSDT", _bars(0.9998))
        settlements = NOW_MS - 8 * HOUR_MS * np.arange(15)[::-1] + 5  # Binance stamps a few ms late
        server.set_funding("BTCUSDT", pd.DataFrame({"ts_ms": settlements, "funding_rate": RATE}))
        book = Book([(BID, SIZE)], [(ASK, SIZE)], ts_ms=NOW_MS)
        server.set_book("BTCUSDT", book)
        server.set_spot_book("BTCUSDT", book)
        yield server


def _scorer(stub: StubExchange, sim: SimulateParams = SIM) -> OpportunityScorer:
    perp = make_exchange("binanceusdm", api_url=stub.url, rate_limit_ms=1)
    spot = make_exchange("binance", api_url=stub.url, rate_limit_ms=1, options=SPOT_CLIENT_OPTIONS["binance"])
    return OpportunityScorer(
        exchange="binanceusdm", perp_client=perp, spot_client=spot, bases=["BTC"], quote="USDT",
        snapshot_params=SNAP, opportunity_params=OpportunityParams(), simulate_params=sim,
    )  # fmt: skip


def _grid(scorer: OpportunityScorer) -> Any:
    scorer.refresh(NOW_MS, fresh=True)
    return scorer.on_grid(NOW_MS, None, stale=False)


def test_each_leg_is_held_and_priced_on_its_own_venue(stub: StubExchange) -> None:
    scorer = _scorer(stub)
    result = _grid(scorer)
    # The spot series is held under binance, the perp's under binanceusdm.
    sizes = scorer.market.sizes()
    assert set(sizes) == {"binance BTC/USDT", "binanceusdm BTC/USDT:USDT"}
    assert sizes["binance BTC/USDT"]["bars"] == sizes["binanceusdm BTC/USDT:USDT"]["bars"] > 70 * 60
    (rule,) = [d for d in result.decisions if d.source == RULE_SOURCE]
    assert rule.symbol == OPPORTUNITY and rule.action == "open_arbitrage"
    # Break-even: the batch's helpers with the spot leg at binance's 10 bps and the perp leg at 2 bps.
    spread_pct, depth_usd = (ASK - BID) / ((ASK + BID) / 2) * 100, (BID + ASK) * SIZE
    cost = sum(leg_round_trip_cost([ex], [spread_pct], [depth_usd], SIM)[0] for ex in ("binance", "binanceusdm"))
    expected = float(break_even_hours(cost, RATE)[0])
    assert rule.extra["break_even_hours"] == pytest.approx(expected, rel=1e-12)
    assert rule.extra["hold_hours"] == 24.0  # with both legs at 2 bps it would be 8 h
    # The paper pick's legs carry their venue and its fee (paid at entry and exit).
    (pick,) = result.opened
    assert [(g["exchange"], g["symbol"]) for g in pick.details["legs"]] == [
        ("binance", "BTC/USDT"), ("binanceusdm", PERP_ID),
    ]  # fmt: skip
    (position,) = scorer.positions.values()
    assert [leg["fee"] for leg in position["legs"]] == [fee_frac("binance", SIM), fee_frac("binanceusdm", SIM)]
    assert [leg["fee"] for leg in position["legs"]] == [10e-4, 2e-4]


def test_the_spot_venues_fee_alone_moves_the_break_even(stub: StubExchange) -> None:
    """Changing only binance's fee changes the spot-perp opportunity: its spot leg pays binance's fee."""
    cheap = replace(SIM, taker_fee_bps={**FEES, "binance": 2.0})
    dear, low = (_grid(_scorer(stub, sim)) for sim in (SIM, cheap))
    be = [next(d for d in r.decisions if d.source == RULE_SOURCE).extra["break_even_hours"] for r in (dear, low)]
    assert math.isfinite(be[1]) and be[0] > be[1] * 1.5


def test_a_pick_saved_with_the_spot_leg_on_the_perp_venue_is_moved_to_the_spot_venue(stub: StubExchange) -> None:
    """A state written before the spot legs had their own venue still resumes: its spot leg is read (and
    pays) on binance, and its opportunity is still recognised as held."""
    scorer = _scorer(stub)
    legacy_id = "spot_perp:BTC:binanceusdm-spot:binanceusdm-swap"
    legs = [
        {"side": 1, "exchange": "binanceusdm", "symbol": "BTC/USDT", "perp": False, "fee": 2e-4, "p0": 29_000.0,
         "s0": 1e-5, "qty": 0.3, "funding_usd": 0.0, "settlements": 0},
        {"side": -1, "exchange": "binanceusdm", "symbol": PERP_ID, "perp": True, "fee": 2e-4, "p0": 29_000.0,
         "s0": 1e-5, "qty": 0.3, "funding_usd": 0.0, "settlements": 0},
    ]  # fmt: skip
    saved = {
        "opportunity_id": legacy_id, "entry_ts_ms": NOW_MS - HOUR_MS, "exit_ts_ms": NOW_MS + 23 * HOUR_MS,
        "hold_hours": 24.0, "position_usd": 10_000.0, "funding_counted_to_ms": NOW_MS - HOUR_MS, "legs": legs,
        "scorer": "rule",
    }  # fmt: skip
    scorer.load({"positions": {"rule:old": saved}, "last_grid_ms": NOW_MS - 5 * MINUTE_MS})
    moved = scorer.positions["rule:old"]
    assert moved["opportunity_id"] == OPPORTUNITY
    assert [(leg["exchange"], leg["fee"]) for leg in moved["legs"]] == [("binance", 10e-4), ("binanceusdm", 2e-4)]
    result = _grid(scorer)
    (rule,) = [d for d in result.decisions if d.source == RULE_SOURCE]
    assert rule.action == "skip_arbitrage" and rule.reason.startswith("already holding it")
    with pytest.raises(ConfigError, match="spot_exchange"):
        OpportunityScorer(
            exchange="binanceusdm", perp_client=None, spot_client=None, bases=["BTC"], quote="USDT",
            snapshot_params=SNAP, opportunity_params=OpportunityParams(), simulate_params=SIM, spot_exchange="",
        )  # fmt: skip
