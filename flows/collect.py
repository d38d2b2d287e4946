"""Prefect flow ``collect``: live order-book snapshots every N seconds, appended to the raw store."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import params_with
from tasks.market import collect


@flow(name="collect", log_prints=True)
def collect_flow(
    params_path: str = "params.yaml",
    exchange: str | None = None,
    symbols: list[str] | None = None,
    api_url: str | None = None,
    interval_seconds: float | None = None,
    levels: int | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    params = params_with(
        params_path,
        market={
            "source": "ccxt",
            "exchanges": [exchange] if exchange else None,
            "symbols": symbols,
            "api_urls": {exchange: api_url} if (api_url and exchange) else None,
        },
        collect={"interval_seconds": interval_seconds, "levels": levels},
    )
    results = {}
    for ex in params.market.exchanges:
        results[ex] = collect(params.market, params.fetch, params.collect, ex, rounds)
    return results


if __name__ == "__main__":
    collect_flow()
