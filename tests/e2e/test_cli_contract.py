"""Issue 2's contract, checked as written: the real ``cryptoml`` console script against a real Prefect server.

Each scenario runs ``cryptoml`` as a subprocess in its own working directory holding a params.yaml made from
the repo's (a small synthetic market, a quick retry budget). Exchange data comes from a stub exchange on
127.0.0.1 (the real recorded Binance USDⓈ-M exchangeInfo, real BTC/USDT candles re-based to 2022-01-01),
reached through ``--api-url``; ccxt's own client code does all the talking.

A command costs seconds of imports, so the module's scenarios run as concurrent subprocesses in one
module fixture (:func:`outcomes`, each with its own directory and stub) and every test checks one
scenario's outcome. A scenario whose set-up failed re-raises its error in the tests that read it.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

PARALLEL_COMMANDS = 4  # concurrent CLI subprocesses (2 cores: imports overlap with I/O and retry waits)
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
SPOT_KEY = DatasetKey("binance", "BTC/USDT", "ohlcv", "1m")
SWAPPED_KEY = DatasetKey("binance_swapped", "BTC/USDT", "ohlcv", "1m")  # a second copy in the same folder
HOLE = slice(700, 730)  # 30 bars missing inside the day
TAIL_MISSING = 5  # and the day's last 5 bars (bars after the window are still served)
NAN_ROW, SWAPPED_ROWS = 1000, [2000, 2001]

# Quick to give up on persistent faults, no artificial spacing between requests.
FAST_FETCH = {"fetch.max_retry_seconds": 3, "fetch.rate_limit_ms": 1, "fetch.backoff_base_seconds": 0.2}
SMALL_SYNTHETIC = {"synthetic.days": 2}


# ----- served data -----
@functools.cache
def _real_month() -> pd.DataFrame:
    return load_candles(shared_file(BTC_1M_MONTH))


def real_month() -> pd.DataFrame:
    """The real BTC/USDT 1m month in the store schema (a fresh copy)."""
    return _real_month().copy()


def rebased_day() -> pd.DataFrame:
    """Real 1m candles re-stamped so 2022-01-01 has 1440 bars, plus MARGIN_BARS either side."""
    n = 1440 + 2 * MARGIN_BARS
    day = real_month().iloc[:n].reset_index(drop=True)
    day["ts_ms"] = SINCE_MS - MARGIN_BARS * MIN_MS + MIN_MS * np.arange(n, dtype="int64")
    return day


def funding_rows() -> pd.DataFrame:
    """8-hourly funding from 2021-12-31 to 2022-01-02 16:00, stamped a few ms late like Binance's fundingTime."""
    n = 9
    return pd.DataFrame(
        {
            "ts_ms": SINCE_MS - EIGHT_HOURS_MS * 3 + EIGHT_HOURS_MS * np.arange(n, dtype="int64") + 5 + np.arange(n),
            "funding_rate": np.round(0.0001 + 0.00002 * np.sin(np.arange(n)), 8),
            "mark_price": np.round(46_200.0 + 37.5 * np.arange(n), 2),
        }
    )


def make_book(levels: int = 50, ts_ms: int = SINCE_MS) -> Book:
    mid = 46_250.0
    return Book(
        bids=[(round(mid - 0.1 * (i + 1), 1), round(0.5 + 0.01 * i, 3)) for i in range(levels)],
        asks=[(round(mid + 0.1 * (i + 1), 1), round(0.6 + 0.01 * i, 3)) for i in range(levels)],
        ts_ms=ts_ms,
    )


def in_window(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["ts_ms"] >= SINCE_MS) & (df["ts_ms"] < UNTIL_MS)].reset_index(drop=True)


class LiveBookStub(StubExchange):
    """Stamps each depth answer with the current time, as the real venue does (each poll is a new snapshot)."""

    def binance_depth(self, query: Any) -> dict[str, Any]:
        with self._lock:
            book = self._books.get(SYMBOL_ID)
            if book is not None:
                book.ts_ms = max(now_ms(), book.ts_ms + 1)  # two polls in one millisecond are still two
        return super().binance_depth(query)


# ----- helpers -----
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


def ccxt_args(*extra: str, api_url: str) -> list[str]:
    """The contract's ccxt backfill command line (plus ``extra`` options)."""
    return [
        "backfill", "--source", "ccxt", "--exchange", EXCHANGE, "--symbol", SYMBOL, "--timeframe", "1m",
        "--since", SINCE, "--until", UNTIL, "--api-url", api_url, *extra,
    ]  # fmt: skip


# ----- scenarios: set up, run the command(s), record what the tests check -----
@dataclass
class Outcome:
    workdir: Path
    procs: list[subprocess.CompletedProcess[str]]
    requests: dict[str, int] = field(default_factory=dict)  # stub requests per path
    unknown_paths: list[str] = field(default_factory=list)
    before: dict[str, bytes] = field(default_factory=dict)  # store bytes before the command

    @property
    def proc(self) -> subprocess.CompletedProcess[str]:
        return self.procs[-1]


@dataclass(frozen=True)
class Context:
    run_cli: RunCli
    base: Path

    def workdir(self, name: str, changes: dict[str, Any] | None = None) -> Path:
        path = self.base / name
        path.mkdir()
        write_params(path, changes)
        return path

    def stub(self) -> StubExchange:
        """The stub exchange (real exchangeInfo) serving the day's candles, funding and a 50-level book."""
        stub = LiveBookStub(exchange_info=json.loads(shared_file(EXCHANGE_INFO).read_text()))
        stub.set_candles(SYMBOL_ID, rebased_day())
        stub.set_funding(SYMBOL_ID, funding_rows())
        stub.set_book(SYMBOL_ID, make_book())
        return stub.start()

    def against_stub(
        self, workdir: Path, stub: StubExchange, *args: str, before: dict[str, bytes] | None = None
    ) -> Outcome:
        """Run the command while ``stub`` serves, record its requests, stop it."""
        try:
            proc = self.run_cli(*args, cwd=workdir)
            paths = {p for p, _ in stub.requests}
            return Outcome(workdir, [proc], {p: stub.count(p) for p in paths}, list(stub.unknown_paths), before or {})
        finally:
            stub.stop()


def ccxt_day(ctx: Context) -> Outcome:
    stub = ctx.stub()
    workdir = ctx.workdir("ccxt_day", FAST_FETCH)
    return ctx.against_stub(workdir, stub, *ccxt_args(api_url=stub.url))


def ccxt_funding(ctx: Context) -> Outcome:
    stub = ctx.stub()
    workdir = ctx.workdir("ccxt_funding", FAST_FETCH)
    return ctx.against_stub(workdir, stub, *ccxt_args("--kind", "funding", api_url=stub.url))


def holed_candles() -> pd.DataFrame:
    served = rebased_day()
    window = in_window(served)
    missing = pd.concat([window["ts_ms"].iloc[HOLE], window["ts_ms"].iloc[-TAIL_MISSING:]])
    return served[~served["ts_ms"].isin(missing)].reset_index(drop=True)


def ccxt_gaps(ctx: Context) -> Outcome:
    stub = ctx.stub()
    stub.set_candles(SYMBOL_ID, holed_candles())
    workdir = ctx.workdir("ccxt_gaps", FAST_FETCH)
    return ctx.against_stub(workdir, stub, *ccxt_args("--kind", "ohlcv", api_url=stub.url))


def ccxt_5xx(ctx: Context) -> Outcome:
    stub = ctx.stub()
    workdir = ctx.workdir("ccxt_5xx", FAST_FETCH)
    # A first half-day already stored (as by an earlier run): the failing run must neither corrupt nor extend it.
    day = in_window(rebased_day())
    ParquetStore(workdir / STORE).write(DatasetKey(EXCHANGE, SYMBOL, "ohlcv", "1m"), day.iloc[:720], {"source": "ccxt"})
    before = file_bytes(workdir / STORE)
    stub.faults.add("/fapi/v1/klines", "503", times=None)
    return ctx.against_stub(workdir, stub, *ccxt_args("--kind", "ohlcv", api_url=stub.url), before=before)


def files_import_then_validate(ctx: Context) -> Outcome:
    workdir = ctx.workdir("files")
    month = shared_file(BTC_1M_MONTH)
    imported = ctx.run_cli(
        "backfill", "--source", "files", "--path", str(month), "--exchange", "binance", "--symbol", "BTC/USDT",
        "--timeframe", "1m", cwd=workdir,
    )  # fmt: skip
    if imported.returncode != 0:
        return Outcome(workdir, [imported])
    return Outcome(workdir, [imported, ctx.run_cli("validate", cwd=workdir)])


def corrupted_copies(ctx: Context) -> Outcome:
    """Two corrupted copies of the real month written into one store folder, validated as a file and as a folder."""
    workdir = ctx.workdir("corrupted")
    store = ParquetStore(workdir / "bad")
    meta = {"source": "files", "imported_from": BTC_1M_MONTH}
    nan_close = real_month()
    nan_close.loc[NAN_ROW, "close"] = np.nan
    store.write(SPOT_KEY, nan_close, meta)
    swapped = real_month()
    swapped.loc[SWAPPED_ROWS, "ts_ms"] = swapped.loc[SWAPPED_ROWS[::-1], "ts_ms"].to_numpy()
    # store.write would sort the rows back into order: write the unsorted table with the store's own schema,
    # metadata and atomic writer instead.
    swapped_meta = {**meta, "exchange": SWAPPED_KEY.exchange, "symbol": SWAPPED_KEY.symbol, "market": "spot"}
    atomic_write_table(to_table(swapped, "ohlcv", {**swapped_meta, "timeframe": "1m"}), store.path(SWAPPED_KEY))
    one_file = ctx.run_cli("validate", str(store.path(SPOT_KEY)), cwd=workdir)
    folder = ctx.run_cli("validate", "bad", cwd=workdir)
    return Outcome(workdir, [one_file, folder])


def synthetic_first(ctx: Context) -> Outcome:
    workdir = ctx.workdir("synthetic_first", SMALL_SYNTHETIC)
    return Outcome(workdir, [ctx.run_cli("backfill", cwd=workdir)])


def synthetic_second(ctx: Context) -> Outcome:
    workdir = ctx.workdir("synthetic_second", SMALL_SYNTHETIC)
    return Outcome(workdir, [ctx.run_cli("backfill", cwd=workdir)])


def misspelled_key(ctx: Context) -> Outcome:
    workdir = ctx.workdir("misspelled", SMALL_SYNTHETIC)
    params = workdir / "params.yaml"
    text = params.read_text()
    assert "  symbols:" in text
    params.write_text(text.replace("  symbols:", "  symbls:", 1))
    return Outcome(workdir, [ctx.run_cli("backfill", cwd=workdir)])


def collect_books(ctx: Context) -> Outcome:
    stub = ctx.stub()
    workdir = ctx.workdir("collect", FAST_FETCH)
    return ctx.against_stub(
        workdir, stub, "collect", "--exchange", EXCHANGE, "--symbol", SYMBOL, "--api-url", stub.url,
        "--interval", "0.2", "--rounds", "3",
    )  # fmt: skip


# Longest first, so the slow chains start at once.
SCENARIOS: dict[str, Callable[[Context], Outcome]] = {
    "files": files_import_then_validate,
    "corrupted": corrupted_copies,
    "ccxt_5xx": ccxt_5xx,
    "ccxt_day": ccxt_day,
    "ccxt_funding": ccxt_funding,
    "ccxt_gaps": ccxt_gaps,
    "synthetic_first": synthetic_first,
    "synthetic_second": synthetic_second,
    "misspelled": misspelled_key,
    "collect": collect_books,
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, run_cli: RunCli) -> dict[str, Outcome | BaseException]:
    """Every scenario's outcome (or the error its set-up raised), run concurrently."""
    ctx = Context(run_cli, tmp_path_factory.mktemp("cli"))
    with ThreadPoolExecutor(max_workers=PARALLEL_COMMANDS, thread_name_prefix="cli") as pool:
        futures = {name: pool.submit(scenario, ctx) for name, scenario in SCENARIOS.items()}
        results: dict[str, Outcome | BaseException] = {}
        for name, future in futures.items():
            error = future.exception()
            results[name] = error if error is not None else future.result()
    return results


@pytest.fixture()
def outcome(request: pytest.FixtureRequest, outcomes: dict[str, Outcome | BaseException]) -> Outcome:
    """The outcome of the scenario named by the test's ``scenario`` marker argument."""
    marker = request.node.get_closest_marker("scenario")
    if marker is None:
        raise LookupError(f"{request.node.name} needs @scenario(NAME) to use the outcome fixture")
    result = outcomes[marker.args[0]]
    if isinstance(result, BaseException):
        raise result
    return result


scenario = pytest.mark.scenario


# ----- ccxt source -----
@scenario("ccxt_day")
def test_ccxt_backfill_stores_exactly_the_served_day(outcome: Outcome) -> None:
    assert outcome.proc.returncode == 0, describe(outcome.proc)
    served = rebased_day()
    candles = read_parquet(outcome.workdir / PERP_DIR / "ohlcv_1m.parquet")
    assert len(candles) == 1440
    pd.testing.assert_frame_equal(candles, in_window(served), check_exact=True)
    # params.yaml's kinds are ohlcv, funding and book: the same command fills all three.
    funding = read_parquet(outcome.workdir / PERP_DIR / "funding.parquet")
    pd.testing.assert_frame_equal(funding, in_window(funding_rows()), check_exact=True)
    book = read_parquet(outcome.workdir / PERP_DIR / "book.parquet")
    assert book.groupby("side").size().to_dict() == {"ask": 20, "bid": 20}

    report = json.loads((outcome.workdir / "reports" / "backfill.json").read_text())
    assert report["source"] == "ccxt" and report["synthetic"] is False and report["missing_bars"] == 0
    assert outcome.requests["/fapi/v1/exchangeInfo"] >= 1 and outcome.unknown_paths == []
    assert_no_temp_files(outcome.workdir / STORE)


@scenario("ccxt_funding")
def test_ccxt_backfill_kind_funding_fetches_only_funding_history(outcome: Outcome) -> None:
    assert outcome.proc.returncode == 0, describe(outcome.proc)
    assert sorted(p.name for p in (outcome.workdir / PERP_DIR).iterdir()) == ["funding.parquet"]
    funding = read_parquet(outcome.workdir / PERP_DIR / "funding.parquet")
    assert len(funding) == 3  # 00:00, 08:00 and 16:00 of the day
    pd.testing.assert_frame_equal(funding, in_window(funding_rows()), check_exact=True)
    assert outcome.requests.get("/fapi/v1/fundingRate", 0) >= 1 and "/fapi/v1/klines" not in outcome.requests


@scenario("ccxt_gaps")
def test_ccxt_backfill_reports_gaps_and_invents_no_candle(outcome: Outcome) -> None:
    assert outcome.proc.returncode == 0, describe(outcome.proc)
    assert f"{30 + TAIL_MISSING} candles missing" in outcome.proc.stdout, describe(outcome.proc)
    day = in_window(rebased_day())["ts_ms"]
    report = json.loads((outcome.workdir / "reports" / "backfill.json").read_text())
    [entry] = report["datasets"]
    assert entry["missing_bars"] == report["missing_bars"] == 30 + TAIL_MISSING
    assert entry["gaps"] == [
        {"start_ms": int(day.iloc[HOLE.start]), "end_ms": int(day.iloc[HOLE.stop]), "missing_bars": 30},
        {"start_ms": int(day.iloc[-TAIL_MISSING]), "end_ms": UNTIL_MS, "missing_bars": TAIL_MISSING},
    ]
    stored = read_parquet(outcome.workdir / PERP_DIR / "ohlcv_1m.parquet")
    # Exactly the served rows of the window: nothing filled in, nothing altered.
    pd.testing.assert_frame_equal(stored, in_window(holed_candles()), check_exact=True)


@scenario("ccxt_5xx")
def test_ccxt_backfill_persistent_5xx_exits_6_and_leaves_the_store_intact(outcome: Outcome) -> None:
    assert outcome.proc.returncode == 6, describe(outcome.proc)
    line = assert_one_line_error(outcome.proc.stderr, "SourceError")
    assert "fetch_ohlcv" in line and "503" in line, line
    assert outcome.requests["/fapi/v1/klines"] >= 2  # retried before giving up
    assert file_bytes(outcome.workdir / STORE) == outcome.before
    assert_no_temp_files(outcome.workdir)


# ----- files source and the validation gate -----
@scenario("files")
def test_files_import_of_the_real_month_passes_validation(outcome: Outcome) -> None:
    imported, validated = outcome.procs if len(outcome.procs) == 2 else (outcome.proc, None)
    assert imported.returncode == 0, describe(imported)
    stored = ParquetStore(outcome.workdir / STORE).read(SPOT_KEY)
    assert len(stored) == 43_199
    pd.testing.assert_frame_equal(stored, real_month(), check_exact=True)
    assert validated is not None and validated.returncode == 0, describe(validated or imported)
    assert json.loads((outcome.workdir / "reports" / "validation.json").read_text())["success"] is True


@scenario("corrupted")
def test_validate_on_corrupted_copies_exits_3_naming_the_expectation(outcome: Outcome) -> None:
    one_file, folder = outcome.procs
    assert one_file.returncode == 3, describe(one_file)
    line = assert_one_line_error(one_file.stderr, "DataValidationError")
    assert "data validation failed for 1 of 1 dataset" in line
    assert "close_not_null" in one_file.stderr and "1 unexpected row" in one_file.stderr, describe(one_file)

    assert folder.returncode == 3, describe(folder)
    assert_one_line_error(folder.stderr, "DataValidationError")
    assert "ts_ms_strictly_increasing" in folder.stderr, describe(folder)
    report = json.loads((outcome.workdir / "reports" / "validation.json").read_text())
    assert report["success"] is False and report["failed"] == 2
    failed = {
        r["dataset"]: [(f["expectation"], f["unexpected_count"]) for f in r["failures"]] for r in report["results"]
    }
    assert failed == {
        SPOT_KEY.label(): [("close_not_null", 1)],
        SWAPPED_KEY.label(): [("ts_ms_strictly_increasing", 1)],
    }


# ----- synthetic source -----
@scenario("synthetic_first")
def test_synthetic_backfill_twice_gives_byte_identical_files(
    outcome: Outcome, outcomes: dict[str, Outcome | BaseException]
) -> None:
    second = outcomes["synthetic_second"]
    assert isinstance(second, Outcome), second
    runs = []
    for run in (outcome, second):
        assert run.proc.returncode == 0, describe(run.proc)
        assert "SYNTHETIC" in run.proc.stdout
        runs.append(file_bytes(run.workdir / STORE))
    first_files, second_files = runs
    assert len(first_files) >= 2 * 3 * 2  # 2 exchanges x 3 bases x (spot + perp), one file or more each
    assert sorted(first_files) == sorted(second_files)
    assert [name for name in first_files if first_files[name] != second_files[name]] == []
    reports = [run.workdir / "reports" / "backfill.json" for run in (outcome, second)]
    assert reports[0].read_bytes() == reports[1].read_bytes()


# ----- configuration errors -----
@scenario("misspelled")
def test_misspelled_params_key_exits_2_naming_key_and_suggestion(outcome: Outcome) -> None:
    assert outcome.proc.returncode == 2, describe(outcome.proc)
    line = assert_one_line_error(outcome.proc.stderr, "ConfigError")
    assert "'market.symbls'" in line and "did you mean 'market.symbols'" in line, line
    assert not (outcome.workdir / STORE).exists()


# ----- live order-book collection -----
@scenario("collect")
def test_collect_appends_three_snapshots_of_twenty_levels(outcome: Outcome) -> None:
    assert outcome.proc.returncode == 0, describe(outcome.proc)
    assert json.loads(outcome.proc.stdout.strip().splitlines()[-1]) == {
        EXCHANGE: {"rounds": 3, "snapshots": 3, "failures": 0}
    }
    book = read_parquet(outcome.workdir / PERP_DIR / "book.parquet")
    assert book["ts_ms"].nunique() == 3
    per_side = book.groupby(["ts_ms", "side"])
    assert len(per_side) == 6
    for _, side in per_side:
        assert side["level"].tolist() == list(range(20))
    served = make_book()
    best = book[book["level"] == 0].groupby("side")["price"].unique()
    assert best["bid"].tolist() == [served.bids[0][0]] and best["ask"].tolist() == [served.asks[0][0]]
    assert outcome.requests["/fapi/v1/depth"] == 3
