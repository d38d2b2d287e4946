"""A configured ccxt client for any exchange id, re-pointable at another base URL; pandas-free.

Shared by the backfill (:mod:`cryptoml.market.ccxt_source`) and the edge runner, which must not import
pandas. The exchange class comes from :func:`cryptoml.market.lean_ccxt.exchange_class`: only that
exchange's module is loaded when the process prepared a lean ccxt first (``cryptoml live`` does).
``api_url`` re-points an exchange's whole REST API at another base URL (testnet, proxy, the local stub
exchange of the tests), keeping each endpoint's path. A 2xx answer whose body is not valid JSON is a
transport fault (:class:`TruncatedResponse`, a ccxt ``NetworkError``), never an empty result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import ccxt

from cryptoml.errors import ConfigError
from cryptoml.market.lean_ccxt import exchange_class

__all__ = ["DEFAULT_OPTIONS", "TruncatedResponse", "make_exchange", "rebase_url"]

# Per-exchange ccxt options: load only the market types the backfill uses (Bybit would otherwise also
# fetch option chains, several slow requests per load).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "bybit": {"fetchMarkets": {"types": ["spot", "linear"]}},
}
# urls entries that hold API base URLs (a string or a dict of them).
_API_URL_KEYS = ("api", "test", "demo", "demotrading", "apiBackup")


class TruncatedResponse(ccxt.NetworkError):
    """A 2xx answer whose body is not valid JSON (cut short on the way): a transport fault, so retried.

    ccxt would otherwise hand such a body on as text, and its parsers read it as an empty result.
    """


class _StrictJson:
    """ccxt exchange mixin: refuse a successful HTTP answer whose body is not valid JSON."""

    id: str

    def on_rest_response(
        self,
        code: int,
        reason: str,
        url: str,
        method: str,
        response_headers: Any,
        response_body: str,
        request_headers: Any,
        request_body: Any,
    ) -> str:
        body: str = super().on_rest_response(  # type: ignore[misc]
            code, reason, url, method, response_headers, response_body, request_headers, request_body
        )
        if 200 <= int(code) < 300:
            try:
                json.loads(body)
            except ValueError:
                raise TruncatedResponse(
                    f"{self.id} {method} {url}: HTTP {code} with a body that is not valid JSON "
                    f"({len(body)} chars, truncated?)"
                ) from None
        return body


def rebase_url(url: str, api_url: str) -> str:
    """``https://fapi.binance.com/fapi/v1`` + ``http://127.0.0.1:8765`` -> ``http://127.0.0.1:8765/fapi/v1``."""
    # ccxt templates hosts as "{hostname}": only the path survives, so the placeholder can go.
    path = urlsplit(url.replace("{hostname}", "hostname")).path
    return api_url.rstrip("/") + path


def _rebase_urls(value: Any, api_url: str) -> Any:
    if isinstance(value, str):
        return rebase_url(value, api_url) if "://" in value else value
    if isinstance(value, dict):
        return {k: _rebase_urls(v, api_url) for k, v in value.items()}
    return value


def make_exchange(
    exchange_id: str,
    *,
    api_url: str | None = None,
    timeout_ms: int = 10_000,
    rate_limit_ms: int = 0,
    options: Mapping[str, Any] | None = None,
) -> ccxt.Exchange:
    """A configured synchronous ccxt client for ``exchange_id`` (public endpoints only, no keys).

    ``api_url`` re-points every API base URL (``urls['api']`` and the test/demo ones) at that base, keeping
    paths. ``timeout_ms`` is the per-request HTTP timeout. ccxt's own rate limiter stays on;
    ``rate_limit_ms > 0`` replaces the exchange's default milliseconds between requests. ``options`` are
    merged over :data:`DEFAULT_OPTIONS`. Raises :class:`ConfigError` for an unknown id or bad values.
    """
    base = exchange_class(exchange_id)  # raises ConfigError for an unknown id
    if timeout_ms <= 0:
        raise ConfigError(f"timeout_ms must be > 0, got {timeout_ms}")
    if rate_limit_ms < 0:
        raise ConfigError(f"rate_limit_ms must be >= 0, got {rate_limit_ms}")
    if api_url is not None and not urlsplit(api_url).netloc:
        raise ConfigError(f"api url for {exchange_id!r} must look like http://host:port, got {api_url!r}")
    merged = {**DEFAULT_OPTIONS.get(exchange_id, {}), **(options or {})}
    strict = type(base.__name__, (_StrictJson, base), {})
    exchange: ccxt.Exchange = strict({"enableRateLimit": True, "timeout": timeout_ms, "options": merged})
    if rate_limit_ms > 0:
        exchange.rateLimit = rate_limit_ms
    if api_url is not None:
        for key in _API_URL_KEYS:
            if key in exchange.urls:
                exchange.urls[key] = _rebase_urls(exchange.urls[key], api_url)
    return exchange
