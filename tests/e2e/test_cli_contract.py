"""Issue 2's contract, checked as written: the real ``cryptoml`` console script against a real Prefect server.

Each test runs ``cryptoml`` as a subprocess in its own working directory holding a params.yaml made from the
repo's (a small synthetic market, a quick retry budget). Exchange data comes from the stub exchange on
127.0.0.1 (real recorded Binance USDⓈ-M exchangeInfo, real BTC/USDT candles re-based to 2022-01-01), which
the subprocess reaches through ``--api-url``; ccxt's own client code does all the talking.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cryptoml.config import parse_utc_ms
from cryptoml.market.store import DatasetKey, ParquetStore, atomic_write_table, to_table
from tests.conftest import shared_file
from tests.e2e.conftest import RunCli, describe, write_params
from tests.support.stub_exchange import Book, StubExchange, load_candles, now_ms

pytestmark = pytest.mark.server

MIN_MS = 60_000
EIGHT_HOURS_MS = 8 * 3_600_000
EXCHANGE = "binanceusdm"
SYMBOL = "BTC/USDT:USDT"
SYMBOL_ID = "BTCUSDT"
SINCE, UNTIL = "2022-01-01T00:00", "2022-01-02T00:00"
SINCE_MS, UNTIL_MS = parse_utc_ms(SINCE), parse_utc_ms(UNTIL)
MARGIN_BARS = 60  # served on each side of the window: the stored file must hold only the window
STORE = Path("data/raw")
PERP_DIR = STORE / EXCHANGE / "swap" / "BTC_USDT_USDT"
BTC_1M_MONTH = "binance_spot_btcusdt_1m_20230417-20230517.parquet"
EXCHANGE_INFO = "binance_fapi_v1_exchangeInfo_20210722.json"

# Quick to give up on persistent faults, no artificial spacing between requests.
FAST_FETCH = {"fetch.max_retry_seconds": 2, "fetch.rate_limit_ms": 1, "fetch.backoff_base_seconds": 0.2}
SMALL_SYNTHETIC = {"synthetic.days": 2}


def ccxt_args(*extra: str, api_url: str) -> list[str]:
    """The contract's ccxt backfill command line (plus ``extra`` options)."""
    return [
        "backfill", "--source", "ccxt", "--exchange", EXCHANGE, "--symbol", SYMBOL, "--timeframe", "1m",
        "--since", SINCE, "--until", UNTIL, "--api-url", api_url, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def served_candles() -> pd.DataFrame:
    """Real BTC/USDT 1m candles re-based so the day 2022-01-01 has 1440 bars, plus MARGIN_BARS either side."""
    month = load_candles(shared_file(BTC_1M_MONTH))
    n = 1440 + 2 * MARGIN_BARS
    day = month.iloc[:n].reset_index(drop=True)
    day["ts_ms"] = SINCE_MS - MARGIN_BARS * MIN_MS + MIN_MS * np.arange(n, dtype="int64")
    return day


@pytest.fixture(scope="module")
def served_funding() -> pd.DataFrame:
    """8-hourly funding from 2021-12-31 to 2022-01-02 16:00, stamped a few ms late like Binance's fundingTime."""
    n = 9
    return pd.DataFrame(
        {
            "ts_ms": SINCE_MS - EIGHT_HOURS_MS * 3 + EIGHT_HOURS_MS * np.arange(n, dtype="int64") + 5 + np.arange(n),
            "funding_rate": np.round(0.0001 + 0.00002 * np.sin(np.arange(n)), 8),
            "mark_price": np.round(46_200.0 + 37.5 * np.arange(n), 2),
        }
    )


def in_window(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["ts_ms"] >= SINCE_MS) & (df["ts_ms"] < UNTIL_MS)].reset_index(drop=True)


def make_book(levels: int = 50, ts_ms: int = SINCE_MS) -> Book:
    mid = 46_250.0
    return Book(
        bids=[(round(mid - 0.1 * (i + 1), 1), round(0.5 + 0.01 * i, 3)) for i in range(levels)],
        asks=[(round(mid + 0.1 * (i + 1), 1), round(0.6 + 0.01 * i, 3)) for i in range(levels)],
        ts_ms=ts_ms,
    )


class LiveBookStub(StubExchange):
    """Stamps each depth answer with the current time, as the real venue does (each poll is a new snapshot)."""

    def binance_depth(self, query: Any) -> dict[str, Any]:
        with self._lock:
            book = self._books.get(SYMBOL_ID)
            if book is not None:
                book.ts_ms = now_ms()
        return super().binance_depth(query)


@pytest.fixture()
def stub(served_candles: pd.DataFrame, served_funding: pd.DataFrame) -> Iterator[StubExchange]:
    """The stub exchange with the real exchangeInfo, serving the day's candles, funding and a 50-level book."""
    info = json.loads(shared_file(EXCHANGE_INFO).read_text())
    with LiveBookStub(exchange_info=info) as s:
        s.set_candles(SYMBOL_ID, served_candles)
        s.set_funding(SYMBOL_ID, served_funding)
        s.set_book(SYMBOL_ID, make_book())
        yield s


def read_parquet(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_no_temp_files(root: Path) -> None:
    leftovers = [str(p) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def assert_one_line_error(stderr: str, error_class: str) -> str:
    """The command ended with exactly one ``error: <Class>: ...`` line and no Python traceback."""
    assert "Traceback (most recent call last)" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"error: {error_class}: "), stderr
    return errors[0]


# ----- ccxt source -----
def test_ccxt_backfill_stores_exactly_the_served_day(
    tmp_path: Path, stub: StubExchange, run_cli: RunCli, served_candles: pd.DataFrame, served_funding: pd.DataFrame
) -> None:
    write_params(tmp_path, FAST_FETCH)
    proc = run_cli(*ccxt_args(api_url=stub.url), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)

    candles = read_parquet(tmp_path / PERP_DIR / "ohlcv_1m.parquet")
    assert len(candles) == 1440
    pd.testing.assert_frame_equal(candles, in_window(served_candles), check_exact=True)
    # params.yaml's kinds are ohlcv, funding and book: the same command fills all three.
    funding = read_parquet(tmp_path / PERP_DIR / "funding.parquet")
    pd.testing.assert_frame_equal(funding, in_window(served_funding), check_exact=True)
    book = read_parquet(tmp_path / PERP_DIR / "book.parquet")
    assert book.groupby("side").size().to_dict() == {"ask": 20, "bid": 20}

    report = json.loads((tmp_path / "reports" / "backfill.json").read_text())
    assert report["source"] == "ccxt" and report["synthetic"] is False and report["missing_bars"] == 0
    assert stub.unknown_paths == []
    assert_no_temp_files(tmp_path / STORE)


def test_ccxt_backfill_kind_funding_fetches_only_funding_history(
    tmp_path: Path, stub: StubExchange, run_cli: RunCli, served_funding: pd.DataFrame
) -> None:
    write_params(tmp_path, FAST_FETCH)
    proc = run_cli(*ccxt_args("--kind", "funding", api_url=stub.url), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)

    assert sorted(p.name for p in (tmp_path / PERP_DIR).iterdir()) == ["funding.parquet"]
    funding = read_parquet(tmp_path / PERP_DIR / "funding.parquet")
    assert len(funding) == 3  # 00:00, 08:00 and 16:00 of the day
    pd.testing.assert_frame_equal(funding, in_window(served_funding), check_exact=True)
    assert stub.count("/fapi/v1/fundingRate") >= 1 and stub.count("/fapi/v1/klines") == 0


def test_ccxt_backfill_reports_gaps_and_invents_no_candle(
    tmp_path: Path, stub: StubExchange, run_cli: RunCli, served_candles: pd.DataFrame
) -> None:
    window = in_window(served_candles)
    hole = window["ts_ms"].iloc[700:730]  # 30 bars inside the day
    tail = window["ts_ms"].iloc[-5:]  # the day's last 5 bars (bars after the window are still served)
    holed = served_candles[~served_candles["ts_ms"].isin(pd.concat([hole, tail]))]
    stub.set_candles(SYMBOL_ID, holed)
    write_params(tmp_path, FAST_FETCH)

    proc = run_cli(*ccxt_args("--kind", "ohlcv", api_url=stub.url), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "35 candles missing" in proc.stdout, describe(proc)

    report = json.loads((tmp_path / "reports" / "backfill.json").read_text())
    [entry] = report["datasets"]
    assert entry["missing_bars"] == report["missing_bars"] == 35
    assert entry["gaps"] == [
        {"start_ms": int(hole.iloc[0]), "end_ms": int(hole.iloc[-1]) + MIN_MS, "missing_bars": 30},
        {"start_ms": int(tail.iloc[0]), "end_ms": UNTIL_MS, "missing_bars": 5},
    ]
    stored = read_parquet(tmp_path / PERP_DIR / "ohlcv_1m.parquet")
    pd.testing.assert_frame_equal(stored, in_window(holed), check_exact=True)  # every row was served
    assert not stored["ts_ms"].isin(pd.concat([hole, tail])).any()


def test_ccxt_backfill_persistent_5xx_exits_6_and_leaves_the_store_intact(
    tmp_path: Path, stub: StubExchange, run_cli: RunCli, served_candles: pd.DataFrame
) -> None:
    # A first half-day already stored (as by an earlier run): the failing run must neither corrupt nor extend it.
    store = ParquetStore(tmp_path / STORE)
    key = DatasetKey(EXCHANGE, SYMBOL, "ohlcv", "1m")
    store.write(key, in_window(served_candles).iloc[:720], {"source": "ccxt"})
    before = file_bytes(tmp_path / STORE)
    stub.faults.add("/fapi/v1/klines", "503", times=None)
    write_params(tmp_path, FAST_FETCH)

    proc = run_cli(*ccxt_args("--kind", "ohlcv", api_url=stub.url), cwd=tmp_path)
    assert proc.returncode == 6, describe(proc)
    line = assert_one_line_error(proc.stderr, "SourceError")
    assert "fetch_ohlcv" in line and "503" in line, line
    assert stub.count("/fapi/v1/klines") >= 2  # retried before giving up
    assert file_bytes(tmp_path / STORE) == before
    assert_no_temp_files(tmp_path)


# ----- files source and the validation gate -----
def test_files_import_validates_and_corrupted_copies_fail_naming_the_expectation(
    tmp_path: Path, run_cli: RunCli
) -> None:
    month = shared_file(BTC_1M_MONTH)
    write_params(tmp_path)
    proc = run_cli(
        "backfill", "--source", "files", "--path", str(month), "--exchange", "binance", "--symbol", "BTC/USDT",
        "--timeframe", "1m", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    key = DatasetKey("binance", "BTC/USDT", "ohlcv", "1m")
    store = ParquetStore(tmp_path / STORE)
    imported = store.read(key)
    assert len(imported) == 43_199
    pd.testing.assert_frame_equal(imported, load_candles(month), check_exact=True)

    proc = run_cli("validate", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert json.loads((tmp_path / "reports" / "validation.json").read_text())["success"] is True

    # Corrupted copies, each written by the store's own writer into a store of its own.
    nan_close = imported.copy()
    nan_close.loc[1000, "close"] = np.nan
    nan_path = ParquetStore(tmp_path / "bad_nan").write(key, nan_close, store.metadata(key))
    swapped = imported.copy()
    swapped.loc[[2000, 2001], "ts_ms"] = swapped.loc[[2001, 2000], "ts_ms"].to_numpy()
    swapped_path = ParquetStore(tmp_path / "bad_order").path(key)
    # store.write would sort the rows back; write the table unsorted with the store's schema and metadata.
    atomic_write_table(to_table(swapped, "ohlcv", store.metadata(key)), swapped_path)

    proc = run_cli("validate", str(nan_path), cwd=tmp_path)
    assert proc.returncode == 3, describe(proc)
    line = assert_one_line_error(proc.stderr, "DataValidationError")
    assert "close_not_null" in proc.stderr, describe(proc)
    assert "data validation failed" in line
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert report["success"] is False
    assert [f["expectation"] for f in report["results"][0]["failures"]] == ["close_not_null"]

    proc = run_cli("validate", str(swapped_path), cwd=tmp_path)
    assert proc.returncode == 3, describe(proc)
    assert "ts_ms_strictly_increasing" in proc.stderr, describe(proc)


# ----- synthetic source -----
def test_synthetic_backfill_twice_gives_byte_identical_files(tmp_path: Path, run_cli: RunCli) -> None:
    runs = []
    for name in ("first", "second"):
        workdir = tmp_path / name
        workdir.mkdir()
        write_params(workdir, SMALL_SYNTHETIC)
        proc = run_cli("backfill", cwd=workdir)
        assert proc.returncode == 0, describe(proc)
        assert "SYNTHETIC" in proc.stdout
        runs.append(file_bytes(workdir / STORE))
    first, second = runs
    assert len(first) >= 2 * 3 * 2  # 2 exchanges x 3 bases x (spot + perp), each several datasets
    assert sorted(first) == sorted(second)
    different = [name for name in first if first[name] != second[name]]
    assert different == []
    assert (tmp_path / "first" / "reports" / "backfill.json").read_bytes() == (
        tmp_path / "second" / "reports" / "backfill.json"
    ).read_bytes()


# ----- configuration errors -----
def test_misspelled_params_key_exits_2_naming_key_and_suggestion(tmp_path: Path, run_cli: RunCli) -> None:
    params = write_params(tmp_path, SMALL_SYNTHETIC)
    params.write_text(params.read_text().replace("  symbols:", "  symbls:", 1))
    proc = run_cli("backfill", cwd=tmp_path)
    assert proc.returncode == 2, describe(proc)
    line = assert_one_line_error(proc.stderr, "ConfigError")
    assert "'market.symbls'" in line and "did you mean 'market.symbols'" in line, line
    assert not (tmp_path / STORE).exists()


# ----- live order-book collection -----
def test_collect_appends_three_snapshots_of_twenty_levels(
    tmp_path: Path, stub: StubExchange, run_cli: RunCli
) -> None:
    write_params(tmp_path, FAST_FETCH)
    proc = run_cli(
        "collect", "--exchange", EXCHANGE, "--symbol", SYMBOL, "--api-url", stub.url, "--interval", "0.2",
        "--rounds", "3", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        EXCHANGE: {"rounds": 3, "snapshots": 3, "failures": 0}
    }
    book = read_parquet(tmp_path / PERP_DIR / "book.parquet")
    per_snapshot = book.groupby(["ts_ms", "side"]).size()
    assert book["ts_ms"].nunique() == 3
    assert (per_snapshot == 20).all() and len(per_snapshot) == 6
    for _, side in book.groupby(["ts_ms", "side"]):
        assert side["level"].tolist() == list(range(20))
    served = make_book()
    best = book[book["level"] == 0].groupby("side")["price"].unique()
    assert best["bid"].tolist() == [served.bids[0][0]] and best["ask"].tolist() == [served.asks[0][0]]
