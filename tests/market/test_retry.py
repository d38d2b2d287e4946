"""call_with_retry: which ccxt errors are retried, backoff with jitter, Retry-After, the total budget."""

from __future__ import annotations

import random
from collections.abc import Callable

import ccxt
import pytest

from cryptoml.errors import SourceError
from cryptoml.market.exchange import TruncatedResponse
from cryptoml.market.retry import backoff_seconds, call_with_retry, parse_retry_after
from tests.market.conftest import FakeClock


class MaxJitter(random.Random):
    """Jitter that always draws the top of its range, so delays are the backoff ceiling exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def failing(errors: list[BaseException], result: str = "ok") -> tuple[Callable[[], str], list[int]]:
    """A callable raising ``errors`` in turn, then returning ``result``; the list counts calls."""
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return fn, calls


def run(fn: Callable[[], str], clock: FakeClock, **kw: object) -> str:
    args: dict[str, object] = {
        "what": "binanceusdm fetch_ohlcv BTC/USDT:USDT",
        "max_total_seconds": 60.0,
        "base_seconds": 0.5,
        "max_seconds": 20.0,
        "sleep": clock.sleep,
        "clock": clock,
        "rng": random.Random(3),
    }
    args.update(kw)
    return call_with_retry(fn, **args)  # type: ignore[arg-type]


def test_success_at_once_does_not_sleep(clock: FakeClock) -> None:
    fn, calls = failing([])
    assert run(fn, clock) == "ok"
    assert len(calls) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    "error",
    [
        ccxt.NetworkError("refused"),
        ccxt.DDoSProtection("429"),
        ccxt.RateLimitExceeded("10006"),
        ccxt.ExchangeNotAvailable("502 <html>"),
        ccxt.RequestTimeout("timed out"),
        TruncatedResponse("half a body"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_network_errors_are_retried_until_success(clock: FakeClock, error: BaseException) -> None:
    fn, calls = failing([error, error, error])
    assert run(fn, clock) == "ok"
    assert len(calls) == 4
    assert len(clock.sleeps) == 3


@pytest.mark.parametrize(
    "error",
    [
        ccxt.ExchangeError("rejected"),
        ccxt.BadSymbol("Invalid symbol."),
        ccxt.BadRequest("bad limit"),
        ccxt.AuthenticationError("key"),
        ccxt.BadResponse("not what was expected"),
        ccxt.NotSupported("no funding on spot"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_ccxt_errors_fail_at_once_as_source_errors(clock: FakeClock, error: BaseException) -> None:
    fn, calls = failing([error])
    with pytest.raises(SourceError) as info:
        run(fn, clock)
    assert len(calls) == 1
    assert clock.sleeps == []
    assert info.value.__cause__ is error
    message = str(info.value)
    assert "binanceusdm fetch_ohlcv BTC/USDT:USDT" in message
    assert type(error).__name__ in message


def test_non_ccxt_errors_are_not_swallowed(clock: FakeClock) -> None:
    fn, _ = failing([KeyError("a bug, not an exchange failure")])
    with pytest.raises(KeyError):
        run(fn, clock)


def test_backoff_doubles_up_to_the_maximum() -> None:
    rng = MaxJitter()
    ceilings = [backoff_seconds(n, 0.5, 5.0, rng) for n in range(1, 7)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_full_jitter_stays_within_the_ceiling() -> None:
    rng = random.Random(11)
    for attempt in range(1, 12):
        delays = [backoff_seconds(attempt, 0.25, 8.0, rng) for _ in range(200)]
        ceiling = min(8.0, 0.25 * 2 ** (attempt - 1))
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.5 * ceiling  # really spread over the range, not a constant


def test_retry_after_raises_the_wait(clock: FakeClock) -> None:
    fn, _ = failing([ccxt.DDoSProtection("429"), ccxt.DDoSProtection("429")])
    assert run(fn, clock, base_seconds=0.01, max_seconds=0.05, retry_after=lambda: 7.0) == "ok"
    assert clock.sleeps == [7.0, 7.0]


def test_a_shorter_retry_after_does_not_cut_the_backoff(clock: FakeClock) -> None:
    fn, _ = failing([ccxt.RequestTimeout("t")] * 3)
    run(fn, clock, rng=MaxJitter(), base_seconds=4.0, max_seconds=16.0, retry_after=lambda: 1.0)
    assert clock.sleeps == [4.0, 8.0, 16.0]


def test_persistent_failure_ends_within_the_budget(clock: FakeClock) -> None:
    fn, calls = failing([ccxt.ExchangeNotAvailable("503 Service Temporarily Unavailable")] * 1000)
    start = clock.now
    with pytest.raises(SourceError) as info:
        run(fn, clock, max_total_seconds=10.0, base_seconds=0.5, max_seconds=4.0)
    assert clock.now - start <= 10.0
    assert sum(clock.sleeps) <= 10.0
    assert len(calls) == len(clock.sleeps) + 1
    message = str(info.value)
    assert "binanceusdm fetch_ohlcv BTC/USDT:USDT" in message
    assert f"{len(calls)} attempt(s)" in message
    assert "ExchangeNotAvailable" in message and "budget is 10 s" in message


def test_a_retry_after_beyond_the_budget_stops_at_once(clock: FakeClock) -> None:
    fn, calls = failing([ccxt.DDoSProtection("418 IP banned")] * 5)
    with pytest.raises(SourceError, match="server asked to wait 120 s"):
        run(fn, clock, max_total_seconds=30.0, retry_after=lambda: 120.0)
    assert len(calls) == 1
    assert clock.sleeps == []


def test_zero_budget_means_a_single_attempt(clock: FakeClock) -> None:
    fn, calls = failing([ccxt.NetworkError("down")])
    with pytest.raises(SourceError, match="1 attempt"):
        run(fn, clock, max_total_seconds=0.0, base_seconds=0.0, max_seconds=0.0)
    assert len(calls) == 1


def test_long_html_error_pages_are_shortened_in_the_message(clock: FakeClock) -> None:
    html = "<html><body>" + "x" * 5000 + "</body></html>"
    fn, _ = failing([ccxt.ExchangeError(html)])
    with pytest.raises(SourceError) as info:
        run(fn, clock)
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("3", 3.0), (" 1.5 ", 1.5), ("0", 0.0), (None, None), ("-2", None), ("Wed, 21 Oct 2015 07:28:00 GMT", None)],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds
