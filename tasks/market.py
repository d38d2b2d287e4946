"""Prefect tasks of the market-data layer: backfill (synthetic / ccxt / files), validation, collection.

Each task does its IO and one call into ``cryptoml.market``; the flows in ``flows/`` wire them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task

from cryptoml.config import CollectParams, FetchParams, MarketParams, SyntheticParams, ValidationParams
from cryptoml.market.backfill import BackfillResult, backfill_funding, backfill_ohlcv, write_backfill_report
from cryptoml.market.store import DatasetKey, ParquetStore
from tasks.progress import track

log = logging.getLogger("cryptoml")

_sources: dict[tuple[Any, ...], Any] = {}


def ccxt_source(fetch: FetchParams, api_urls: dict[str, str]) -> Any:
    """One CcxtSource per process and settings, so tasks share each exchange's rate limiter."""
    from cryptoml.market.ccxt_source import CcxtSource

    key = (fetch, tuple(sorted(api_urls.items())))
    if key not in _sources:
        _sources[key] = CcxtSource(fetch, api_urls=api_urls)
    return _sources[key]


@task(name="backfill-synthetic")
def backfill_synthetic(synthetic: SyntheticParams, data_dir: str) -> list[dict[str, Any]]:
    """Write the embedded seeded market (replaces the files: same seed -> same bytes)."""
    from cryptoml.market.synthetic import write_market

    store = ParquetStore(data_dir)
    advance = track("synthetic market", total=None)
    paths = write_market(synthetic, store)
    advance(len(paths))
    log.info("SYNTHETIC market (seed %s) written: %d files under %s", synthetic.seed, len(paths), data_dir)
    out = []
    for key in store.datasets():
        rows = len(store.read(key))
        out.append(BackfillResult(key, str(store.path(key)), rows, rows, "synthetic").to_dict())
    return out


@task(name="backfill-ccxt")
def backfill_from_exchange(
    market: MarketParams, fetch: FetchParams, exchange: str, symbol: str, kind: str
) -> dict[str, Any]:
    """Fetch one exchange x symbol x kind incrementally into the store."""
    store = ParquetStore(market.data_dir)
    source = ccxt_source(fetch, dict(market.api_urls))
    advance = track(f"{exchange} {symbol} {kind}")
    if kind == "ohlcv":
        result = backfill_ohlcv(
            source,
            store,
            exchange,
            symbol,
            market.timeframe,
            market.since_ms,
            market.until_ms,
            flush_every_pages=fetch.flush_every_pages,
            on_page=advance,
        )
    elif kind == "funding":
        result = backfill_funding(
            source,
            store,
            exchange,
            symbol,
            market.since_ms,
            market.until_ms,
            flush_every_pages=fetch.flush_every_pages,
            on_page=advance,
        )
    else:
        frame = source.fetch_book(exchange, symbol, fetch.book_levels)
        key = DatasetKey(exchange, symbol, "book")
        path = store.append(key, frame, {"source": "ccxt"})
        result = BackfillResult(key, str(path), len(frame), len(store.read(key)), "ccxt")
    if result.missing_bars:
        log.warning(
            "%s: %d candles missing in %d gaps (not filled)", result.key.label(), result.missing_bars, len(result.gaps)
        )
    log.info("%s: +%d rows, %d stored", result.key.label(), result.rows_added, result.rows_total)
    return result.to_dict()


@task(name="backfill-files")
def backfill_from_file(
    path: str, data_dir: str, exchange: str, symbol: str, kind: str, timeframe: str, mapping: dict[str, str]
) -> dict[str, Any]:
    """Import one CSV / Parquet / Feather file of candles or funding rates into the store."""
    from cryptoml.market.files import import_funding, import_ohlcv

    store = ParquetStore(data_dir)
    if kind == "funding":
        frame = import_funding(Path(path), mapping=mapping or None, symbol=symbol)
        key = DatasetKey(exchange, symbol, "funding")
    else:
        frame = import_ohlcv(Path(path), mapping=mapping or None, symbol=symbol, timeframe=timeframe)
        key = DatasetKey(exchange, symbol, "ohlcv", timeframe)
    written = store.append(key, frame, {"source": "files", "imported_from": Path(path).name})
    rows = len(store.read(key))
    log.info("%s: imported %d rows from %s (%d stored)", key.label(), len(frame), path, rows)
    return BackfillResult(key, str(written), len(frame), rows, "files").to_dict()


@task(name="write-backfill-report")
def write_report(results: list[dict[str, Any]], path: str, source: str) -> str:
    items = [_result_from_dict(r) for r in results]
    write_backfill_report(items, Path(path), {"source": source, "synthetic": source == "synthetic"})
    return path


def _result_from_dict(d: dict[str, Any]) -> BackfillResult:
    from cryptoml.market.backfill import Gap

    key = DatasetKey(d["exchange"], d["symbol"], d["kind"], d["timeframe"])
    gaps = [Gap(**g) for g in d["gaps"]]
    return BackfillResult(key, d["path"], d["rows_added"], d["rows_total"], d["source"], gaps)


@task(name="validate-store")
def validate_data(target: str, validation: ValidationParams, report_path: str) -> dict[str, Any]:
    """Run the great-expectations gate on a store folder or one file; raise on any failure."""
    from cryptoml.market.validation import raise_on_failure, validate_path, write_report

    reports = validate_path(Path(target), validation)
    write_report(reports, Path(report_path))
    raise_on_failure(reports, Path(report_path))
    rows = sum(r.rows for r in reports)
    log.info("validation passed: %d datasets, %d rows; report %s", len(reports), rows, report_path)
    return {"datasets": len(reports), "rows": rows, "report": report_path}


@task(name="collect-books")
def collect(
    market: MarketParams, fetch: FetchParams, collect_params: CollectParams, exchange: str, rounds: int | None
) -> dict[str, Any]:
    """Poll top-N order books every ``interval_seconds`` and append them to the store."""
    from cryptoml.market.collect import collect_books

    source = ccxt_source(fetch, dict(market.api_urls))
    result = collect_books(
        source,
        ParquetStore(market.data_dir),
        exchange,
        list(market.symbols),
        levels=collect_params.levels,
        interval_seconds=collect_params.interval_seconds,
        rounds=rounds,
        on_round=track(f"books {exchange}", total=rounds),
    )
    return {"rounds": result.rounds, "snapshots": result.snapshots, "failures": result.failures}
