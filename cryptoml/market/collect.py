"""Live order-book collection: top-N snapshots every N seconds, appended to the store.

Snapshots are buffered and merged into the store every ``flush_every`` rounds (one atomic write), so a
crash loses at most that many rounds and never leaves a half-written file. A symbol whose fetch fails
(retries exhausted) is skipped for that round; ``max_consecutive_failures`` failed rounds in a row stop
the collector with the last error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from cryptoml.errors import SourceError
from cryptoml.market.backfill import PagedSource
from cryptoml.market.store import DatasetKey, ParquetStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectResult:
    rounds: int
    snapshots: int
    failures: int


def collect_books(
    source: PagedSource,
    store: ParquetStore,
    exchange: str,
    symbols: Sequence[str],
    *,
    levels: int,
    interval_seconds: float,
    rounds: int | None = None,
    flush_every: int = 6,
    max_consecutive_failures: int = 30,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_round: Callable[[int], None] | None = None,
) -> CollectResult:
    """Collect ``rounds`` rounds (forever when None) of one book snapshot per symbol."""
    buffers: dict[str, list[pd.DataFrame]] = {s: [] for s in symbols}
    done = snapshots = failures = consecutive = 0

    def flush() -> None:
        for symbol, frames in buffers.items():
            if frames:
                store.append(
                    DatasetKey(exchange, symbol, "book"), pd.concat(frames, ignore_index=True), {"source": source.name}
                )
                frames.clear()

    next_tick = clock()
    try:
        while rounds is None or done < rounds:
            round_failed = False
            for symbol in symbols:
                try:
                    buffers[symbol].append(source.fetch_book(exchange, symbol, levels))
                    snapshots += 1
                except SourceError as e:
                    failures += 1
                    round_failed = True
                    log.warning("book %s %s skipped this round: %s", exchange, symbol, e)
            consecutive = consecutive + 1 if round_failed else 0
            if consecutive >= max_consecutive_failures:
                raise SourceError(f"order-book collection on {exchange} failed {consecutive} rounds in a row")
            done += 1
            if on_round is not None:
                on_round(1)
            if done % flush_every == 0:
                flush()
            next_tick += interval_seconds
            if rounds is None or done < rounds:
                sleep(max(0.0, next_tick - clock()))
    finally:
        flush()
    return CollectResult(rounds=done, snapshots=snapshots, failures=failures)
