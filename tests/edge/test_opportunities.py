"""Live opportunities against the batch chain: same data fed in time order -> the same fields at each time.

The batch side is the training's own code (``build_snapshots`` / ``snapshots_from_frames`` then
``detect_opportunities``); the live side feeds the same bars (at their close), funding (at its settlement
minute) and books (at their time) into a :class:`LiveMarket` and calls :func:`detect_live` at snapshot
times. Two markets: the embedded synthetic one (5 days, 2 exchanges x BTC/ETH, written to a store and read
back as the pipeline does) and the simulate tests' small market with its edge cases (funding stamped 17 ms
late, one exchange without books, a 2-hour hole in a perp's candles).
"""

from __future__ import annotations

import json
import math
import numbers
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ccxt
import numpy as np
import pandas as pd
import pytest

import cryptoml.edge.opportunities as live
import cryptoml.simulate.opportunities as batch_opps
import cryptoml.simulate.snapshots as batch_snaps
from cryptoml.config import OpportunityParams, SimulateParams, SnapshotParams, SyntheticParams
from cryptoml.edge.opportunities import (
    LiveMarket,
    advance_paper_position,
    detect_live,
    fetch_into,
    live_snapshots,
    open_paper_position,
    rule_rank,
    rule_score,
)
from cryptoml.errors import ConfigError, DataValidationError, SourceError
from cryptoml.features.opportunity import INPUT_COLUMNS, feature_matrix
from cryptoml.market.exchange import make_exchange
from cryptoml.market.store import ParquetStore
from cryptoml.market.synthetic import write_market
from cryptoml.models.evaluation import top_k_picks
from cryptoml.simulate.entry import break_even_hours, leg_round_trip_cost
from cryptoml.simulate.opportunities import detect_opportunities
from cryptoml.simulate.positions import FundingEvents, PricePaths, build_funding_events, build_price_paths
from cryptoml.simulate.reference import simulate_one
from cryptoml.simulate.snapshots import (
    SNAPSHOT_COLUMNS,
    MarketFrames,
    build_snapshots,
    load_market_frames,
    snapshots_from_frames,
)
from tests.simulate.conftest import GAP_START_MS, make_frames
from tests.support.stub_exchange import Book, StubExchange

ROOT = Path(__file__).resolve().parents[2]
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
QUOTE = "USDT"
BASES = ("BTC", "ETH")
SYNTHETIC = replace(SyntheticParams(), days=5, bases=BASES, exchanges=("binance", "bybit"))
SNAP = SnapshotParams()
SIM = SimulateParams(hold_hours=(1, 4, 8, 24, 48))
# Every candidate (thresholds off), both spot-perp directions; and the defaults (thresholds on).
LOOSE = OpportunityParams(
    allow_short_spot=True, min_fund_apr_pct=-1e9, min_volume_24h_usd=0, max_bid_ask_spread_pct=1e9, min_depth_usd=0
)
DEFAULT = OpportunityParams()
TOL = 1e-9
# (time the item becomes known, tie order, kind, exchange, symbol, payload)
Event = tuple[int, int, str, str, str, tuple[Any, ...]]


# --- markets and their batch answers -------------------------------------------------------------------


@dataclass(frozen=True)
class Market:
    """A market's frames, its batch snapshots and opportunities, and the times to check."""

    frames: MarketFrames
    exchanges: tuple[str, ...]
    snapshots: pd.DataFrame
    opportunities: dict[str, pd.DataFrame]  # per params name
    check_times: tuple[int, ...]
    events: list[Event]


def _batch(snaps: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {name: detect_opportunities(snaps, p, SIM) for name, p in (("loose", LOOSE), ("default", DEFAULT))}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Market:
    store = ParquetStore(tmp_path_factory.mktemp("raw"))
    write_market(SYNTHETIC, store)
    exchanges = SYNTHETIC.exchanges
    snaps = build_snapshots(store, list(exchanges), list(BASES), QUOTE, SNAP)
    frames = load_market_frames(store, exchanges, BASES, QUOTE)
    start = int(snaps["ts_ms"].min()) - int(snaps["ts_ms"].min()) % DAY_MS
    times = (
        start + 6 * HOUR_MS,  # warm-up: the regime's return is from the first close, short 24 h windows
        start + DAY_MS + 8 * HOUR_MS,  # exactly on a settlement
        start + 2 * DAY_MS + 3 * HOUR_MS + 5 * MINUTE_MS,
        start + 3 * DAY_MS + 16 * HOUR_MS,  # settlement; full 3 d windows
        start + 4 * DAY_MS + 2 * HOUR_MS + 35 * MINUTE_MS,  # buffers pruned by now
        start + 5 * DAY_MS - 5 * MINUTE_MS,
    )
    return Market(frames, exchanges, snaps, _batch(snaps), times, events(frames))


@pytest.fixture(scope="module")
def gappy() -> Market:
    frames = make_frames()
    exchanges = ("binance", "bybit")
    snaps = snapshots_from_frames(frames, exchanges, BASES, QUOTE, SNAP)
    start = int(snaps["ts_ms"].min()) - int(snaps["ts_ms"].min()) % DAY_MS
    times = (
        start + 16 * HOUR_MS,  # binance funding stamped 16:00:00.017 counts at 16:00 (rounded, as the batch)
        GAP_START_MS + 30 * MINUTE_MS,  # bybit ETH perp stale: no row, so no cross ETH pair
        GAP_START_MS + 3 * HOUR_MS,  # after the hole: the CV windows skip the missing rows
        start + 3 * DAY_MS + 20 * HOUR_MS + 55 * MINUTE_MS,
    )
    return Market(frames, exchanges, snaps, _batch(snaps), times, events(frames))


@pytest.fixture(params=["synthetic", "gappy"])
def market_case(request: pytest.FixtureRequest) -> Market:
    return request.getfixturevalue(request.param)


def events(frames: MarketFrames) -> list[Event]:
    """Every item as (time it becomes known, tie order, kind, exchange, symbol, payload), time-sorted."""
    out: list[Event] = []
    for (ex, sym), df in frames.ohlcv.items():
        cols = [df[c].to_numpy() for c in ("ts_ms", "open", "high", "low", "close", "volume")]
        for ts, o, h, lo, c, v in zip(*cols, strict=True):
            out.append((int(ts) + frames.bar_ms, 0, "bar", ex, sym, (int(ts), o, h, lo, c, v)))
    for (ex, sym), df in frames.funding.items():
        for ts, rate in zip(df["ts_ms"].to_numpy(), df["funding_rate"].to_numpy(), strict=True):
            known = (int(ts) + MINUTE_MS // 2) // MINUTE_MS * MINUTE_MS  # the batch's settlement minute
            out.append((known, 1, "funding", ex, sym, (int(ts), float(rate))))
    for (ex, sym), df in frames.books.items():
        df = df.sort_values(["ts_ms", "side", "level"], kind="stable")
        ts_all = df["ts_ms"].to_numpy()
        starts = np.flatnonzero(np.r_[True, ts_all[1:] != ts_all[:-1]])
        ends = np.r_[starts[1:], len(df)]
        side, price, size = df["side"].to_numpy(), df["price"].to_numpy(), df["size"].to_numpy()
        for a, b in zip(starts, ends, strict=True):
            bids = [[price[i], size[i]] for i in range(a, b) if side[i] == "bid"]
            asks = [[price[i], size[i]] for i in range(a, b) if side[i] == "ask"]
            out.append((int(ts_all[a]), 2, "book", ex, sym, (int(ts_all[a]), bids, asks)))
    out.sort(key=lambda e: (e[0], e[1]))
    return out


class Feeder:
    """Feeds a LiveMarket in time order, as the runner would."""

    def __init__(self, items: list[Event], market: LiveMarket | None = None) -> None:
        self.events = items
        self.market = market or LiveMarket()
        self.i = 0

    def until(self, t_ms: int) -> LiveMarket:
        m = self.market
        while self.i < len(self.events) and self.events[self.i][0] <= t_ms:
            _, _, kind, ex, sym, payload = self.events[self.i]
            if kind == "bar":
                m.add_bar(sym, *payload, exchange=ex)
            elif kind == "funding":
                m.add_funding(sym, *payload, exchange=ex)
            else:
                m.set_book(sym, *payload, exchange=ex)
            self.i += 1
        return m


def assert_same(live_row: Mapping[str, Any], batch_row: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    for k in keys:
        a, b = live_row[k], batch_row[k]
        if isinstance(b, str | bool | np.bool_) or b is None:
            assert a == b and type(a) is not np.bool_, f"{where} {k}: live {a!r} != batch {b!r}"
        elif isinstance(b, numbers.Integral):
            assert isinstance(a, int) and a == int(b), f"{where} {k}: live {a!r} != batch {b!r}"
        else:
            a_f, b_f = float(a), float(b)
            if math.isnan(b_f):
                assert math.isnan(a_f), f"{where} {k}: live {a!r}, batch NaN"
            else:
                assert abs(a_f - b_f) <= TOL * max(1.0, abs(b_f)), f"{where} {k}: live {a!r} != batch {b!r}"


def check_at(m: Market, market: LiveMarket, t: int, seen: set[str] | None = None) -> None:
    """live_snapshots and detect_live at t equal the batch rows at t (every field, both param sets)."""
    snaps = live_snapshots(market, t, m.exchanges, BASES, QUOTE, SNAP)
    expected = m.snapshots[m.snapshots["ts_ms"] == t].to_dict(orient="records")
    assert len(expected) > 0, f"no batch snapshot row at {t}"
    assert [(s["exchange"], s["base"]) for s in snaps] == [(r["exchange"], r["base"]) for r in expected]
    for s, r in zip(snaps, expected, strict=True):
        assert list(s) == SNAPSHOT_COLUMNS
        assert_same(s, r, SNAPSHOT_COLUMNS, f"snapshot {s['exchange']} {s['base']} at {t}")
    for name, params in (("loose", LOOSE), ("default", DEFAULT)):
        got = detect_live(market, t, m.exchanges, BASES, QUOTE, SNAP, params, SIM)
        want = m.opportunities[name][m.opportunities[name]["ts_ms"] == t].to_dict(orient="records")
        assert [o["opportunity_id"] for o in got] == [r["opportunity_id"] for r in want], f"{name} at {t}"
        for o, r in zip(got, want, strict=True):
            assert tuple(o) == live.LIVE_OPPORTUNITY_KEYS
            assert_same(o, r, batch_opps.OPPORTUNITY_COLUMNS, f"{name} {o['opportunity_id']} at {t}")
            if seen is not None:
                seen.add(f"{name}:{o['strategy']}:{o['direction'] if o['strategy'] == 'spot_perp' else ''}")


# --- the batch equality --------------------------------------------------------------------------------


def test_constants_mirror_the_batch() -> None:
    for name in (
        "MAX_BAR_AGE_MINUTES",
        "BOOK_DEPTH_LEVELS",
        "PROXY_SPREAD_VOL_MULT",
        "FUNDING_MAX_AGE_INTERVALS",
        "DEFAULT_FUNDING_INTERVAL_HOURS",
    ):
        assert getattr(live, name) == getattr(batch_snaps, name), name
    for name in ("BREAK_EVEN_CAP_HOURS", "CV_CAP", "CV_EPS", "CV_WINDOW_MS", "REFERENCE_INTERVAL_HOURS"):
        assert getattr(live, name) == getattr(batch_opps, name), name
    assert set(live.LIVE_OPPORTUNITY_KEYS) == {*batch_opps.OPPORTUNITY_COLUMNS, "direction"}
    assert set(INPUT_COLUMNS) - {"hold_hours"} <= set(live.LIVE_OPPORTUNITY_KEYS)


def test_live_equals_batch_fed_in_time_order(market_case: Market) -> None:
    m = market_case
    feeder = Feeder(m.events)
    seen: set[str] = set()
    for t in m.check_times:
        check_at(m, feeder.until(t), t, seen)
    # Both strategies and both spot-perp directions were compared, and the default thresholds kept some.
    assert {"loose:spot_perp:long_spot_short_perp", "loose:spot_perp:long_perp_short_spot"} <= seen
    assert "loose:cross_exchange:" in seen
    assert any(s.startswith("default:") for s in seen)


def test_buffers_stay_bounded(synthetic: Market) -> None:
    market = Feeder(synthetic.events).until(10**15)
    for name, size in market.sizes().items():
        assert size["bars"] <= live.DEFAULT_BAR_RETENTION_MS // MINUTE_MS + live.PRUNE_SLACK, name
        assert size["funding"] <= live.DEFAULT_FUNDING_RETENTION_MS // (8 * HOUR_MS) + 1, name
        assert size["books"] <= live.DEFAULT_BOOK_RETENTION_MS // (15 * MINUTE_MS) + 1, name
    # 5 days were fed: the oldest bars are gone
    assert market.sizes()["binance BTC/USDT:USDT"]["bars"] < 5 * 1440


def test_no_look_ahead(synthetic: Market) -> None:
    """Data after now_ms (an hour of real data, then wild values) changes nothing at now_ms."""
    t = synthetic.check_times[3]
    exact = Feeder(synthetic.events).until(t)
    expected = detect_live(exact, t, synthetic.exchanges, BASES, QUOTE, SNAP, LOOSE, SIM)
    market = Feeder(synthetic.events).until(t + HOUR_MS)
    for ex in synthetic.exchanges:
        for base in BASES:
            for sym in (f"{base}/{QUOTE}", f"{base}/{QUOTE}:{QUOTE}"):
                market.add_bar(sym, t, 1.0, 1e9, 1.0, 1e6, 1e9, exchange=ex)  # closes at t + 1 min
                assert market.set_book(sym, t + 1, [[5.0, 1e9]], [[6.0, 1e9]], exchange=ex)
                if ":" in sym:
                    market.add_funding(sym, t + MINUTE_MS, 0.05, exchange=ex)
    got = detect_live(market, t, synthetic.exchanges, BASES, QUOTE, SNAP, LOOSE, SIM)
    assert got == expected
    check_at(synthetic, market, t)
    # ... while one minute later (the wild bar closed, the wild rate settled) it is used
    later = detect_live(market, t + MINUTE_MS, synthetic.exchanges, BASES, QUOTE, SNAP, LOOSE, SIM)
    spot_perp = [o for o in later if o["strategy"] == "spot_perp"]
    assert spot_perp and all(o["short_price"] == 1e6 and o["funding_rate_short"] == 0.05 for o in spot_perp)


def test_off_grid_now_and_model_inputs(synthetic: Market) -> None:
    """At a time off the 5-minute grid the rows are still complete and feed the opportunity features."""
    t = synthetic.check_times[4] + 2 * MINUTE_MS + 17_000
    market = Feeder(synthetic.events).until(t)
    rows = detect_live(market, t, list(synthetic.exchanges), BASES, QUOTE, SNAP, LOOSE, SIM)
    assert rows and all(r["ts_ms"] == t for r in rows)
    cols = {c: np.asarray([r[c] for r in rows for _ in SIM.hold_hours]) for c in INPUT_COLUMNS if c != "hold_hours"}
    cols["hold_hours"] = np.asarray([h for _ in rows for h in SIM.hold_hours], dtype=np.float64)
    assert np.isfinite(feature_matrix(cols)).all()
    json.dumps(rows)  # plain Python values: loggable as they are


def test_single_exchange_gives_spot_perp_only(synthetic: Market) -> None:
    t = synthetic.check_times[2]
    market = Feeder(synthetic.events).until(t)
    rows = detect_live(market, t, "bybit", BASES, QUOTE, SNAP, LOOSE, SIM)
    assert {r["strategy"] for r in rows} == {"spot_perp"} and {r["long_exchange"] for r in rows} == {"bybit"}
    # The regime now comes from bybit's BTC perp (the first exchange given), as the batch would do.
    snaps = snapshots_from_frames(synthetic.frames, ["bybit"], BASES, QUOTE, SNAP, end_ms=t)
    want = detect_opportunities(snaps, LOOSE, SIM)
    want = want[want["ts_ms"] == t].to_dict(orient="records")
    assert len(want) == len(rows) == 2
    for o, r in zip(rows, want, strict=True):
        assert_same(o, r, batch_opps.OPPORTUNITY_COLUMNS, o["opportunity_id"])


# --- following picks on paper ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["synthetic", "gappy"])
def test_paper_positions_earn_what_the_simulator_says(case: str, request: pytest.FixtureRequest) -> None:
    """Picks followed live on the 5-minute grid end with the reference simulator's profit, funding, fees
    and slippage (mark = the perp's close at the settlement on both sides: the frames' marks dropped)."""
    m: Market = request.getfixturevalue(case)
    frames = replace(
        m.frames, funding={k: v.drop(columns="mark_price", errors="ignore") for k, v in m.frames.funding.items()}
    )
    prices = build_price_paths(frames, m.snapshots)
    funding = build_funding_events(frames, prices)
    t0 = m.check_times[0] + (5 * MINUTE_MS if case == "synthetic" else 0)
    feeder = Feeder(m.events)
    market = feeder.until(t0)
    opps = detect_live(market, t0, list(m.exchanges), BASES, QUOTE, SNAP, LOOSE, SIM)
    picks = [o for o in opps if o["strategy"] == "spot_perp"][:2] + [o for o in opps if o["strategy"] != "spot_perp"][
        :2
    ]
    positions = []
    for o in picks:
        for hold in (1, 8, 24):
            pos = open_paper_position(market, o, hold, SNAP, SIM)
            assert pos is not None and pos["exit_ts_ms"] == t0 + hold * HOUR_MS
            positions.append((o, hold, pos))
    outcomes: dict[int, dict[str, Any]] = {}
    t = t0
    while len(outcomes) < len(positions):
        t += 5 * MINUTE_MS
        market = feeder.until(t)
        for k, (o, hold, pos) in enumerate(positions):
            if k in outcomes:
                continue
            pos, outcome = advance_paper_position(market, pos, t, SNAP, SIM)
            positions[k] = (o, hold, pos)
            if outcome is not None:
                assert t == pos["exit_ts_ms"]
                outcomes[k] = outcome
    for k, (o, hold, _) in enumerate(positions):
        ref = simulate_one(o, hold, prices, funding, SIM)
        got = outcomes[k]
        where = f"{o['opportunity_id']} {hold} h"
        if ref["status"] != "ok":
            assert got["status"] == "dropped", where
            continue
        assert got["status"] == "closed", where
        for ours, theirs in (
            ("realised_profit_pct", "actual_profit_pct"), ("realised_profit_usd", "actual_profit_usd"),
            ("funding_usd", "total_funding_usd"), ("fees_usd", "fees_usd"), ("slippage_pct", "slippage_pct"),
            ("funding_payments_count", "funding_payments_count"),
        ):  # fmt: skip
            assert got[ours] == pytest.approx(ref[theirs], rel=TOL, abs=TOL), f"{where}: {ours}"
    assert sum(1 for g in outcomes.values() if g["funding_payments_count"] > 0) >= 2


# --- a spot venue apart from the perps' (Binance USDⓈ-M perps, Binance spot) ---------------------------

# Fees far apart, and a default no venue here uses: a leg priced with another venue's fee shows.
SPLIT_FEES = replace(SIM, taker_fee_bps={"binance": 10.0, "binanceusdm": 2.0, "bybit": 5.5, "default": 50.0})
SPLIT = {"binanceusdm": "binance"}  # perp exchange -> the venue of its spot legs


def _perp_venue(exchange: str, symbol: str) -> str:
    """The synthetic binance perps played by a derivatives-only venue, binanceusdm; spot stays on binance."""
    return "binanceusdm" if exchange == "binance" and ":" in symbol else exchange


def _expected_split_row(row: Mapping[str, Any], snaps: pd.DataFrame) -> dict[str, Any]:
    """A batch row (one label per exchange) as the split venues make it: perp legs on binanceusdm, and the
    break-even from the batch's own helpers with each leg's spread, depth and venue fee (SPLIT_FEES)."""
    out = dict(row)
    cost = 0.0
    for side in ("long", "short"):
        market, ex = row[f"{side}_market"], row[f"{side}_exchange"]
        out[f"{side}_exchange"] = _perp_venue(ex, row[f"{side}_symbol"])
        snap = snaps[(snaps["ts_ms"] == row["ts_ms"]) & (snaps["exchange"] == ex) & (snaps["base"] == row["base"])]
        prefix = "spot_" if market == "spot" else ""
        spread, depth = snap[f"{prefix}bid_ask_spread_pct"].iloc[0], snap[f"{prefix}orderbook_depth_usd"].iloc[0]
        cost += float(leg_round_trip_cost([out[f"{side}_exchange"]], [spread], [depth], SPLIT_FEES)[0])
    out["break_even_hours"] = float(break_even_hours(cost, row["funding_spread"])[0])
    out["opportunity_id"] = (
        f"{row['strategy']}:{row['base']}:{out['long_exchange']}-{row['long_market']}:"
        f"{out['short_exchange']}-{row['short_market']}"
    )
    return out


def test_a_spot_leg_on_its_own_venue_pays_that_venues_fee_as_the_batch_prices_it(synthetic: Market) -> None:
    """binanceusdm perps with binance spot (the live scorer's layout): the spot leg names binance and pays
    binance's fee in the break-even and on paper; every other field is the batch row's, and the picks
    followed on paper end with the batch reference simulator's profit and fees for those rows."""
    split_events = [(t, o, k, _perp_venue(ex, sym), sym, pl) for t, o, k, ex, sym, pl in synthetic.events]
    exchanges = ["binanceusdm", "bybit"]
    feeder = Feeder(split_events)
    t0 = synthetic.check_times[2]
    market = feeder.until(t0)
    got = detect_live(market, t0, exchanges, BASES, QUOTE, SNAP, LOOSE, SPLIT_FEES, spot_exchanges=SPLIT)
    batch = synthetic.opportunities["loose"]
    want = {
        r["opportunity_id"]: r
        for r in (_expected_split_row(r, synthetic.snapshots) for r in batch[batch["ts_ms"] == t0].to_dict("records"))
    }
    assert sorted(o["opportunity_id"] for o in got) == sorted(want)
    spot_perp = [o for o in got if o["strategy"] == "spot_perp" and "binanceusdm" in o["opportunity_id"]]
    assert {o["opportunity_id"] for o in spot_perp} == {
        "spot_perp:BTC:binance-spot:binanceusdm-swap", "spot_perp:ETH:binance-spot:binanceusdm-swap",
    }  # fmt: skip
    for o in got:
        assert_same(o, want[o["opportunity_id"]], batch_opps.OPPORTUNITY_COLUMNS, o["opportunity_id"])
    # The same market and venue-blind fees, i.e. the spot leg priced with the perp venue's fee: other numbers.
    blind = replace(SPLIT_FEES, taker_fee_bps={**SPLIT_FEES.taker_fee_bps, "binance": 2.0})
    again = detect_live(market, t0, exchanges, BASES, QUOTE, SNAP, LOOSE, blind, spot_exchanges=SPLIT)
    by_id = {o["opportunity_id"]: o for o in again}
    assert all(by_id[o["opportunity_id"]]["break_even_hours"] < o["break_even_hours"] for o in spot_perp)

    # On paper: each leg carries its venue's fee, and the outcome is the batch simulator's for the row.
    frames = replace(
        synthetic.frames,
        funding={k: v.drop(columns="mark_price", errors="ignore") for k, v in synthetic.frames.funding.items()},
    )
    prices = build_price_paths(frames, synthetic.snapshots)
    funding = build_funding_events(frames, prices)
    prices = PricePaths({(_perp_venue(*k), k[1]): v for k, v in prices.series.items()})
    funding = FundingEvents({(_perp_venue(*k), k[1]): v for k, v in funding.series.items()})
    positions = []
    for o in spot_perp:
        for hold in (1, 8):
            pos = open_paper_position(market, o, hold, SNAP, SPLIT_FEES)
            assert pos is not None
            assert [(leg["exchange"], leg["fee"]) for leg in pos["legs"]] == [("binance", 10e-4), ("binanceusdm", 2e-4)]
            positions.append((o, hold, pos))
    outcomes: dict[int, dict[str, Any]] = {}
    t = t0
    while len(outcomes) < len(positions):
        t += 5 * MINUTE_MS
        market = feeder.until(t)
        for k, (o, hold, pos) in enumerate(positions):
            if k not in outcomes:
                pos, outcome = advance_paper_position(market, pos, t, SNAP, SPLIT_FEES)
                positions[k] = (o, hold, pos)
                if outcome is not None:
                    outcomes[k] = outcome
    for k, (o, hold, _) in enumerate(positions):
        ref = simulate_one(o, hold, prices, funding, SPLIT_FEES)
        where = f"{o['opportunity_id']} {hold} h"
        assert ref["status"] == "ok" and outcomes[k]["status"] == "closed", where
        for ours, theirs in (("realised_profit_usd", "actual_profit_usd"), ("fees_usd", "fees_usd"),
                             ("funding_usd", "total_funding_usd"), ("slippage_pct", "slippage_pct")):  # fmt: skip
            assert outcomes[k][ours] == pytest.approx(ref[theirs], rel=TOL, abs=TOL), f"{where}: {ours}"


def test_spot_exchanges_must_name_a_venue(synthetic: Market) -> None:
    market = Feeder(synthetic.events).until(synthetic.check_times[2])
    with pytest.raises(ConfigError, match=r"spot_exchanges\['binance'\] must be an exchange id"):
        detect_live(market, synthetic.check_times[2], "binance", BASES, QUOTE, SNAP, LOOSE, SIM,
                    spot_exchanges={"binance": ""})  # fmt: skip


# --- errors --------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(synthetic: Market) -> None:
    m = LiveMarket()
    with pytest.raises(ConfigError, match="no default exchange"):
        m.add_bar("BTC/USDT", 0, 1, 1, 1, 1, 1)
    m = LiveMarket("binance")
    with pytest.raises(DataValidationError, match="integer epoch ms"):
        m.add_bar("BTC/USDT", "yesterday", 1, 1, 1, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(DataValidationError, match="close: expected a number"):
        m.add_bar("BTC/USDT", 0, 1, 1, 1, "x", 1)  # type: ignore[arg-type]
    with pytest.raises(DataValidationError, match="unified symbol"):
        m.add_funding("BTCUSDT", 0, 1e-4)
    with pytest.raises(DataValidationError, match="price, size"):
        m.set_book("BTC/USDT", 0, [7.0], [[8.0, 1.0]])
    assert not m.set_book("BTC/USDT", 0, [[9.0, 1.0]], [[8.0, 1.0]])  # crossed: unusable, not stored
    assert not m.set_book("BTC/USDT", 0, [], [[8.0, 1.0]])
    assert m.sizes() == {}
    m.add_bar("ETH/USDT:USDT", 0, 1, 1, 1, 1, 1)
    m.add_funding("ETH/USDT:USDT", 0, 1e-4)
    with pytest.raises(DataValidationError, match="no BTC candles"):
        detect_live(m, MINUTE_MS, "binance", ["ETH"], QUOTE, SNAP, LOOSE, SIM)
    with pytest.raises(ConfigError, match="regime lookback"):
        detect_live(m, MINUTE_MS, "binance", ["ETH"], QUOTE, replace(SNAP, regime_lookback_hours=100), LOOSE, SIM)
    with pytest.raises(ConfigError, match="exchange id"):
        detect_live(m, MINUTE_MS, [], ["ETH"], QUOTE, SNAP, LOOSE, SIM)
    with pytest.raises(ConfigError, match="positive integer"):
        LiveMarket(bar_retention_ms=0)


# --- the rule scorer -----------------------------------------------------------------------------------


def test_rule_rank_matches_the_batch_rule(synthetic: Market) -> None:
    """Per day, the rule's top-k picks of the training evaluation are rule_rank's first k, in order."""
    table = synthetic.opportunities["loose"].assign(hold_hours=8.0)
    top_k = 7
    picks = top_k_picks(table, [table["fund_apr"].to_numpy(), -table["break_even_hours"].to_numpy()], top_k)
    rows = table.to_dict(orient="records")
    day = table["ts_ms"].to_numpy() // DAY_MS
    mine: list[int] = []
    for d in np.unique(day):
        idx = np.flatnonzero(day == d)
        mine += [int(idx[i]) for i in rule_rank([rows[i] for i in idx])[:top_k]]
    # Compare the keys (exact ties are broken at random by the batch, in input order here).
    keys = table[["fund_apr", "break_even_hours"]].to_numpy()
    assert len(mine) == len(picks) and np.array_equal(keys[mine], keys[picks])
    # rule_score's rank_key orders like rule_rank
    some = rows[:200]
    by_key = sorted(range(len(some)), key=lambda i: rule_score(some[i], LOOSE)["rank_key"], reverse=True)
    assert [some[i]["fund_apr"] for i in by_key] == [some[i]["fund_apr"] for i in rule_rank(some)]


def test_rule_score_decisions(synthetic: Market) -> None:
    grid = SIM.hold_hours
    for row in synthetic.opportunities["default"].to_dict(orient="records"):
        out = rule_score(row, DEFAULT, hold_grid_hours=grid)
        assert out["scorer"] == "rule" and out["score"] == row["fund_apr"]
        if row["break_even_hours"] <= max(grid):  # detected rows pass the thresholds already
            assert out["decision"] == "open"
            assert out["hold_hours"] == min(h for h in grid if h >= row["break_even_hours"])
        else:
            assert out["decision"] == "skip" and "break-even" in out["reason"] and out["hold_hours"] is None
    base = {"fund_apr": 12.0, "break_even_hours": 5.0, "volume_24h": 5e6, "bid_ask_spread_pct": 0.02}
    base["orderbook_depth_usd"] = 80_000.0
    assert rule_score(base, DEFAULT, hold_grid_hours=grid) | {"reason": ""} == {
        "scorer": "rule", "decision": "open", "score": 12.0, "rank_key": (12.0, -5.0), "hold_hours": 8.0, "reason": "",
    }  # fmt: skip
    for change, word in (
        ({"fund_apr": 4.0}, "fund_apr"),
        ({"break_even_hours": 49.0}, "break-even"),
        ({"volume_24h": 1e5}, "volume"),
        ({"bid_ask_spread_pct": 0.9}, "spread"),
        ({"orderbook_depth_usd": 500.0}, "depth"),
        ({"fund_apr": None}, "fund_apr"),
    ):
        out = rule_score({**base, **change}, DEFAULT, hold_grid_hours=grid)
        assert out["decision"] == "skip" and word in out["reason"], (change, out)
    with pytest.raises(DataValidationError, match="volume_24h"):
        rule_score({k: v for k, v in base.items() if k != "volume_24h"}, DEFAULT)


# --- ccxt ---------------------------------------------------------------------------------------------


@pytest.fixture()
def stub() -> Iterator[StubExchange]:
    with StubExchange() as s:
        yield s


def _serve(stub: StubExchange, frames: MarketFrames, now: int) -> None:
    """The binance perps as the exchange would show them at now: candles up to the open one, books, funding."""
    for base in BASES:
        sym, sid = f"{base}/{QUOTE}:{QUOTE}", f"{base}{QUOTE}"
        bars = frames.ohlcv[("binance", sym)]
        stub.set_candles(sid, bars[bars["ts_ms"] <= now])  # the last one is still open
        fund = frames.funding[("binance", sym)]
        stub.set_funding(sid, fund[fund["ts_ms"] <= now])
        book = frames.books[("binance", sym)]
        book = book[book["ts_ms"] == book.loc[book["ts_ms"] <= now, "ts_ms"].max()].sort_values("level")
        side = book["side"].to_numpy()
        levels = list(zip(book["price"], book["size"], strict=True))
        stub.set_book(
            sid,
            Book(
                bids=[lv for lv, s in zip(levels, side, strict=True) if s == "bid"],
                asks=[lv for lv, s in zip(levels, side, strict=True) if s == "ask"],
                ts_ms=int(book["ts_ms"].iloc[0]),
            ),
        )


@pytest.mark.server
def test_fetch_into_fills_the_market_from_binance_json(stub: StubExchange, synthetic: Market) -> None:
    """Perps from the stub (Binance USDⓈ-M JSON through ccxt), spot fed directly: the batch rows come out."""
    frames = synthetic.frames
    t = synthetic.check_times[4]
    spot_only = MarketFrames(
        ohlcv={k: v for k, v in frames.ohlcv.items() if k[0] == "binance" and ":" not in k[1]},
        books={k: v for k, v in frames.books.items() if k[0] == "binance" and ":" not in k[1]},
    )
    market = Feeder(events(spot_only), LiveMarket("binance")).until(t)
    _serve(stub, frames, t)
    client = make_exchange("binanceusdm", api_url=stub.url, rate_limit_ms=1)
    try:
        perps = [f"{b}/{QUOTE}:{QUOTE}" for b in BASES]
        summary = fetch_into(market, client, perps, t, exchange="binance")
        bars = live.DEFAULT_BAR_RETENTION_MS // MINUTE_MS
        settlements = len([s for s in frames.funding[("binance", perps[0])]["ts_ms"] if t - 4 * DAY_MS <= s <= t])
        assert summary == {p: {"bars": bars, "funding": settlements, "books": 1} for p in perps}
        assert stub.unknown_paths == []

        got = detect_live(market, t, "binance", BASES, QUOTE, SNAP, LOOSE, SIM)
        want = synthetic.opportunities["loose"]
        want = want[(want["ts_ms"] == t) & (want["strategy"] == "spot_perp") & (want["long_exchange"] == "binance")]
        assert [o["opportunity_id"] for o in got] == list(want["opportunity_id"]) and len(got) == 2
        for o, r in zip(got, want.to_dict(orient="records"), strict=True):
            assert_same(o, r, batch_opps.OPPORTUNITY_COLUMNS, o["opportunity_id"])

        # Five minutes later only the new closed bars are asked for.
        later = t + 5 * MINUTE_MS
        _serve(stub, frames, later)
        stub.reset_counts()
        summary = fetch_into(market, client, perps, later, exchange="binance")
        assert [s["bars"] for s in summary.values()] == [5, 5]
        assert stub.count("/fapi/v1/klines") == 2
        assert market.last_bar_ts_ms(perps[0]) == later - MINUTE_MS

        # A transport fault is left to the caller's retry; an unlisted symbol is a SourceError.
        stub.faults.add("/fapi/v1/depth", "503", times=1)
        with pytest.raises(ccxt.NetworkError):
            fetch_into(market, client, perps[:1], later, exchange="binance")
        with pytest.raises(SourceError, match="XRP/USDT:USDT"):
            fetch_into(market, client, ["XRP/USDT:USDT"], later)
    finally:
        client.close()


# --- footprint -----------------------------------------------------------------------------------------


def test_module_imports_no_pandas() -> None:
    code = (
        "import sys, json\n"
        "import cryptoml.edge.opportunities\n"
        "print(json.dumps(sorted(m for m in ('pandas', 'pyarrow', 'ccxt', 'prefect', 'mlflow') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
