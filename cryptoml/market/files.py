"""The ``files`` source: import candles and funding rates from CSV / Parquet / Feather into the store schema.

Known layouts are recognised without a mapping (see :func:`detect_layout`): the store's own (``ts_ms``),
freqtrade's (``date`` + open/high/low/close/volume; its funding feather keeps the rate in ``open``, so pass
``mapping={"funding_rate": "open"}``), Binance/OctoBot exports with ``open_time``, ccxt's (``timestamp``,
``fundingRate``, ``markPrice``) and funding tables with ``funding_time_ms`` / ``funding_time``. Anything
else needs a mapping ``{store column: file column}`` (``{"ts_ms": "timestamp", "volume": "vol"}``).
Files holding several symbols (a ``symbol`` or ``pair`` column) must be filtered with ``symbol=``.

Time columns become ``ts_ms`` (UTC epoch milliseconds) by this rule:

- datetime values: tz-aware ones are converted to UTC, naive ones are taken as UTC;
- strings: numeric strings are treated as numbers (below), others parsed as ISO-8601 (naive = UTC);
- numbers, by the magnitude of the largest absolute value: < 1e11 -> epoch seconds, < 1e14 -> epoch
  milliseconds, < 1e17 -> epoch microseconds (Tardis), otherwise epoch nanoseconds. (1e11 s is the year
  5138 and 1e11 ms is 1973-03-03, so no real market data sits on the wrong side of a boundary.)

For candles ``ts_ms`` is the bar **open** time, as in every supported layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from cryptoml.config import timeframe_ms
from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.market.store import SCHEMAS

OHLCV_VALUES = ("open", "high", "low", "close", "volume")
# Candidate file columns for each store column, in order of preference.
TIME_CANDIDATES: dict[str, tuple[str, ...]] = {
    "ohlcv": ("ts_ms", "date", "open_time", "timestamp", "datetime", "time"),
    "funding": ("ts_ms", "funding_time_ms", "fundingTime", "funding_time", "timestamp", "date", "datetime", "time"),
}
FUNDING_RATE_CANDIDATES = ("funding_rate", "fundingRate")
MARK_PRICE_CANDIDATES = ("mark_price", "markPrice")
SYMBOL_CANDIDATES = ("symbol", "pair")
_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".feather")


def read_table_file(path: Path) -> pd.DataFrame:
    """Read a table by its suffix: ``.csv`` / ``.csv.gz``, ``.parquet``, ``.feather``."""
    path = Path(path)
    name = path.name.lower()
    if not any(name.endswith(s) for s in _SUFFIXES):
        raise ConfigError(f"{path}: unsupported file type; expected one of {', '.join(_SUFFIXES)}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        if name.endswith((".csv", ".csv.gz")):
            return pd.read_csv(path)
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        return pd.read_feather(path)
    except (OSError, ValueError) as e:
        raise DataValidationError(f"{path}: cannot read the file: {e}") from e


def detect_layout(df: pd.DataFrame) -> str:
    """Name of the known layout ``df`` matches (for messages), or ``'unknown'``."""
    cols = set(df.columns)
    has_ohlcv = set(OHLCV_VALUES) <= cols
    if "funding_time_ms" in cols or "funding_time" in cols:
        return "funding table (funding_time_ms / funding_time + funding_rate)"
    if "fundingRate" in cols:
        return "ccxt funding history (timestamp + fundingRate)"
    if "ts_ms" in cols:
        return "cryptoml store (ts_ms)"
    if "date" in cols and has_ohlcv:
        multi = " + symbol column" if cols & set(SYMBOL_CANDIDATES) else ""
        return f"freqtrade candles (date + open/high/low/close/volume{multi})"
    if "open_time" in cols and has_ohlcv:
        multi = " + symbol column" if cols & set(SYMBOL_CANDIDATES) else ""
        return f"exchange export (open_time + open/high/low/close/volume{multi})"
    if "timestamp" in cols and has_ohlcv:
        return "ccxt candles (timestamp + open/high/low/close/volume)"
    return "unknown"


def _magnitude_unit_ms(max_abs: float) -> float:
    """Milliseconds per unit of an epoch number, chosen by magnitude (see the module docstring)."""
    if max_abs < 1e11:
        return 1_000.0  # seconds
    if max_abs < 1e14:
        return 1.0  # milliseconds
    if max_abs < 1e17:
        return 1e-3  # microseconds
    return 1e-6  # nanoseconds


def to_epoch_ms(values: pd.Series, column: str = "time") -> pd.Series:
    """Any supported time column -> int64 UTC epoch milliseconds (rule in the module docstring)."""
    s = values
    if s.isna().any():
        raise DataValidationError(f"time column {column!r} has {int(s.isna().sum())} null value(s)")
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s.astype("datetime64[ms]").astype("int64").rename(None)
    if pd.api.types.is_bool_dtype(s.dtype):
        raise DataValidationError(f"time column {column!r} holds booleans, not times")
    numeric = s if pd.api.types.is_numeric_dtype(s.dtype) else pd.to_numeric(s, errors="coerce")
    if numeric.notna().all():
        as_float = numeric.astype("float64")
        per_unit = _magnitude_unit_ms(float(np.abs(as_float).max()) if len(as_float) else 0.0)
        return (as_float * per_unit).round().astype("int64").rename(None)
    parsed = pd.to_datetime(s.astype(str), utc=True, format="ISO8601", errors="coerce")
    if parsed.isna().any():
        bad = s[parsed.isna()].iloc[0]
        raise DataValidationError(f"time column {column!r}: {bad!r} is neither an epoch number nor an ISO-8601 time")
    return parsed.dt.tz_localize(None).astype("datetime64[ms]").astype("int64").rename(None)


def symbol_key(symbol: str) -> str:
    """Exchange-agnostic comparison key: ``XRP/USDT:USDT`` and ``XRPUSDT`` -> ``XRPUSDT``.

    Drops a ccxt settle suffix (``:USDT``), Binance COIN-M's ``_PERP``, and the separators ``/ - _``.
    """
    s = str(symbol).upper().split(":", 1)[0]
    s = s.removesuffix("_PERP")
    return s.replace("/", "").replace("-", "").replace("_", "")


def _check_mapping(mapping: Mapping[str, str] | None, kind: str, df: pd.DataFrame, path: Path) -> dict[str, str]:
    allowed = [*SCHEMAS[kind].names, "symbol"]
    out = dict(mapping or {})
    for store_col, file_col in out.items():
        if store_col not in allowed:
            raise ConfigError(f"{path}: mapping key {store_col!r} is not a {kind} store column; use one of {allowed}")
        if file_col not in df.columns:
            raise ConfigError(
                f"{path}: mapping {store_col!r} -> {file_col!r}, but the file has no column {file_col!r}; "
                f"columns present: {list(df.columns)}"
            )
    return out


def _pick(df: pd.DataFrame, mapping: Mapping[str, str], store_col: str, candidates: tuple[str, ...]) -> str | None:
    if store_col in mapping:
        return mapping[store_col]
    return next((c for c in candidates if c in df.columns), None)


def _filter_symbol(
    df: pd.DataFrame, mapping: Mapping[str, str], symbol: str | None, path: Path
) -> tuple[pd.DataFrame, str | None]:
    """Rows of ``symbol`` in a multi-symbol file; a single-symbol file passes through."""
    col = _pick(df, mapping, "symbol", SYMBOL_CANDIDATES)
    if col is None:
        return df, None
    present = [str(s) for s in pd.unique(df[col].dropna())]
    if symbol is None:
        if len(present) > 1:
            raise ConfigError(
                f"{path}: the file holds {len(present)} symbols in column {col!r}; choose one with symbol= "
                f"(present: {', '.join(sorted(present))})"
            )
        return df, col
    exact = df[col] == symbol
    if not exact.any():
        wanted = symbol_key(symbol)
        exact = df[col].map(lambda s: symbol_key(s) == wanted if isinstance(s, str) else False).astype(bool)
    if not exact.any():
        raise ConfigError(
            f"{path}: no rows for symbol {symbol!r} in column {col!r}; present: {', '.join(sorted(present))}"
        )
    return df[exact], col


def _require(path: Path, layout: str, df: pd.DataFrame, missing: list[str], hint: str = "") -> None:
    if missing:
        raise DataValidationError(
            f"{path}: cannot find {', '.join(missing)} (layout: {layout}); columns present: {list(df.columns)}. "
            f"Pass mapping={{store column: file column}}{hint}"
        )


def _numeric(df: pd.DataFrame, column: str, path: Path) -> pd.Series:
    try:
        return pd.to_numeric(df[column], errors="raise").astype("float64")
    except (ValueError, TypeError) as e:
        raise DataValidationError(f"{path}: column {column!r} is not numeric: {e}") from e


def _format_ms(ms: int) -> str:
    for unit, size in (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms} ms"


def check_spacing(ts_ms: pd.Series, timeframe: str, path: Path) -> None:
    """Raise ConfigError unless the modal spacing of ``ts_ms`` equals ``timeframe`` (needs >= 2 rows)."""
    want = timeframe_ms(timeframe)
    steps = ts_ms.sort_values().diff().dropna()
    steps = steps[steps > 0]
    if steps.empty:
        return
    modal = int(steps.mode().iloc[0])
    if modal != want:
        raise ConfigError(
            f"{path}: timeframe {timeframe!r} ({want} ms) was asked but the bars are {_format_ms(modal)} apart "
            f"({modal} ms, the most common spacing)"
        )


def import_ohlcv(
    path: Path,
    *,
    mapping: Mapping[str, str] | None = None,
    symbol: str | None = None,
    timeframe: str | None = None,
) -> pd.DataFrame:
    """Candles from a file -> store-schema frame (ts_ms bar open UTC ms, float64 OHLCV), sorted by ts_ms.

    ``symbol`` filters a multi-symbol file (``ETH/BTC``, ``ETHBTC`` and ``ETH/BTC:BTC`` all match).
    ``timeframe`` ('1m', '4h'...), when given, must equal the data's most common bar spacing.
    """
    path = Path(path)
    raw = read_table_file(path)
    layout = detect_layout(raw)
    cols = _check_mapping(mapping, "ohlcv", raw, path)
    df, _ = _filter_symbol(raw, cols, symbol, path)
    time_col = _pick(df, cols, "ts_ms", TIME_CANDIDATES["ohlcv"])
    value_cols = {c: _pick(df, cols, c, (c,)) for c in OHLCV_VALUES}
    missing = [] if time_col else [f"a time column (one of {TIME_CANDIDATES['ohlcv']})"]
    missing += [c for c, found in value_cols.items() if found is None]
    _require(path, layout, raw, missing)
    assert time_col is not None
    out = pd.DataFrame({"ts_ms": to_epoch_ms(df[time_col], time_col).to_numpy()})
    for c, found in value_cols.items():
        assert found is not None
        out[c] = _numeric(df, found, path).to_numpy()
    out = out.sort_values("ts_ms", kind="stable").reset_index(drop=True)
    if timeframe:
        check_spacing(out["ts_ms"], timeframe, path)
    return out[SCHEMAS["ohlcv"].names]


def import_funding(path: Path, *, mapping: Mapping[str, str] | None = None, symbol: str | None = None) -> pd.DataFrame:
    """Funding rates from a file -> store-schema frame (ts_ms funding time UTC ms, funding_rate as a
    fraction per interval, mark_price or NaN), sorted by ts_ms.

    ``symbol`` may be the exchange id (``XRPUSDT``) or the unified one (``XRP/USDT:USDT``).
    """
    path = Path(path)
    raw = read_table_file(path)
    layout = detect_layout(raw)
    cols = _check_mapping(mapping, "funding", raw, path)
    df, _ = _filter_symbol(raw, cols, symbol, path)
    time_col = _pick(df, cols, "ts_ms", TIME_CANDIDATES["funding"])
    rate_col = _pick(df, cols, "funding_rate", FUNDING_RATE_CANDIDATES)
    mark_col = _pick(df, cols, "mark_price", MARK_PRICE_CANDIDATES)
    missing = [] if time_col else [f"a time column (one of {TIME_CANDIDATES['funding']})"]
    if rate_col is None:
        missing.append(f"a funding rate column (one of {FUNDING_RATE_CANDIDATES})")
    hint = ""
    if rate_col is None and set(OHLCV_VALUES) & set(raw.columns):
        hint = '; a freqtrade funding-rate file keeps the rate in "open": mapping={"funding_rate": "open"}'
    _require(path, layout, raw, missing, hint)
    assert time_col is not None and rate_col is not None
    out = pd.DataFrame(
        {
            "ts_ms": to_epoch_ms(df[time_col], time_col).to_numpy(),
            "funding_rate": _numeric(df, rate_col, path).to_numpy(),
            "mark_price": _numeric(df, mark_col, path).to_numpy() if mark_col else np.nan,
        }
    )
    return out.sort_values("ts_ms", kind="stable").reset_index(drop=True)[SCHEMAS["funding"].names]
