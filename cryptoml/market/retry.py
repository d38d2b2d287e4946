"""Retry an exchange call that failed for a transient network reason, within a total time budget.

Only ccxt ``NetworkError`` subclasses are retried (``DDoSProtection``, ``RateLimitExceeded``,
``ExchangeNotAvailable``, ``RequestTimeout``, plain ``NetworkError``): those say nothing about the request
itself. Every other ccxt error (``ExchangeError``, ``BadSymbol``, ``BadResponse``...) means the request is
wrong or the answer is unusable; it becomes a :class:`SourceError` at once, as does an exhausted budget.

Waits use exponential backoff with full jitter (a uniform draw in ``[0, min(max, base * 2**n)]``, which
spreads clients that failed together), raised to the server's ``Retry-After`` when it sent one. Time,
sleeping and randomness are injectable, so tests run without waiting.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import ccxt

from cryptoml.errors import SourceError

T = TypeVar("T")

_MAX_MESSAGE_CHARS = 300  # ccxt error texts can carry a whole HTML error page


def backoff_seconds(attempt: int, base_seconds: float, max_seconds: float, rng: random.Random) -> float:
    """Full-jitter delay before retry number ``attempt`` (1 = the first retry), in seconds."""
    ceiling = min(max_seconds, base_seconds * 2 ** (attempt - 1))
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given as delta-seconds; None when absent or an HTTP date."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # HTTP-date form: exchanges use seconds, so ignore rather than guess a clock
    return seconds if seconds >= 0 else None


def describe_error(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[:_MAX_MESSAGE_CHARS] + "..."
    return f"{type(error).__name__}: {text}"


def call_with_retry(
    fn: Callable[[], T],
    *,
    what: str,
    max_total_seconds: float,
    base_seconds: float,
    max_seconds: float,
    retry_after: Callable[[], float | None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying ccxt network errors with backoff; return its result.

    ``what`` names the call in error messages (exchange, method, symbol). ``max_total_seconds`` bounds the
    time from the first attempt to the start of the last one: a retry whose wait would reach it is not
    made. ``retry_after`` returns the seconds the server asked to wait (from the failed response's
    ``Retry-After`` header), or None. Raises :class:`SourceError` naming ``what``, the attempts made and
    the last error.
    """
    rng = rng if rng is not None else random.Random()
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except ccxt.NetworkError as e:
            delay = backoff_seconds(attempt, base_seconds, max_seconds, rng)
            asked = retry_after() if retry_after is not None else None
            if asked is not None:
                # The server knows when it will serve again; waiting less only earns another refusal.
                delay = max(delay, asked)
            elapsed = clock() - started
            if elapsed + delay >= max_total_seconds:
                hint = f" (server asked to wait {asked:g} s)" if asked is not None else ""
                raise SourceError(
                    f"{what}: gave up after {attempt} attempt(s) in {elapsed:.1f} s, the retry budget is "
                    f"{max_total_seconds:g} s{hint}; last error {describe_error(e)}"
                ) from e
            sleep(delay)
        except ccxt.BaseError as e:
            raise SourceError(f"{what}: {describe_error(e)}") from e
