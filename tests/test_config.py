"""params.yaml loading: defaults, strict keys with suggestions, invalid values."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptoml.config import Params, load_params, params_from_dict, parse_utc_ms, replace_section, timeframe_ms
from cryptoml.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_loads_and_matches_defaults_where_unset() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.market.source == "synthetic"
    assert params.simulate.hold_hours == (1, 4, 8, 12, 24, 48, 72, 120, 168)


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_params(tmp_path / "nope.yaml") == Params()


def test_params_are_frozen() -> None:
    params = Params()
    with pytest.raises(AttributeError):
        params.market.timeframe = "5m"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"market": {"symbls": ["BTC/USDT"]}}, "'market.symbls'; did you mean 'market.symbols'"),
        ({"markt": {}}, "'markt'; did you mean 'market'"),
        ({"fetch": {"page_limt": 5}}, "did you mean 'fetch.page_limit'"),
    ],
)
def test_unknown_key_names_key_and_closest(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        params_from_dict(data)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"market": {"symbols": []}}, "symbol list is empty"),
        ({"market": {"source": "ccxt", "exchanges": ["binanceusd"]}}, "unknown ccxt exchange id 'binanceusd'"),
        ({"market": {"source": "carrier-pigeon"}}, "market.source"),
        ({"market": {"timeframe": "-5m"}}, "invalid timeframe"),
        ({"market": {"since": "2024-02-01", "until": "2024-01-01"}}, "must be before"),
        ({"synthetic": {"days": -3}}, "synthetic.days must be > 0"),
        ({"collect": {"interval_seconds": -1}}, "collect.interval_seconds"),
        ({"fetch": {"max_retry_seconds": -1}}, "fetch.max_retry_seconds"),
        ({"simulate": {"hold_hours": [4, -8]}}, "hold_hours must all be > 0"),
        ({"fetch": {"page_limit": "many"}}, "expected an integer"),
        ({"market": {"symbols": "BTC/USDT"}}, "expected a list"),
    ],
)
def test_invalid_values_raise_config_error(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        params_from_dict(data)


def test_ccxt_exchange_ids_are_checked_only_for_the_ccxt_source() -> None:
    # The synthetic market's venue names need not be ccxt ids.
    params_from_dict({"market": {"exchanges": ["my-venue"]}})
    with pytest.raises(ConfigError):
        params_from_dict({"market": {"source": "ccxt", "exchanges": ["my-venue"]}})


def test_replace_section_revalidates() -> None:
    params = Params()
    changed = replace_section(params, "market", timeframe="5m", symbols=None)
    assert changed.market.timeframe == "5m"
    assert changed.market.symbols == params.market.symbols
    with pytest.raises(ConfigError):
        replace_section(params, "market", symbols=[])


def test_time_helpers() -> None:
    assert timeframe_ms("1m") == 60_000
    assert timeframe_ms("4h") == 4 * 3_600_000
    assert parse_utc_ms("2022-01-01T00:00") == 1_640_995_200_000
    assert parse_utc_ms("2022-01-01T01:00+01:00") == 1_640_995_200_000
    with pytest.raises(ConfigError, match="not an ISO-8601"):
        parse_utc_ms("yesterday")
