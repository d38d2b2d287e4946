"""Snapshots: values recomputed by hand, no look-ahead, the store path, and clear errors on bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cryptoml.config import SnapshotParams
from cryptoml.errors import DataValidationError
from cryptoml.market.store import DatasetKey, ParquetStore
from cryptoml.simulate.snapshots import (
    BOOK_DEPTH_LEVELS,
    PROXY_SPREAD_VOL_MULT,
    SNAPSHOT_COLUMNS,
    MarketFrames,
    build_snapshots,
    snapshots_from_frames,
)
from tests.simulate.conftest import (
    BASES,
    EXCHANGES,
    GAP_END_MS,
    GAP_START_MS,
    HOUR_MS,
    MINUTE_MS,
    QUOTE,
    START_MS,
)

DAY_MS = 86_400_000


def _row(snaps: pd.DataFrame, ts: int, exchange: str, base: str) -> pd.Series:
    rows = snaps[(snaps["ts_ms"] == ts) & (snaps["exchange"] == exchange) & (snaps["base"] == base)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_layout_and_grid(snapshots: pd.DataFrame) -> None:
    assert list(snapshots.columns) == SNAPSHOT_COLUMNS
    assert (snapshots["ts_ms"] % (5 * MINUTE_MS) == 0).all()
    assert not snapshots.duplicated(["ts_ms", "exchange", "base"]).any()
    assert set(snapshots["regime"]) <= {"Bull", "Bear", "Ranging"}
    for col in ("perp_price", "funding_rate", "volume_24h_usd", "bid_ask_spread_pct", "orderbook_depth_usd"):
        assert snapshots[col].notna().all(), col
    assert snapshots["depth_is_proxy"].dtype == bool


def test_values_recomputed_by_hand(frames: MarketFrames, snapshots: pd.DataFrame) -> None:
    ts = START_MS + 2 * DAY_MS + 7 * HOUR_MS + 35 * MINUTE_MS
    perp_key = ("binance", "BTC/USDT:USDT")
    row = _row(snapshots, ts, "binance", "BTC")
    bars = frames.ohlcv[perp_key]
    closed = bars[bars["ts_ms"] + MINUTE_MS <= ts]  # bars closed by ts
    assert row["perp_price"] == closed["close"].iloc[-1]
    day = closed[closed["ts_ms"] + MINUTE_MS > ts - DAY_MS]
    assert row["volume_24h_usd"] == pytest.approx((day["close"] * day["volume"]).sum(), rel=1e-12)
    rets = np.diff(np.log(closed["close"].to_numpy()))[-len(day) :]  # a bar's return needs the bar before
    assert row["ret_vol_24h"] == pytest.approx(np.std(rets, ddof=1), rel=1e-9)

    fund = frames.funding[perp_key]
    settled = fund[fund["ts_ms"] <= ts + 30_000]  # stamps are rounded to the minute
    assert row["funding_rate"] == settled["funding_rate"].iloc[-1]
    in_day = settled[settled["ts_ms"] > ts - DAY_MS]
    assert row["funding_avg_24h"] == pytest.approx(in_day["funding_rate"].mean(), rel=1e-12)
    assert row["next_funding_ts_ms"] == START_MS + 2 * DAY_MS + 8 * HOUR_MS

    book = frames.books[perp_key]
    latest = book[book["ts_ms"] == book.loc[book["ts_ms"] <= ts, "ts_ms"].max()]
    bid = latest[(latest["side"] == "bid") & (latest["level"] == 0)]["price"].iloc[0]
    ask = latest[(latest["side"] == "ask") & (latest["level"] == 0)]["price"].iloc[0]
    top = latest[latest["level"] < BOOK_DEPTH_LEVELS]
    assert row["bid_ask_spread_pct"] == pytest.approx((ask - bid) / ((ask + bid) / 2) * 100, rel=1e-12)
    assert row["orderbook_depth_usd"] == pytest.approx((top["price"] * top["size"]).sum(), rel=1e-12)
    assert not row["depth_is_proxy"]


def test_volume_proxy_without_books(snapshots: pd.DataFrame) -> None:
    p = SnapshotParams()
    bybit = snapshots[snapshots["exchange"] == "bybit"]
    assert bybit["depth_is_proxy"].all()
    np.testing.assert_allclose(bybit["orderbook_depth_usd"], p.proxy_depth_fraction * bybit["volume_24h_usd"])
    expected = p.proxy_spread_bps / 100 + PROXY_SPREAD_VOL_MULT * bybit["ret_vol_24h"].fillna(0) * 100
    np.testing.assert_allclose(bybit["bid_ask_spread_pct"], expected)


def test_stale_books_fall_back_to_the_proxy(frames: MarketFrames) -> None:
    params = SnapshotParams(book_max_age_minutes=5)  # books come every 15 min
    snaps = snapshots_from_frames(frames, EXCHANGES, BASES, QUOTE, params)
    binance = snaps[snaps["exchange"] == "binance"]
    assert binance["depth_is_proxy"].any() and not binance["depth_is_proxy"].all()


def test_gap_rows_are_left_out(snapshots: pd.DataFrame) -> None:
    eth = snapshots[(snapshots["exchange"] == "bybit") & (snapshots["base"] == "ETH")]
    in_gap = eth[(eth["ts_ms"] > GAP_START_MS + 15 * MINUTE_MS) & (eth["ts_ms"] <= GAP_END_MS)]
    assert in_gap.empty
    assert ((eth["ts_ms"] > GAP_END_MS) & (eth["ts_ms"] <= GAP_END_MS + HOUR_MS)).any()


def test_regime_follows_btc_trailing_return(snapshots: pd.DataFrame, frames: MarketFrames) -> None:
    p = SnapshotParams()
    ret = snapshots["btc_ret_trailing"]
    expected = np.where(ret > p.bull_threshold, "Bull", np.where(ret < p.bear_threshold, "Bear", "Ranging"))
    assert (snapshots["regime"].to_numpy() == expected).all()
    ts = START_MS + 3 * DAY_MS + 10 * HOUR_MS
    row = _row(snapshots, ts, "bybit", "BTC")
    bars = frames.ohlcv[("binance", "BTC/USDT:USDT")]  # first exchange with a BTC perp
    past = bars[bars["ts_ms"] + MINUTE_MS <= ts - p.regime_lookback_hours * HOUR_MS]
    now = bars[bars["ts_ms"] + MINUTE_MS <= ts]["close"].iloc[-1]
    assert row["btc_ret_trailing"] == pytest.approx(now / past["close"].iloc[-1] - 1, rel=1e-12)
    tight = dataclasses.replace(p, bull_threshold=0.0001, bear_threshold=-0.0001)
    regimes = set(snapshots_from_frames(frames, EXCHANGES, BASES, QUOTE, tight)["regime"])
    assert {"Bull", "Bear"} <= regimes


def _perturb_after(frames: MarketFrames, cut_ms: int) -> MarketFrames:
    """A copy where everything stamped after cut_ms (bars closing after it) is changed."""
    ohlcv = {}
    for key, df in frames.ohlcv.items():
        df = df.copy()
        late = df["ts_ms"] + frames.bar_ms > cut_ms
        df.loc[late, ["close", "open", "high", "low"]] *= 1.7
        df.loc[late, "volume"] *= 9.0
        ohlcv[key] = df
    funding = {}
    for key, df in frames.funding.items():
        df = df.copy()
        late = df["ts_ms"] > cut_ms + 30_000
        df.loc[late, "funding_rate"] = -5e-3
        funding[key] = df
    books = {}
    for key, df in frames.books.items():
        df = df.copy()
        df.loc[df["ts_ms"] > cut_ms, "size"] *= 50.0
        books[key] = df
    return MarketFrames(ohlcv, funding, books, frames.bar_ms)


@pytest.mark.parametrize("cut_hours", [36, 48 + 8])  # mid-interval, and exactly on a funding settlement
def test_no_look_ahead(frames: MarketFrames, snapshots: pd.DataFrame, cut_hours: int) -> None:
    cut = START_MS + cut_hours * HOUR_MS
    changed = snapshots_from_frames(_perturb_after(frames, cut), EXCHANGES, BASES, QUOTE, SnapshotParams())
    before = snapshots[snapshots["ts_ms"] <= cut].reset_index(drop=True)
    pd.testing.assert_frame_equal(changed[changed["ts_ms"] <= cut].reset_index(drop=True), before)
    assert (
        not changed[changed["ts_ms"] > cut]
        .reset_index(drop=True)
        .equals(snapshots[snapshots["ts_ms"] > cut].reset_index(drop=True))
    )
    truncated = MarketFrames(
        {k: v[v["ts_ms"] + frames.bar_ms <= cut] for k, v in frames.ohlcv.items()},
        {k: v[v["ts_ms"] <= cut + 30_000] for k, v in frames.funding.items()},
        {k: v[v["ts_ms"] <= cut] for k, v in frames.books.items()},
        frames.bar_ms,
    )
    short = snapshots_from_frames(truncated, EXCHANGES, BASES, QUOTE, SnapshotParams())
    pd.testing.assert_frame_equal(short, before)


def test_store_path_matches_frames(tmp_path, frames: MarketFrames, snapshots: pd.DataFrame) -> None:
    store = ParquetStore(tmp_path)
    for (ex, sym), df in frames.ohlcv.items():
        store.write(DatasetKey(ex, sym, "ohlcv", "1m"), df)
    for (ex, sym), df in frames.funding.items():
        store.write(DatasetKey(ex, sym, "funding"), df)
    for (ex, sym), df in frames.books.items():
        store.write(DatasetKey(ex, sym, "book"), df)
    full = build_snapshots(store, EXCHANGES, BASES, QUOTE, SnapshotParams())
    pd.testing.assert_frame_equal(full, snapshots)
    start, end = START_MS + 2 * DAY_MS, START_MS + 3 * DAY_MS
    window = build_snapshots(store, EXCHANGES, BASES, QUOTE, SnapshotParams(), start, end)
    expected = snapshots[(snapshots["ts_ms"] >= start) & (snapshots["ts_ms"] <= end)].reset_index(drop=True)
    pd.testing.assert_frame_equal(window, expected)


def test_bad_input_raises_clear_errors(tmp_path, frames: MarketFrames) -> None:
    with pytest.raises(DataValidationError, match="no perpetual candles"):
        snapshots_from_frames(MarketFrames({}), EXCHANGES, BASES, QUOTE, SnapshotParams())
    no_funding = MarketFrames(frames.ohlcv, {k: v for k, v in frames.funding.items() if k[0] != "bybit"})
    with pytest.raises(DataValidationError, match="bybit BTC/USDT:USDT has candles but no funding"):
        snapshots_from_frames(no_funding, EXCHANGES, BASES, QUOTE, SnapshotParams())
    empty_funding = MarketFrames(frames.ohlcv, {k: v.iloc[:0] for k, v in frames.funding.items()})
    with pytest.raises(DataValidationError, match="no funding"):
        snapshots_from_frames(empty_funding, EXCHANGES, BASES, QUOTE, SnapshotParams())
    empty_bars = MarketFrames({k: v.iloc[:0] for k, v in frames.ohlcv.items()}, frames.funding)
    with pytest.raises(DataValidationError, match="empty"):
        snapshots_from_frames(empty_bars, EXCHANGES, BASES, QUOTE, SnapshotParams())
    with pytest.raises(DataValidationError, match=r"snapshots\.btc_base"):
        snapshots_from_frames(frames, EXCHANGES, BASES, QUOTE, SnapshotParams(btc_base="DOGE"))
    with pytest.raises(DataValidationError, match="no snapshot time"):
        snapshots_from_frames(frames, EXCHANGES, BASES, QUOTE, SnapshotParams(), start_ms=START_MS + 99 * DAY_MS)
    with pytest.raises(DataValidationError, match="has no candles"):
        build_snapshots(ParquetStore(tmp_path), EXCHANGES, BASES, QUOTE, SnapshotParams())
