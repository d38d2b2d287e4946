"""The great-expectations gate: real data passes, each kind of corruption fails under its named expectation."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cryptoml.config import ValidationParams
from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.market.files import import_funding, import_ohlcv, to_epoch_ms
from cryptoml.market.store import DatasetKey, ParquetStore
from cryptoml.market.validation import (
    NO_ROWS,
    ValidationReport,
    raise_on_failure,
    validate_frame,
    validate_path,
    validate_store,
    write_report,
)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
PARAMS = ValidationParams()
H8_MS = 8 * 3_600_000


def real(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"real market data {name} not found in {DATA.resolve()} (shared/data absent)")
    return path


def failed(report: ValidationReport) -> dict[str, int]:
    return {f.expectation: f.unexpected_count for f in report.failures}


def tiny_ohlcv(n: int = 50) -> pd.DataFrame:
    """A clean generated 1m series: a gentle random walk on the minute grid."""
    rng = np.random.default_rng(3)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.001, n)))
    open_ = np.r_[100.0, close[:-1]]
    return pd.DataFrame(
        {
            "ts_ms": 1_704_067_200_000 + 60_000 * np.arange(n, dtype=np.int64),
            "open": open_,
            "high": np.maximum(open_, close) * 1.001,
            "low": np.minimum(open_, close) * 0.999,
            "close": close,
            "volume": rng.uniform(1, 5, n),
        }
    )


def tiny_book(snapshots: int = 3, levels: int = 5) -> pd.DataFrame:
    rows = []
    for s in range(snapshots):
        ts = 1_704_067_200_000 + 15 * 60_000 * s
        mid = 100.0 + s
        for lvl in range(levels):
            rows.append((ts, "bid", lvl, mid - 0.5 - lvl * 0.1, 1.0 + lvl))
            rows.append((ts, "ask", lvl, mid + 0.5 + lvl * 0.1, 2.0 + lvl))
    df = pd.DataFrame(rows, columns=["ts_ms", "side", "level", "price", "size"])
    return df.astype({"level": "int32"})


def tardis_book(path: Path) -> pd.DataFrame:
    """Tardis ``book_snapshot_25`` (wide, µs timestamps) -> the store's long book layout."""
    wide = pd.read_csv(path)
    ts_ms = to_epoch_ms(wide["timestamp"], "timestamp")  # µs, detected by magnitude
    parts = []
    for col in wide.columns:
        m = re.fullmatch(r"(asks|bids)\[(\d+)\]\.price", col)
        if m:
            parts.append(
                pd.DataFrame(
                    {
                        "ts_ms": ts_ms,
                        "side": "ask" if m.group(1) == "asks" else "bid",
                        "level": int(m.group(2)),
                        "price": wide[col],
                        "size": wide[col.replace(".price", ".amount")],
                    }
                )
            )
    return pd.concat(parts, ignore_index=True).astype({"level": "int32"})


# --- OHLCV ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def btc_1m() -> pd.DataFrame:
    return import_ohlcv(real("binance_spot_btcusdt_1m_20230417-20230517.parquet"), timeframe="1m")


def test_real_btc_month_passes(btc_1m: pd.DataFrame) -> None:
    report = validate_frame(btc_1m, "ohlcv", PARAMS, timeframe="1m", dataset="BTC/USDT 1m")
    assert report.success, report.summary()
    assert report.rows == 43_199
    assert {"high_ge_max_open_close", "ts_ms_on_timeframe_grid", "abs_log_return_within_max"} <= set(report.checked)
    assert "passed all" in report.summary()


ROW = 1_000  # row the corruptions hit


def nan_close(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[ROW, "close"] = np.nan
    return df


def negative_price(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[ROW, "low"] = -1.0
    return df


def swapped_timestamps(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[[ROW, ROW + 1], "ts_ms"] = df.loc[[ROW + 1, ROW], "ts_ms"].to_numpy()
    return df


def duplicated_row(df: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([df.iloc[: ROW + 1], df.iloc[[ROW]], df.iloc[ROW + 1 :]], ignore_index=True)


def high_below_close(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[ROW, "high"] = df.loc[ROW, "close"] - 5.0
    df.loc[ROW, "low"] = min(df.loc[ROW, "low"], df.loc[ROW, "high"])
    return df


def absurd_jump(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[ROW, ["open", "high", "low", "close"]] *= 2.0  # one bar at twice the price: two jumps of log 2
    return df


def off_grid(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[ROW, "ts_ms"] += 30_000
    return df


CORRUPTIONS: list[tuple[Callable[[pd.DataFrame], pd.DataFrame], dict[str, int]]] = [
    (nan_close, {"close_not_null": 1}),
    (negative_price, {"low_gt_0": 1}),
    (swapped_timestamps, {"ts_ms_strictly_increasing": 1}),
    (duplicated_row, {"ts_ms_unique": 2, "ts_ms_strictly_increasing": 1}),
    (high_below_close, {"high_ge_max_open_close": 1}),
    (absurd_jump, {"abs_log_return_within_max": 2}),
    (off_grid, {"ts_ms_on_timeframe_grid": 1}),
]


@pytest.mark.parametrize(("corrupt", "expected"), CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS])
def test_corrupted_month_fails_with_the_named_expectation(
    btc_1m: pd.DataFrame, corrupt: Callable[[pd.DataFrame], pd.DataFrame], expected: dict[str, int]
) -> None:
    bad = corrupt(btc_1m.copy())
    report = validate_frame(bad, "ohlcv", PARAMS, timeframe="1m", dataset="BTC/USDT 1m corrupted")
    assert not report.success
    assert failed(report) == expected
    summary = report.summary()
    assert "BTC/USDT 1m corrupted" in summary
    for name, count in expected.items():
        assert f"{name} " in summary and f"{count} unexpected row(s)" in summary
    # The examples point at the corrupted bar (or its neighbour, for order and jump checks).
    hit = {int(bad.loc[i, "ts_ms"]) for i in (ROW, ROW + 1) if not pd.isna(bad.loc[i, "ts_ms"])}
    for failure in report.failures:
        assert failure.examples, failure
        assert {ex["ts_ms"] for ex in failure.examples} & hit


def test_generated_frame_passes_and_catches_a_low_above_open() -> None:
    df = tiny_ohlcv()
    assert validate_frame(df, "ohlcv", PARAMS, timeframe="1m").success
    df.loc[10, "low"] = df.loc[10, ["open", "close"]].max() + 0.5
    df.loc[10, "high"] = df.loc[10, "low"] + 1.0
    report = validate_frame(df, "ohlcv", PARAMS, timeframe="1m")
    assert failed(report) == {"low_le_min_open_close": 1}
    assert report.failures[0].examples[0]["ts_ms"] == int(df.loc[10, "ts_ms"])


def test_grid_check_needs_a_timeframe_and_volume_may_be_zero() -> None:
    df = tiny_ohlcv()
    df.loc[3, "volume"] = 0.0
    report = validate_frame(df, "ohlcv", PARAMS)
    assert report.success
    assert "ts_ms_on_timeframe_grid" not in report.checked
    df.loc[4, "volume"] = -1.0
    assert failed(validate_frame(df, "ohlcv", PARAMS)) == {"volume_ge_0": 1}


def test_real_markprice_candles_fail_on_missing_volume() -> None:
    df = import_ohlcv(real("binance_usdm_xrpusdt_markprice_1h_20211115-20211119.feather"))
    assert failed(validate_frame(df, "ohlcv", PARAMS, timeframe="1h")) == {"volume_not_null": 100}


def test_empty_frame_fails_with_no_rows() -> None:
    report = validate_frame(tiny_ohlcv().iloc[:0], "ohlcv", PARAMS, dataset="empty")
    assert not report.success
    assert [f.expectation for f in report.failures] == [NO_ROWS]
    assert "no rows" in report.summary()


def test_missing_column_and_unknown_kind_raise() -> None:
    with pytest.raises(DataValidationError, match=r"missing required column\(s\) \['volume'\]"):
        validate_frame(tiny_ohlcv().drop(columns="volume"), "ohlcv", PARAMS)
    text_prices = tiny_ohlcv().astype({"close": object})
    text_prices.loc[3, "close"] = "n/a"
    with pytest.raises(DataValidationError, match=r"must be numeric: close \(object\)"):
        validate_frame(text_prices, "ohlcv", PARAMS)
    with pytest.raises(ConfigError, match="unknown dataset kind 'trades'"):
        validate_frame(tiny_ohlcv(), "trades", PARAMS)


# --- funding -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xrp_funding() -> pd.DataFrame:
    return import_funding(real("funding_rates_binance_8h.csv"), symbol="XRPUSDT")


def test_real_xrp_funding_passes_with_ms_jitter(xrp_funding: pd.DataFrame) -> None:
    assert (xrp_funding["ts_ms"] % H8_MS != 0).sum() > 50  # Binance stamps 00:00:00.017 etc.
    report = validate_frame(xrp_funding, "funding", PARAMS, dataset="XRPUSDT funding")
    assert report.success, report.summary()
    assert "ts_ms_on_funding_cadence" in report.checked


def test_real_daily_bts_funding_sits_on_the_8h_grid() -> None:
    bts = import_funding(real("funding_rates_binance_8h.csv"), symbol="BTSUSDT")
    assert (bts["ts_ms"].diff().dropna() == 24 * 3_600_000).all()
    assert validate_frame(bts, "funding", PARAMS).success


def test_absurd_funding_rate_fails(xrp_funding: pd.DataFrame) -> None:
    bad = xrp_funding.copy()
    bad.loc[10, "funding_rate"] = 0.5
    report = validate_frame(bad, "funding", PARAMS, dataset="XRPUSDT funding")
    assert failed(report) == {"funding_rate_within_max": 1}
    assert report.failures[0].examples[0] == {"ts_ms": int(bad.loc[10, "ts_ms"]), "funding_rate": 0.5}
    assert "funding_rate_within_max" in report.summary()


def test_off_cadence_funding_time_fails(xrp_funding: pd.DataFrame) -> None:
    bad = xrp_funding.copy()
    bad.loc[20, "ts_ms"] += 3_600_000  # 01:00 instead of 00:00: still increasing, but off the 8h grid
    assert failed(validate_frame(bad, "funding", PARAMS)) == {"ts_ms_on_funding_cadence": 1}
    tolerant = ValidationParams(funding_interval_hours=1)
    assert validate_frame(bad, "funding", tolerant).success


def test_mark_price_nan_allowed_but_not_negative(xrp_funding: pd.DataFrame) -> None:
    df = xrp_funding.copy()
    df.loc[:4, "mark_price"] = 1.1
    assert validate_frame(df, "funding", PARAMS).success
    df.loc[2, "mark_price"] = -1.0
    assert failed(validate_frame(df, "funding", PARAMS)) == {"mark_price_gt_0": 1}
    without = validate_frame(df.drop(columns="mark_price"), "funding", PARAMS)
    assert without.success and "mark_price_gt_0" not in without.checked


# --- books ---------------------------------------------------------------------------------------


def test_good_book_passes() -> None:
    report = validate_frame(tiny_book(), "book", PARAMS)
    assert report.success, report.summary()


def test_real_tardis_book_passes() -> None:
    book = tardis_book(real("tardis_binance-futures_btcusdt_book_snapshot_25_20200901.csv"))
    assert len(book) == 10 * 2 * 25
    report = validate_frame(book, "book", PARAMS, dataset="tardis BTCUSDT")
    assert report.success, report.summary()


def test_crossed_book_fails() -> None:
    book = tiny_book()
    snap1 = book["ts_ms"] == book["ts_ms"].unique()[1]
    book.loc[snap1 & (book["side"] == "bid"), "price"] += 2.0  # every bid now above the best ask
    report = validate_frame(book, "book", PARAMS)
    assert failed(report) == {"best_bid_lt_best_ask": 1}  # counted once per crossed snapshot
    assert report.failures[0].examples[0]["ts_ms"] == int(book.loc[snap1, "ts_ms"].iloc[0])


def test_touching_book_is_crossed_too() -> None:
    book = tiny_book(snapshots=1)
    best_ask = book.loc[(book["side"] == "ask") & (book["level"] == 0), "price"].iloc[0]
    book.loc[book["side"] == "bid", "price"] += best_ask - book.loc[0, "price"]  # best bid == best ask
    assert failed(validate_frame(book, "book", PARAMS)) == {"best_bid_lt_best_ask": 1}


def test_unsorted_levels_fail() -> None:
    book = tiny_book()
    bids = book.index[(book["side"] == "bid") & (book["ts_ms"] == book["ts_ms"].iloc[0])]
    book.loc[bids[[1, 2]], "price"] = book.loc[bids[[2, 1]], "price"].to_numpy()  # levels 1 and 2 swapped
    asks = book.index[(book["side"] == "ask") & (book["ts_ms"] == book["ts_ms"].iloc[-1])]
    book.loc[asks[3], "price"] = book.loc[asks[1], "price"]  # a flat step is not ascending either
    assert failed(validate_frame(book, "book", PARAMS)) == {
        "bids_descending_by_level": 1,
        "asks_ascending_by_level": 1,
    }


def test_book_levels_and_sizes() -> None:
    book = tiny_book()
    book.loc[(book["side"] == "ask") & (book["level"] == 4), "level"] = 7  # a gap in the levels
    book.loc[0, "size"] = 0.0
    report = validate_frame(book, "book", PARAMS)
    assert failed(report) == {"size_gt_0": 1, "levels_contiguous_from_0": 3}


# --- store, report file, gate ----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ParquetStore:
    store = ParquetStore(tmp_path / "raw")
    good = DatasetKey("binance", "BTC/USDT:USDT", "ohlcv", "1m")
    store.write(good, tiny_ohlcv(), {"synthetic": "true"})
    bad = tiny_ohlcv()
    bad.loc[5, "close"] = np.nan
    store.write(DatasetKey("bybit", "ETH/USDT:USDT", "ohlcv", "1m"), bad)
    funding = pd.DataFrame(
        {"ts_ms": 1_704_067_200_000 + H8_MS * np.arange(3), "funding_rate": [1e-4, 2e-4, -1e-4], "mark_price": np.nan}
    )
    store.write(DatasetKey("binance", "BTC/USDT:USDT", "funding"), funding, {"synthetic": "true"})
    store.write(DatasetKey("binance", "BTC/USDT:USDT", "book"), tiny_book(), {"synthetic": "true"})
    return store


def test_validate_store_and_path(store: ParquetStore) -> None:
    reports = validate_store(store, PARAMS)
    by_name = {r.dataset: r for r in reports}
    assert set(by_name) == {
        "binance BTC/USDT:USDT ohlcv 1m",
        "binance BTC/USDT:USDT funding",
        "binance BTC/USDT:USDT book",
        "bybit ETH/USDT:USDT ohlcv 1m",
    }
    assert failed(by_name["bybit ETH/USDT:USDT ohlcv 1m"]) == {"close_not_null": 1}
    assert all(r.success for name, r in by_name.items() if name.startswith("binance"))
    assert by_name["binance BTC/USDT:USDT ohlcv 1m"].synthetic
    assert not by_name["bybit ETH/USDT:USDT ohlcv 1m"].synthetic
    assert "ts_ms_on_timeframe_grid" in by_name["binance BTC/USDT:USDT ohlcv 1m"].checked

    key = DatasetKey("bybit", "ETH/USDT:USDT", "ohlcv", "1m")
    (single,) = validate_path(store.path(key), PARAMS)
    assert single.dataset == "bybit ETH/USDT:USDT ohlcv 1m" and not single.success
    assert [r.to_dict() for r in validate_path(store.root, PARAMS)] == [r.to_dict() for r in reports]
    only = validate_store(store, PARAMS, keys=[key])
    assert [r.dataset for r in only] == ["bybit ETH/USDT:USDT ohlcv 1m"]


def test_validate_path_refuses_foreign_or_missing_input(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"ts_ms": [1, 2]}), foreign)
    with pytest.raises(DataValidationError, match=r"cryptoml\.kind"):
        validate_path(foreign, PARAMS)
    with pytest.raises(ConfigError, match="no such file"):
        validate_path(tmp_path / "absent", PARAMS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match="no datasets"):
        validate_path(tmp_path / "empty", PARAMS)
    with pytest.raises(DataValidationError, match="no stored data"):
        validate_store(ParquetStore(tmp_path / "empty"), PARAMS, keys=[DatasetKey("x", "A/B", "funding")])


def test_write_report_is_valid_json_written_atomically(store: ParquetStore, tmp_path: Path) -> None:
    reports = validate_store(store, PARAMS)
    out = tmp_path / "reports" / "validation.json"
    out.parent.mkdir()
    out.write_text("old contents")
    assert write_report(reports, out) == out
    doc = json.loads(out.read_text())  # the NaN example became null: strict JSON
    assert doc["success"] is False
    assert doc["datasets"] == 4 and doc["failed"] == 1 and doc["synthetic"] == 3
    results = {r["dataset"]: r for r in doc["results"]}
    bad = results["bybit ETH/USDT:USDT ohlcv 1m"]
    assert bad["success"] is False and bad["synthetic"] is False
    assert bad["failures"][0]["expectation"] == "close_not_null"
    assert bad["failures"][0]["examples"][0]["close"] is None
    assert results["binance BTC/USDT:USDT book"]["synthetic"] is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["validation.json"]  # no temp file left
    first = out.read_bytes()
    write_report(reports, out)
    assert out.read_bytes() == first  # no timestamps: same reports, same bytes


def test_raise_on_failure_names_the_expectation(store: ParquetStore, tmp_path: Path) -> None:
    reports = validate_store(store, PARAMS)
    raise_on_failure([r for r in reports if r.success])
    path = tmp_path / "validation.json"
    with pytest.raises(DataValidationError) as info:
        raise_on_failure(reports, path)
    message = str(info.value)
    assert "1 of 4 dataset(s)" in message
    assert "close_not_null" in message and "bybit ETH/USDT:USDT ohlcv 1m" in message
    assert str(path) in message
    assert info.value.exit_code == 3
