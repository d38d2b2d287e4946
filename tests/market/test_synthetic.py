"""The synthetic market: shape and determinism of the datasets, and the stylised facts it promises.

Statistical thresholds are loose on purpose: they hold with a wide margin for the default seed and
the other seeds in SEEDS (and were checked on a dozen more), so a failure means the model changed,
not bad luck.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pandas as pd
import pytest

from cryptoml.config import SyntheticParams
from cryptoml.errors import ConfigError
from cryptoml.market.store import SCHEMAS, ParquetStore
from cryptoml.market.synthetic import ASSETS, GENERATOR, generate_market, write_market

SEEDS = (7, 1, 42)  # 7 is the default seed
EIGHT_HOURS_MS = 8 * 3_600_000
Frames = dict[tuple[str, str, str], pd.DataFrame]


@cache
def market(seed: int = 7) -> Frames:
    """(exchange, symbol, kind) -> frame of the default 30-day market for ``seed`` (cached)."""
    return {(d.key.exchange, d.key.symbol, d.key.kind): d.frame for d in generate_market(SyntheticParams(seed=seed))}


def log_returns(frame: pd.DataFrame) -> np.ndarray:
    return np.diff(np.log(frame["close"].to_numpy()))


def acf(x: np.ndarray, lag: int) -> float:
    x = x - x.mean()
    return float((x[:-lag] * x[lag:]).sum() / (x * x).sum())


def top_of_book(book: pd.DataFrame) -> pd.DataFrame:
    """ts_ms -> best bid, best ask, spread in bps and total bid + ask size."""
    best = book[book["level"] == 0].pivot(index="ts_ms", columns="side", values="price")
    best["spread_bps"] = (best["ask"] - best["bid"]) / ((best["ask"] + best["bid"]) / 2) * 1e4
    best["depth"] = book.groupby("ts_ms")["size"].sum()
    return best


# --- inventory, schema, determinism ---------------------------------------------------------------


def test_default_market_has_every_dataset_with_the_store_schema() -> None:
    datasets = generate_market(SyntheticParams())
    kinds = [(d.key.exchange, d.key.symbol, d.key.kind) for d in datasets]
    assert len(kinds) == len(set(kinds)) == 2 * 3 * 5  # spot+perp ohlcv, funding, spot+perp book
    for d in datasets:
        key, frame = d.key, d.frame
        assert list(frame.columns) == SCHEMAS[key.kind].names
        assert frame["ts_ms"].dtype == np.int64
        if key.kind == "ohlcv":
            assert key.timeframe == "1m" and len(frame) == 43_200
            assert (frame[["open", "high", "low", "close", "volume"]].dtypes == np.float64).all()
        elif key.kind == "funding":
            assert key.market == "swap" and len(frame) == 90
            assert (frame[["funding_rate", "mark_price"]].dtypes == np.float64).all()
        else:
            assert len(frame) == 30 * 96 * 2 * 10  # snapshots x sides x levels
            assert frame["level"].dtype == np.int32
            assert set(frame["side"]) == {"ask", "bid"}
        keys = ["ts_ms", "side", "level"] if key.kind == "book" else ["ts_ms"]
        assert not frame.duplicated(keys).any()
        assert frame.equals(frame.sort_values(keys, kind="stable").reset_index(drop=True))
        assert d.metadata == {"source": "synthetic", "synthetic": "true", "seed": "7", "generator": GENERATOR}
    symbols = {s for _, s, _ in kinds}
    assert symbols == {f"{b}/USDT" for b in ("BTC", "ETH", "SOL")} | {f"{b}/USDT:USDT" for b in ("BTC", "ETH", "SOL")}


def test_same_seed_writes_byte_identical_files_and_marks_them_synthetic(tmp_path) -> None:
    params = SyntheticParams()
    first = write_market(params, ParquetStore(tmp_path / "a"))
    second = write_market(params, ParquetStore(tmp_path / "b"))
    assert len(first) == len(second) == 30
    for a, b in zip(first, second, strict=True):
        assert a.relative_to(tmp_path / "a") == b.relative_to(tmp_path / "b")
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs"
    store = ParquetStore(tmp_path / "a")
    keys = list(store.datasets())
    assert len(keys) == 30
    for key in keys:
        meta = store.metadata(key)
        assert meta["synthetic"] == "true" and meta["source"] == "synthetic" and meta["seed"] == "7"
        assert meta["generator"] == GENERATOR
    btc = store.read(next(k for k in keys if k.symbol == "BTC/USDT" and k.kind == "ohlcv"))
    assert btc.equals(market()[("binance", "BTC/USDT", "ohlcv")])


def test_different_seed_gives_different_data() -> None:
    a, b = market(7), market(1)
    for name in a:
        assert not np.array_equal(a[name].iloc[:, -1].to_numpy(), b[name].iloc[:, -1].to_numpy()), name


def test_each_series_is_independent_of_the_rest_of_the_universe() -> None:
    full = SyntheticParams(days=2)
    small = dataclasses.replace(full, exchanges=("bybit",), bases=("SOL",))
    whole = {(d.key.exchange, d.key.symbol, d.key.kind): d.frame for d in generate_market(full)}
    part = generate_market(small)
    assert len(part) == 5
    for d in part:
        pd.testing.assert_frame_equal(d.frame, whole[(d.key.exchange, d.key.symbol, d.key.kind)])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bases": ("BTC", "PEPE")}, "PEPE"),
        ({"exchanges": ("binance", "binance")}, "duplicates"),
        ({"seed": -1}, "seed"),
        ({"start": "2024-01-01T00:00:30"}, "whole UTC minute"),
        ({"days": 0}, "days"),
        ({"book_levels": 0}, "book_levels"),
    ],
)
def test_bad_params_raise_a_config_error_naming_the_problem(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate_market(dataclasses.replace(SyntheticParams(days=1), **change))


def test_unaligned_start_keeps_funding_and_books_on_the_utc_grid() -> None:
    params = SyntheticParams(start="2024-03-05T05:37", days=1, funding_interval_hours=8, book_interval_minutes=15)
    for d in generate_market(params):
        ts = d.frame["ts_ms"]
        if d.key.kind == "funding":
            assert list(pd.to_datetime(ts, unit="ms").dt.strftime("%d %H:%M")) == ["05 08:00", "05 16:00", "06 00:00"]
        elif d.key.kind == "book":
            assert (ts % 900_000 == 0).all() and ts.nunique() == 96
        else:
            assert ts.iloc[0] == pd.Timestamp("2024-03-05T05:37Z").value // 1_000_000


# --- candles ---------------------------------------------------------------------------------------


def test_candles_are_consistent_continuous_and_on_the_tick() -> None:
    for (_, symbol, kind), f in market().items():
        if kind != "ohlcv":
            continue
        asset = ASSETS[symbol.split("/")[0]]
        o, h, lo, c, v = (f[col].to_numpy() for col in ("open", "high", "low", "close", "volume"))
        assert (np.diff(f["ts_ms"]) == 60_000).all()
        assert (h >= np.maximum(o, c)).all() and (lo <= np.minimum(o, c)).all()
        assert (lo > 0).all() and (v > 0).all()
        assert np.array_equal(o[1:], c[:-1]), f"{symbol}: a bar does not open at the previous close"
        for prices in (o, h, lo, c):
            ticks = prices / asset.tick
            assert np.abs(ticks - np.rint(ticks)).max() < 1e-6
        assert abs(o[0] / asset.start_price - 1) < 0.01
        assert np.abs(np.diff(np.log(c))).max() < 0.1  # far inside the validation gate (0.25)


@pytest.mark.parametrize("seed", SEEDS)
def test_returns_have_fat_tails_volatility_clustering_and_a_common_factor(seed: int) -> None:
    frames = market(seed)
    returns = {b: log_returns(frames[("binance", f"{b}/USDT", "ohlcv")]) for b in ("BTC", "ETH", "SOL")}
    for base, r in returns.items():
        assert pd.Series(r).kurt() > 4, f"{base}: 1m returns are not fat-tailed"
        assert min(acf(np.abs(r), lag) for lag in range(1, 11)) > 0.1, f"{base}: no volatility clustering"
        assert 3e-4 < r.std() < 3e-3
    btc = returns["BTC"]
    assert np.corrcoef(btc, returns["ETH"])[0, 1] > 0.6
    assert np.corrcoef(btc, returns["SOL"])[0, 1] > 0.45
    assert np.cov(btc, returns["SOL"])[0, 1] / btc.var() > 1.1  # SOL is the high-beta asset


@pytest.mark.parametrize("seed", SEEDS)
def test_volume_is_seasonal_by_utc_hour_and_rises_with_abs_return(seed: int) -> None:
    for (_, symbol, kind), f in market(seed).items():
        if kind != "ohlcv":
            continue
        by_hour = f["volume"].groupby((f["ts_ms"] // 3_600_000) % 24).mean()
        assert by_hour.max() / by_hour.min() > 1.5, symbol
        assert 12 <= by_hour.idxmax() <= 17 and 2 <= by_hour.idxmin() <= 6, symbol
        assert np.corrcoef(f["volume"].to_numpy()[1:], np.abs(log_returns(f)))[0, 1] > 0.3, symbol


# --- venues, basis and funding --------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_venues_differ_by_a_few_bps_and_the_basis_mean_reverts_around_a_positive_mean(seed: int) -> None:
    frames = market(seed)
    basis_all, day_acfs = [], []
    for base in ("BTC", "ETH", "SOL"):
        spot_a = frames[("binance", f"{base}/USDT", "ohlcv")]["close"]
        spot_b = frames[("bybit", f"{base}/USDT", "ohlcv")]["close"]
        gap_bps = (spot_a / spot_b - 1).abs() * 1e4
        assert 0.5 < gap_bps.median() < 10 and gap_bps.max() < 50
        for ex in ("binance", "bybit"):
            perp = frames[(ex, f"{base}/USDT:USDT", "ohlcv")]["close"]
            basis = (perp / frames[(ex, f"{base}/USDT", "ohlcv")]["close"] - 1).to_numpy()
            assert acf(basis, 1) > 0.9
            day_acfs.append(acf(basis, 1440))
            basis_all.append(basis)
    pooled = np.concatenate(basis_all)
    assert pooled.mean() > 0
    assert 0.05 < (pooled < 0).mean() < 0.6  # sometimes negative
    assert np.mean(day_acfs) < 0.6  # mean-reverting within days, not a random walk


@pytest.mark.parametrize("seed", SEEDS)
def test_funding_follows_the_basis_and_sometimes_differs_across_exchanges(seed: int) -> None:
    frames = market(seed)
    rates = {}
    for ex in ("binance", "bybit"):
        for base in ("BTC", "ETH", "SOL"):
            fund = frames[(ex, f"{base}/USDT:USDT", "funding")]
            perp = frames[(ex, f"{base}/USDT:USDT", "ohlcv")]
            spot = frames[(ex, f"{base}/USDT", "ohlcv")]
            ts = fund["ts_ms"].to_numpy()
            assert (ts % EIGHT_HOURS_MS == 0).all() and (np.diff(ts) == EIGHT_HOURS_MS).all()
            opens = perp.set_index("ts_ms")["open"]
            assert np.array_equal(fund["mark_price"].to_numpy(), opens.loc[ts].to_numpy())
            basis = pd.Series((perp["close"] / spot["close"] - 1).to_numpy(), index=perp["ts_ms"])
            mean_basis = np.array([basis[(basis.index >= t - EIGHT_HOURS_MS) & (basis.index < t)].mean() for t in ts])
            has = ~np.isnan(mean_basis)  # the first funding has no preceding interval in the data
            rate = fund["funding_rate"].to_numpy()
            assert np.corrcoef(rate[has], mean_basis[has])[0, 1] > 0.5
            assert (np.abs(rate) <= 0.0075).all()
            rates[(ex, base)] = rate
    pooled = np.abs(np.concatenate(list(rates.values())))
    assert 5e-5 < np.median(pooled) < 3e-4  # typically ~0.01 % per 8 h
    assert pooled.max() > 5e-4  # with episodes of elevated funding
    spread = np.concatenate([np.abs(rates[("binance", b)] - rates[("bybit", b)]) for b in ("BTC", "ETH", "SOL")])
    assert 0 < (spread > 0.0005).mean() < 0.5  # arbitrage windows exist, but not always


# --- order books ----------------------------------------------------------------------------------


def test_books_are_well_formed_ladders_around_the_bar_open() -> None:
    frames = market()
    for (ex, symbol, kind), book in frames.items():
        if kind != "book":
            continue
        n_snap = book["ts_ms"].nunique()
        assert (book["ts_ms"] % 900_000 == 0).all() and n_snap == 30 * 96
        assert (book["size"] > 0).all()
        prices = book["price"].to_numpy().reshape(n_snap, 2, 10)  # (snapshot, ask/bid, level)
        assert (np.diff(prices[:, 0], axis=1) > 0).all(), f"{symbol}: asks not ascending"
        assert (np.diff(prices[:, 1], axis=1) < 0).all(), f"{symbol}: bids not descending"
        assert (prices[:, 1, 0] < prices[:, 0, 0]).all(), f"{symbol}: crossed book"
        opens = frames[(ex, symbol, "ohlcv")].set_index("ts_ms")["open"]
        mid = (prices[:, 0, 0] + prices[:, 1, 0]) / 2
        open_at = opens.loc[np.unique(book["ts_ms"])].to_numpy()
        assert np.abs(mid / open_at - 1).max() < 1e-4  # centred on the price at that instant


@pytest.mark.parametrize("seed", SEEDS)
def test_spreads_widen_and_depth_thins_with_recent_volatility(seed: int) -> None:
    frames = market(seed)
    for ex in ("binance", "bybit"):
        for base in ("BTC", "ETH", "SOL"):
            medians = {}
            for symbol in (f"{base}/USDT", f"{base}/USDT:USDT"):
                bars = frames[(ex, symbol, "ohlcv")]
                top = top_of_book(frames[(ex, symbol, "book")])
                # sd of the 30 1m returns before each snapshot (closes up to the bar before it)
                vol = pd.Series(np.log(bars["close"].to_numpy())).diff().rolling(30).std().shift(1)
                vol.index = bars["ts_ms"]
                vol = vol.reindex(top.index)
                has = vol.notna().to_numpy()
                assert np.corrcoef(vol[has], top["spread_bps"][has])[0, 1] > 0.3, symbol
                assert np.corrcoef(vol[has], top["depth"][has])[0, 1] < -0.3, symbol
                medians[symbol] = top["spread_bps"].median()
            assert medians[f"{base}/USDT"] > medians[f"{base}/USDT:USDT"], f"{ex} {base}: spot not wider"
