"""Prefect flow ``backfill``: fill ``data/raw`` from the synthetic market, an exchange through ccxt, or a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import params_with
from tasks.market import backfill_from_exchange, backfill_from_file, backfill_synthetic, write_report


@flow(name="backfill", log_prints=True)
def backfill_flow(
    params_path: str = "params.yaml",
    source: str | None = None,
    exchanges: list[str] | None = None,
    symbols: list[str] | None = None,
    timeframe: str | None = None,
    since: str | None = None,
    until: str | None = None,
    kinds: list[str] | None = None,
    api_url: str | None = None,
    data_dir: str | None = None,
    path: str | None = None,
    mapping: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One task per exchange x symbol x kind (ccxt), one for the synthetic market, one per imported file."""
    api_urls = {ex: api_url for ex in (exchanges or [])} if api_url else None
    params = params_with(
        params_path,
        market={
            "source": source,
            "exchanges": exchanges,
            "symbols": symbols,
            "timeframe": timeframe,
            "since": since,
            "until": until,
            "kinds": kinds,
            "api_urls": api_urls,
            "data_dir": data_dir,
        },
    )
    market = params.market
    if market.source == "synthetic":
        results = backfill_synthetic(params.synthetic, market.data_dir)
    elif market.source == "files":
        if not path:
            from cryptoml.errors import ConfigError

            raise ConfigError("--source files needs --path FILE")
        kind = "funding" if market.kinds == ("funding",) else "ohlcv"
        results = [
            backfill_from_file(
                path, market.data_dir, market.exchanges[0], market.symbols[0], kind, market.timeframe, mapping or {}
            )
        ]
    else:
        futures = [
            backfill_from_exchange.submit(market, params.fetch, exchange, symbol, kind)
            for exchange in market.exchanges
            for symbol in market.symbols
            for kind in market.kinds
        ]
        results = [f.result() for f in futures]
    report = str(Path(market.reports_dir) / "backfill.json")
    write_report(results, report, market.source)
    return {"source": market.source, "data_dir": market.data_dir, "report": report, "datasets": results}


if __name__ == "__main__":
    backfill_flow()
