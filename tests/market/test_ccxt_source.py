"""CcxtSource with ccxt's real code against the stub exchange: paging, parsing, faults and retries.

Nothing in ccxt is mocked: it builds the URLs, runs its rate limiter, parses the JSON and maps the HTTP
errors; only the waits between retries go through a fake clock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import ccxt
import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import ConfigError, SourceError
from cryptoml.market.ccxt_source import CcxtSource, book_frame, funding_frame, ohlcv_frame
from cryptoml.market.exchange import make_exchange, rebase_url
from cryptoml.market.store import to_table
from tests.conftest import shared_file
from tests.market.conftest import DAY_MS, MINUTE_MS, FakeClock, generated_candles
from tests.support.stub_exchange import Book, StubExchange

pytestmark = pytest.mark.server

BTC = "BTC/USDT:USDT"
XRP = "XRP/USDT:USDT"
EXCHANGES = ("binanceusdm", "bybit")
KLINES = {"binanceusdm": "/fapi/v1/klines", "bybit": "/v5/market/kline"}
FUNDING = {"binanceusdm": "/fapi/v1/fundingRate", "bybit": "/v5/market/funding/history"}
START_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC
EIGHT_HOURS_MS = 8 * 3_600_000

MakeSource = Callable[..., CcxtSource]


def collect(pages: Iterable[pd.DataFrame]) -> tuple[pd.DataFrame, list[int]]:
    """All pages concatenated, plus the page sizes; each page must already be sorted and unique."""
    frames = list(pages)
    for page in frames:
        assert page["ts_ms"].is_monotonic_increasing and page["ts_ms"].is_unique
    if not frames:
        return pd.DataFrame(), []
    return pd.concat(frames, ignore_index=True), [len(p) for p in frames]


def window(df: pd.DataFrame, since_ms: int, until_ms: int) -> pd.DataFrame:
    return df[(df["ts_ms"] >= since_ms) & (df["ts_ms"] < until_ms)].reset_index(drop=True)


def real_xrp_funding() -> pd.DataFrame:
    """XRPUSDT funding rows (real Binance fundingTime, ms jitter included) with the mark price at funding.

    The mark price is the open of the real 8h mark-price candle starting at the funding hour.
    """
    raw = pd.read_csv(shared_file("funding_rates_binance_8h.csv"))
    rows = raw[raw["symbol"] == "XRPUSDT"]
    mark = pd.read_feather(shared_file("binance_usdm_xrpusdt_markprice_8h_20211118-20211218.feather"))
    mark_ms = (mark["date"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    open_at = dict(zip(mark_ms.to_numpy(dtype="int64"), mark["open"].to_numpy(dtype="float64"), strict=True))
    ts = rows["funding_time_ms"].to_numpy(dtype="int64")
    return pd.DataFrame(
        {
            "ts_ms": ts,
            "funding_rate": rows["funding_rate"].to_numpy(dtype="float64"),
            "mark_price": [open_at.get(int(t) - int(t) % EIGHT_HOURS_MS, np.nan) for t in ts],
        }
    )


# ----- make_exchange -----


def test_unknown_exchange_id_names_the_closest_one() -> None:
    with pytest.raises(ConfigError, match=r"'binanceusdn'.*did you mean 'binanceusdm'"):
        make_exchange("binanceusdn")


def test_api_url_rebases_every_api_url_keeping_paths() -> None:
    ex = make_exchange("binanceusdm", api_url="http://127.0.0.1:8765/", rate_limit_ms=3, timeout_ms=1234)
    api = ex.urls["api"]
    assert api["fapiPublic"] == "http://127.0.0.1:8765/fapi/v1"
    assert api["public"] == "http://127.0.0.1:8765/api/v3"
    assert all(v.startswith("http://127.0.0.1:8765/") for v in api.values())
    assert all(v.startswith("http://127.0.0.1:8765/") for v in ex.urls["test"].values())
    assert ex.rateLimit == 3 and ex.timeout == 1234 and ex.enableRateLimit is True

    bybit = make_exchange("bybit", api_url="http://127.0.0.1:8765")
    assert set(bybit.urls["api"].values()) == {"http://127.0.0.1:8765"}
    assert bybit.options["fetchMarkets"]["types"] == ["spot", "linear"]


def test_without_api_url_the_real_endpoints_stay() -> None:
    ex = make_exchange("binanceusdm")
    assert ex.urls["api"]["fapiPublic"] == "https://fapi.binance.com/fapi/v1"
    assert rebase_url("https://api.{hostname}/v5", "http://h:1") == "http://h:1/v5"


@pytest.mark.parametrize("bad", ["127.0.0.1:8765", "not a url"])
def test_an_api_url_without_scheme_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="http://host:port"):
        make_exchange("bybit", api_url=bad)


# ----- candles -----


def test_binanceusdm_day_of_real_1m_candles_equals_served_data(
    recorded_stub: StubExchange, btc_1m_month: pd.DataFrame, make_source: MakeSource
) -> None:
    recorded_stub.set_candles("BTCUSDT", btc_1m_month)
    source = make_source(recorded_stub, page_limit=1500)
    since_ms = 1_681_776_000_000  # 2023-04-18 00:00 UTC
    got, sizes = collect(source.fetch_ohlcv("binanceusdm", BTC, "1m", since_ms, since_ms + DAY_MS))

    expected = window(btc_1m_month, since_ms, since_ms + DAY_MS)
    assert len(expected) == 1440
    pd.testing.assert_frame_equal(got, expected)
    # 1500 is the endpoint's maximum, but ccxt 4.5.90 clamps Binance klines to 1000 per request.
    asked = recorded_stub.queries("/fapi/v1/klines")
    assert sizes == [1000, 440]
    assert [q["limit"] for q in asked] == ["1000", "1000"]
    assert [int(q["startTime"]) for q in asked] == [since_ms, since_ms + 1000 * MINUTE_MS]
    assert recorded_stub.count("/fapi/v1/exchangeInfo") == 1
    assert recorded_stub.unknown_paths == []
    to_table(got, "ohlcv")  # fits the store schema exactly


def test_bybit_day_of_real_1m_candles_through_v5(
    stub: StubExchange, btc_1m_month: pd.DataFrame, make_source: MakeSource
) -> None:
    stub.set_candles("BTCUSDT", btc_1m_month)
    source = make_source(stub, page_limit=5000)
    since_ms = 1_682_294_400_000  # 2023-04-24 00:00 UTC
    got, sizes = collect(source.fetch_ohlcv("bybit", BTC, "1m", since_ms, since_ms + DAY_MS))

    pd.testing.assert_frame_equal(got, window(btc_1m_month, since_ms, since_ms + DAY_MS))
    assert sizes == [1000, 440]
    assert {q["limit"] for q in stub.queries("/v5/market/kline")} == {"1000"}  # capped to Bybit's max
    assert stub.count("/v5/market/instruments-info") == 3  # spot, linear, linear pre-launch
    assert stub.unknown_paths == []


def test_a_window_not_on_bar_boundaries_keeps_bars_opening_inside_it(
    stub: StubExchange, make_source: MakeSource
) -> None:
    bars = generated_candles(START_MS, 300)
    stub.set_candles("BTCUSDT", bars)
    source = make_source(stub)
    since_ms, until_ms = START_MS + 10 * MINUTE_MS + 1, START_MS + 20 * MINUTE_MS + 1
    for exchange in EXCHANGES:
        got, _ = collect(source.fetch_ohlcv(exchange, BTC, "1m", since_ms, until_ms))
        assert got["ts_ms"].tolist() == [START_MS + i * MINUTE_MS for i in range(11, 21)]


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_holes_are_not_filled_and_do_not_stop_paging(
    stub: StubExchange, make_source: MakeSource, exchange: str
) -> None:
    bars = generated_candles(START_MS, 4000)
    keep = np.ones(len(bars), dtype=bool)
    keep[100:103] = False  # a 3-minute hole
    keep[990:1010] = False  # a hole across the first page boundary
    keep[1500:2700] = False  # a hole longer than a whole page
    served = bars[keep].reset_index(drop=True)
    stub.set_candles("BTCUSDT", served)
    got, _ = collect(make_source(stub).fetch_ohlcv(exchange, BTC, "1m", START_MS, START_MS + 4000 * MINUTE_MS))
    pd.testing.assert_frame_equal(got, served)


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize(
    "quirk",
    [{"duplicate_rows": True}, {"short_page_rows": 333}, {"rows_before_start": 7}],
    ids=["duplicated-rows", "short-pages", "overlapping-pages"],
)
def test_misbehaving_pages_still_give_the_clean_data(
    stub: StubExchange, make_source: MakeSource, exchange: str, quirk: dict[str, object]
) -> None:
    bars = generated_candles(START_MS, 2500)
    stub.set_candles("BTCUSDT", bars)
    for name, value in quirk.items():
        setattr(stub.quirks, name, value)
    got, sizes = collect(make_source(stub).fetch_ohlcv(exchange, BTC, "1m", START_MS, START_MS + 2500 * MINUTE_MS))
    pd.testing.assert_frame_equal(got, bars)
    assert len(sizes) >= 3


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_an_exchange_ignoring_the_start_time_ends_instead_of_looping(
    stub: StubExchange, make_source: MakeSource, exchange: str
) -> None:
    bars = generated_candles(START_MS, 3000)
    stub.set_candles("BTCUSDT", bars)
    stub.quirks.ignore_start = True  # every answer is the first page again
    got, sizes = collect(make_source(stub).fetch_ohlcv(exchange, BTC, "1m", START_MS, START_MS + 3000 * MINUTE_MS))
    assert sizes == [1000]
    pd.testing.assert_frame_equal(got, bars.iloc[:1000])
    assert stub.count(KLINES[exchange]) == 2


def test_no_candles_in_the_window_yields_nothing(stub: StubExchange, make_source: MakeSource) -> None:
    stub.set_candles("BTCUSDT", generated_candles(START_MS, 100))
    source = make_source(stub)
    later = START_MS + DAY_MS
    for exchange in EXCHANGES:
        assert list(source.fetch_ohlcv(exchange, BTC, "1m", later, later + DAY_MS)) == []


def test_5m_bars_are_paged_by_their_own_step(stub: StubExchange, make_source: MakeSource) -> None:
    bars = generated_candles(START_MS, 1200, step_ms=5 * MINUTE_MS)
    stub.set_candles("BTCUSDT", bars, timeframe_ms=5 * MINUTE_MS)
    source = make_source(stub)
    for exchange in EXCHANGES:
        got, sizes = collect(source.fetch_ohlcv(exchange, BTC, "5m", START_MS, START_MS + 1200 * 5 * MINUTE_MS))
        pd.testing.assert_frame_equal(got, bars)
        assert sizes == [1000, 200]


# ----- funding -----


def test_binanceusdm_real_xrp_funding_history(stub: StubExchange, make_source: MakeSource) -> None:
    funding = real_xrp_funding()
    assert len(funding) == 91 and funding["mark_price"].notna().all()
    stub.set_funding("XRPUSDT", funding)
    since_ms, until_ms = int(funding["ts_ms"].iloc[0]), int(funding["ts_ms"].iloc[-1]) + 1

    got, sizes = collect(make_source(stub).fetch_funding("binanceusdm", XRP, since_ms, until_ms))
    pd.testing.assert_frame_equal(got, funding)
    assert sizes == [91]
    to_table(got, "funding")

    paged, sizes = collect(make_source(stub, page_limit=25).fetch_funding("binanceusdm", XRP, since_ms, until_ms))
    pd.testing.assert_frame_equal(paged, funding)
    assert sum(sizes) == 91 and len(sizes) == 4


def test_funding_without_mark_price_is_nan(stub: StubExchange, make_source: MakeSource) -> None:
    funding = real_xrp_funding().assign(mark_price=np.nan)
    stub.set_funding("XRPUSDT", funding)
    got, _ = collect(make_source(stub).fetch_funding("binanceusdm", XRP, START_MS - 10 * 365 * DAY_MS, START_MS))
    pd.testing.assert_frame_equal(got, funding)


def test_bybit_real_xrp_funding_in_pages_of_200_at_most(stub: StubExchange, make_source: MakeSource) -> None:
    funding = real_xrp_funding()
    stub.set_funding("XRPUSDT", funding)
    since_ms, until_ms = int(funding["ts_ms"].iloc[0]), int(funding["ts_ms"].iloc[-1]) + 1
    got, _ = collect(make_source(stub, page_limit=30).fetch_funding("bybit", XRP, since_ms, until_ms))
    # Bybit's funding history carries no mark price.
    pd.testing.assert_frame_equal(got, funding.assign(mark_price=np.nan))
    assert {q["limit"] for q in stub.queries("/v5/market/funding/history")} == {"30"}


def test_bybit_funding_on_exact_hours_loses_no_row_at_page_starts(stub: StubExchange, make_source: MakeSource) -> None:
    # Bybit stamps funding exactly on the hour and answers the newest `limit` rows of the window ccxt
    # asks for, so a page starting exactly on a funding time is where a row could go missing.
    n = 700
    funding = pd.DataFrame(
        {
            "ts_ms": START_MS + EIGHT_HOURS_MS * np.arange(n, dtype="int64"),
            "funding_rate": np.round(np.random.default_rng(5).normal(1e-4, 5e-5, n), 8),
            "mark_price": np.nan,
        }
    )
    stub.set_funding("BTCUSDT", funding)
    source = make_source(stub)
    got, sizes = collect(source.fetch_funding("bybit", BTC, START_MS, START_MS + n * EIGHT_HOURS_MS))
    pd.testing.assert_frame_equal(got, funding)
    assert {q["limit"] for q in stub.queries("/v5/market/funding/history")} == {"200"}
    assert len(sizes) == 4

    since_ms = START_MS + 123 * EIGHT_HOURS_MS
    got, _ = collect(source.fetch_funding("bybit", BTC, since_ms, since_ms + 10 * EIGHT_HOURS_MS))
    assert got["ts_ms"].tolist() == [since_ms + i * EIGHT_HOURS_MS for i in range(10)]


# ----- books -----


def recorded_book() -> Book:
    """The real SUSHIUSDT USDⓈ-M depth snapshot (1000 levels, 2021-07-22)."""
    line = shared_file("binance_fapi_v1_depth_snapshots_20210722.jsonl").read_text().splitlines()[0]
    body = json.loads(line)["response"]
    return Book(
        bids=[(float(p), float(q)) for p, q in body["bids"]],
        asks=[(float(p), float(q)) for p, q in body["asks"]],
        ts_ms=int(body["T"]),
        update_id=int(body["lastUpdateId"]),
    )


@pytest.mark.parametrize(
    ("exchange", "levels", "asked"),
    [("binanceusdm", 20, "20"), ("bybit", 20, "20"), ("binanceusdm", 15, "20"), ("bybit", 15, "15")],
)
def test_real_depth_snapshot_top_levels(
    recorded_stub: StubExchange, make_source: MakeSource, exchange: str, levels: int, asked: str
) -> None:
    book = recorded_book()
    recorded_stub.set_book("SUSHIUSDT", book)
    got = make_source(recorded_stub).fetch_book(exchange, "SUSHI/USDT:USDT", levels)

    assert len(got) == 2 * levels
    bids, asks = got[got["side"] == "bid"], got[got["side"] == "ask"]
    assert bids["level"].tolist() == list(range(levels)) == asks["level"].tolist()
    assert bids["price"].tolist() == [p for p, _ in book.bids[:levels]]
    assert asks["size"].tolist() == [q for _, q in book.asks[:levels]]
    assert (got["ts_ms"] == book.ts_ms).all()
    assert bids["price"].is_monotonic_decreasing and asks["price"].is_monotonic_increasing
    path = "/fapi/v1/depth" if exchange == "binanceusdm" else "/v5/market/orderbook"
    assert recorded_stub.queries(path)[-1]["limit"] == asked  # Binance only takes 5/10/20/50/...
    to_table(got, "book")


def test_an_empty_book_gives_an_empty_frame(stub: StubExchange, make_source: MakeSource) -> None:
    got = make_source(stub).fetch_book("binanceusdm", BTC, 5)
    assert got.empty and list(got.columns) == ["ts_ms", "side", "level", "price", "size"]


def test_page_converters_handle_missing_fields() -> None:
    rows: list[dict[str, Any]] = [
        {"timestamp": 2, "fundingRate": 1e-4, "info": {"markPrice": ""}},
        {"timestamp": 1, "fundingRate": -2e-4, "info": {}},
        {"timestamp": None, "fundingRate": 0.1, "info": {}},
        {"timestamp": 2, "fundingRate": 3e-4, "info": {"markPrice": "0.9"}},
    ]
    funding = funding_frame(rows)
    assert funding["ts_ms"].tolist() == [1, 2]  # sorted, the row without time dropped, last duplicate wins
    assert funding["funding_rate"].tolist() == [-2e-4, 3e-4]
    assert np.isnan(funding["mark_price"].iloc[0]) and funding["mark_price"].iloc[1] == 0.9

    candles = ohlcv_frame([[120_000, 1, 2, 0.5, 1.5, None], [60_000, 1, 1, 1, 1, 3], [None, 0, 0, 0, 0, 0]])
    assert candles["ts_ms"].tolist() == [60_000, 120_000] and np.isnan(candles["volume"].iloc[1])

    book = book_frame({"bids": [[10.0, 1.0, 3]], "asks": [], "timestamp": None}, 5, fallback_ts_ms=42)
    assert book.to_dict("records") == [{"ts_ms": 42, "side": "bid", "level": 0, "price": 10.0, "size": 1.0}]
    for frame, kind in ((funding, "funding"), (candles, "ohlcv"), (book, "book")):
        to_table(frame, kind)


# ----- faults -----


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("kind", ["429", "403", "500", "502", "503", "504", "truncate", "bad_json", "reset"])
def test_transient_faults_are_retried_and_the_data_stays_clean(
    stub: StubExchange, make_source: MakeSource, clock: FakeClock, exchange: str, kind: str
) -> None:
    bars = generated_candles(START_MS, 2500)
    stub.set_candles("BTCUSDT", bars)
    stub.faults.add(KLINES[exchange], kind, times=2)
    got, _ = collect(make_source(stub).fetch_ohlcv(exchange, BTC, "1m", START_MS, START_MS + 2500 * MINUTE_MS))
    pd.testing.assert_frame_equal(got, bars)
    assert stub.faults.pending() == 0
    assert stub.count(KLINES[exchange]) == 3 + 2  # three pages plus two failed attempts
    assert len(clock.sleeps) == 2


@pytest.mark.parametrize(("exchange", "kind"), [("binanceusdm", "429"), ("binanceusdm", "418"), ("bybit", "429")])
def test_retry_after_is_honoured(
    stub: StubExchange, make_source: MakeSource, clock: FakeClock, exchange: str, kind: str
) -> None:
    stub.set_funding("BTCUSDT", pd.DataFrame({"ts_ms": [START_MS], "funding_rate": [1e-4], "mark_price": [4e4]}))
    stub.faults.add(FUNDING[exchange], kind, times=1, retry_after_s=7)
    source = make_source(stub, backoff_base_seconds=0.01, backoff_max_seconds=0.02)
    got, _ = collect(source.fetch_funding(exchange, BTC, START_MS, START_MS + DAY_MS))
    assert got["ts_ms"].tolist() == [START_MS]
    assert clock.sleeps == [7.0]  # the server's wait, not the 0.01 s backoff


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_response_slower_than_the_timeout_is_retried(
    stub: StubExchange, make_source: MakeSource, clock: FakeClock, exchange: str
) -> None:
    bars = generated_candles(START_MS, 50)
    stub.set_candles("BTCUSDT", bars)
    stub.faults.add(KLINES[exchange], "slow", times=1, delay_s=1.0)
    source = make_source(stub, timeout_ms=300)
    got, _ = collect(source.fetch_ohlcv(exchange, BTC, "1m", START_MS, START_MS + DAY_MS))
    pd.testing.assert_frame_equal(got, bars)
    assert len(clock.sleeps) == 1
    assert stub.count(KLINES[exchange]) == 3  # the timed-out ask, its retry, the empty last page


@pytest.mark.parametrize(
    ("exchange", "path"), [("binanceusdm", "/fapi/v1/exchangeInfo"), ("bybit", "/v5/market/instruments-info")]
)
def test_loading_markets_is_retried_too(
    stub: StubExchange, make_source: MakeSource, clock: FakeClock, exchange: str, path: str
) -> None:
    stub.set_candles("BTCUSDT", generated_candles(START_MS, 10))
    stub.faults.add(path, "503", times=1)
    got, _ = collect(make_source(stub).fetch_ohlcv(exchange, BTC, "1m", START_MS, START_MS + DAY_MS))
    assert len(got) == 10 and len(clock.sleeps) == 1


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_persistent_outage_ends_with_a_source_error_within_the_budget(
    stub: StubExchange, make_source: MakeSource, clock: FakeClock, exchange: str
) -> None:
    stub.set_candles("BTCUSDT", generated_candles(START_MS, 10))
    stub.faults.add(KLINES[exchange], "502", times=None)
    source = make_source(stub, max_retry_seconds=12.0, backoff_base_seconds=0.5, backoff_max_seconds=4.0)
    start = clock.now
    with pytest.raises(SourceError) as info:
        list(source.fetch_ohlcv(exchange, BTC, "1m", START_MS, START_MS + DAY_MS))
    assert clock.now - start <= 12.0
    attempts = stub.count(KLINES[exchange])
    assert attempts == len(clock.sleeps) + 1 >= 3
    message = str(info.value)
    assert exchange in message and BTC in message and f"{attempts} attempt(s)" in message
    assert "ExchangeNotAvailable" in message


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_rejected_request_is_not_retried(
    stub: StubExchange, make_source: MakeSource, clock: FakeClock, exchange: str
) -> None:
    stub.set_candles("BTCUSDT", generated_candles(START_MS, 10))
    stub.faults.add(KLINES[exchange], "reject", times=None)
    with pytest.raises(SourceError, match=rf"{exchange} fetch_ohlcv BTC/USDT:USDT .*(BadSymbol|BadRequest)"):
        list(make_source(stub).fetch_ohlcv(exchange, BTC, "1m", START_MS, START_MS + DAY_MS))
    assert stub.count(KLINES[exchange]) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_an_unlisted_symbol_is_a_source_error_naming_it(
    stub: StubExchange, make_source: MakeSource, exchange: str
) -> None:
    with pytest.raises(SourceError, match=rf"{exchange} has no market 'BTC/USDT:USDX'.*'BTC/USDT:USDT'"):
        list(make_source(stub).fetch_ohlcv(exchange, "BTC/USDT:USDX", "1m", START_MS, START_MS + DAY_MS))
    assert stub.count(KLINES[exchange]) == 0


def test_bad_arguments_fail_before_any_request(stub: StubExchange, make_source: MakeSource) -> None:
    source = make_source(stub)
    with pytest.raises(ConfigError, match="empty fetch window"):
        source.fetch_ohlcv("binanceusdm", BTC, "1m", START_MS, START_MS)
    with pytest.raises(ConfigError, match="invalid timeframe"):
        source.fetch_ohlcv("binanceusdm", BTC, "1 minute", START_MS, START_MS + DAY_MS)
    with pytest.raises(ConfigError, match="did you mean 'bybit'"):
        source.fetch_funding("bybitt", BTC, START_MS, START_MS + DAY_MS)
    with pytest.raises(ConfigError, match="levels must be > 0"):
        source.fetch_book("bybit", BTC, 0)
    assert stub.requests == []


def test_clients_are_cached_and_markets_loaded_once(stub: StubExchange, make_source: MakeSource) -> None:
    stub.set_candles("BTCUSDT", generated_candles(START_MS, 10))
    source = make_source(stub)
    for _ in range(3):
        collect(source.fetch_ohlcv("binanceusdm", BTC, "1m", START_MS, START_MS + DAY_MS))
        source.fetch_book("binanceusdm", BTC, 5)
    assert stub.count("/fapi/v1/exchangeInfo") == 1
    assert source.exchange("binanceusdm") is source.exchange("binanceusdm")
    source.close()
    collect(source.fetch_ohlcv("binanceusdm", BTC, "1m", START_MS, START_MS + DAY_MS))
    assert stub.count("/fapi/v1/exchangeInfo") == 2  # a closed source starts afresh


def test_a_refused_connection_is_retried_then_reported(make_source: MakeSource, clock: FakeClock) -> None:
    # A stub that has stopped: its port refuses connections (ccxt NetworkError), retried to the budget.
    with StubExchange() as gone:
        source = make_source(gone, max_retry_seconds=3.0)
    with pytest.raises(SourceError, match=r"binanceusdm load_markets: gave up after \d+ attempt\(s\)"):
        list(source.fetch_ohlcv("binanceusdm", BTC, "1m", START_MS, START_MS + DAY_MS))
    assert len(clock.sleeps) >= 1


def test_ccxt_maps_each_stub_fault_to_the_class_the_retry_policy_expects(stub: StubExchange) -> None:
    # The mapping the retry policy relies on: what ccxt raises for each fault of the stub.
    stub.set_candles("BTCUSDT", generated_candles(START_MS, 10))
    ex = make_exchange("binanceusdm", api_url=stub.url, rate_limit_ms=1, timeout_ms=300)
    ex.load_markets()
    expected = {
        "429": ccxt.DDoSProtection,
        "502": ccxt.ExchangeNotAvailable,
        "slow": ccxt.RequestTimeout,
        "reset": ccxt.NetworkError,
        "reject": ccxt.BadSymbol,
    }
    for kind, error in expected.items():
        stub.faults.add("/fapi/v1/klines", kind, times=1, delay_s=1.0)
        with pytest.raises(error):
            ex.fetch_ohlcv(BTC, "1m", since=START_MS, limit=10)
    ex.close()
