"""The data-validation gate: great-expectations suites for stored OHLCV, funding and book datasets.

Each dataset kind has one suite built from :class:`~cryptoml.config.ValidationParams`. Checks that GE has no
single expectation for (high >= max(open, close), the timeframe grid, log-return jumps, per-snapshot best
bid < best ask, level order) are turned into *derived columns* computed with pandas, and GE expectations then
check those columns, so GE does all the checking and the reporting. Every expectation carries a readable
name in its ``meta`` (``high_ge_max_open_close``, ``ts_ms_on_timeframe_grid``...), which is what reports,
summaries and :class:`~cryptoml.errors.DataValidationError` messages show.

``import great_expectations`` costs seconds, so it happens lazily on the first validation; the ephemeral
GE context, its pandas data source and one batch definition per kind are built once per process and
reused (a validation then costs ~0.1-0.25 s: GE builds its metric graph each time).
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cryptoml.config import ValidationParams, timeframe_ms
from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.market.store import KINDS, META_PREFIX, DatasetKey, ParquetStore

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "ohlcv": ("ts_ms", "open", "high", "low", "close", "volume"),
    "funding": ("ts_ms", "funding_rate"),  # mark_price is checked only when the column is present
    "book": ("ts_ms", "side", "level", "price", "size"),
}
# Columns GE reports next to each offending value, so an example row can be found again.
_INDEX_COLUMNS: dict[str, list[str]] = {
    "ohlcv": ["ts_ms"],
    "funding": ["ts_ms"],
    "book": ["ts_ms", "side", "level"],
}
NO_ROWS = "table_has_rows"


@dataclass(frozen=True)
class ExpectationFailure:
    """One broken expectation: its readable name, the column(s) it looks at and a few offending rows.

    ``examples`` holds dicts with the row's ``ts_ms`` (epoch ms, UTC) and the checked values.
    """

    expectation: str
    column: str
    unexpected_count: int
    examples: list[dict[str, Any]]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "expectation": self.expectation,
            "description": self.description,
            "column": self.column,
            "unexpected_count": self.unexpected_count,
            "examples": [{k: _json_safe(v) for k, v in row.items()} for row in self.examples],
        }


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of one dataset's suite. ``checked`` lists every expectation name that ran."""

    dataset: str
    kind: str
    rows: int
    success: bool
    failures: list[ExpectationFailure]
    checked: list[str]
    synthetic: bool = False  # the store marked the data as generated, not recorded from an exchange
    path: str = ""

    def summary(self) -> str:
        """A readable multi-line account: dataset, each failed expectation, how many rows, examples."""
        name = self.dataset or "<frame>"
        tag = " [synthetic]" if self.synthetic else ""
        head = f"{name} ({self.kind}, {self.rows} rows){tag}"
        if self.success:
            return f"{head}: passed all {len(self.checked)} expectations"
        lines = [f"{head}: FAILED {len(self.failures)} of {max(len(self.checked), 1)} expectations"]
        for f in self.failures:
            if f.expectation == NO_ROWS:
                lines.append(f"  - {NO_ROWS}: the dataset has no rows")
                continue
            what = f" ({f.description})" if f.description else ""
            lines.append(f"  - {f.expectation}{what} on [{f.column}]: {f.unexpected_count} unexpected row(s)")
            for row in f.examples:
                lines.append(f"      e.g. {_format_example(row)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "kind": self.kind,
            "rows": self.rows,
            "success": self.success,
            "synthetic": self.synthetic,
            "path": self.path,
            "checked": list(self.checked),
            "failures": [f.to_dict() for f in self.failures],
        }


@dataclass(frozen=True)
class _Check:
    """One expectation of a suite before it becomes a GE object: name, GE class name and kwargs."""

    name: str
    description: str
    ge_class: str
    kwargs: tuple[tuple[str, Any], ...]


def _check(name: str, description: str, ge_class: str, **kwargs: Any) -> _Check:
    frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(kwargs.items()))
    return _Check(name, description, ge_class, frozen)


def _not_null(columns: Iterable[str]) -> list[_Check]:
    return [_check(f"{c}_not_null", f"{c} has no nulls", "ExpectColumnValuesToNotBeNull", column=c) for c in columns]


def _ts_checks() -> list[_Check]:
    return [
        _check("ts_ms_unique", "no duplicated timestamps", "ExpectColumnValuesToBeUnique", column="ts_ms"),
        _check(
            "ts_ms_strictly_increasing",
            "timestamps strictly increase row after row",
            "ExpectColumnValuesToBeIncreasing",
            column="ts_ms",
            strictly=True,
        ),
    ]


def _positive(column: str) -> _Check:
    return _check(
        f"{column}_gt_0", f"{column} > 0", "ExpectColumnValuesToBeBetween", column=column, min_value=0, strict_min=True
    )


def _ohlcv_checks(params: ValidationParams, with_grid: bool) -> list[_Check]:
    checks = _not_null(REQUIRED_COLUMNS["ohlcv"])
    checks += [
        _check(
            "high_ge_max_open_close",
            "high >= max(open, close)",
            "ExpectColumnPairValuesAToBeGreaterThanB",
            column_A="high",
            column_B="max_open_close",
            or_equal=True,
            ignore_row_if="either_value_is_missing",  # a null price is reported by *_not_null alone
        ),
        _check(
            "low_le_min_open_close",
            "low <= min(open, close)",
            "ExpectColumnPairValuesAToBeGreaterThanB",
            column_A="min_open_close",
            column_B="low",
            or_equal=True,
            ignore_row_if="either_value_is_missing",
        ),
        *(_positive(c) for c in ("open", "high", "low", "close")),
        _check("volume_ge_0", "volume >= 0", "ExpectColumnValuesToBeBetween", column="volume", min_value=0),
        *_ts_checks(),
        _check(
            "abs_log_return_within_max",
            f"|log(close_t / close_t-1)| <= {params.max_abs_log_return}",
            "ExpectColumnValuesToBeBetween",
            column="abs_log_return",
            max_value=params.max_abs_log_return,
        ),
    ]
    if with_grid:
        checks.append(
            _check(
                "ts_ms_on_timeframe_grid",
                "ts_ms % timeframe_ms == 0 (bar open times on the timeframe grid)",
                "ExpectColumnValuesToBeInSet",
                column="ts_grid_remainder_ms",
                value_set=[0],
            )
        )
    return checks


def _funding_checks(params: ValidationParams, with_mark: bool) -> list[_Check]:
    rate = params.max_abs_funding_rate
    checks = _not_null(REQUIRED_COLUMNS["funding"])
    checks += [
        _check(
            "funding_rate_within_max",
            f"|funding_rate| <= {rate}",
            "ExpectColumnValuesToBeBetween",
            column="funding_rate",
            min_value=-rate,
            max_value=rate,
        ),
        *_ts_checks(),
        _check(
            "ts_ms_on_funding_cadence",
            f"ts_ms within {params.funding_time_tolerance_ms} ms after a multiple of {params.funding_interval_hours}h",
            "ExpectColumnValuesToBeBetween",
            column="funding_offset_ms",
            min_value=0,
            max_value=params.funding_time_tolerance_ms,
        ),
    ]
    if with_mark:
        checks.append(_positive("mark_price"))  # GE skips NaN: a missing mark price is allowed
    return checks


def _book_checks() -> list[_Check]:
    checks = _not_null(REQUIRED_COLUMNS["book"])
    checks += [
        _check(
            "side_in_bid_ask",
            "side is 'bid' or 'ask'",
            "ExpectColumnValuesToBeInSet",
            column="side",
            value_set=["bid", "ask"],
        ),
        _positive("price"),
        _positive("size"),
        _check(
            "ts_side_level_unique",
            "one row per (ts_ms, side, level)",
            "ExpectCompoundColumnsToBeUnique",
            column_list=["ts_ms", "side", "level"],
        ),
        _check(
            "levels_contiguous_from_0",
            "levels of each snapshot side are 0..n-1",
            "ExpectColumnPairValuesToBeEqual",
            column_A="level",
            column_B="expected_level",
        ),
        _check(
            "bids_descending_by_level",
            "bid price strictly falls as level rises",
            "ExpectColumnValuesToBeBetween",
            column="bid_price_drop",
            min_value=0,
            strict_min=True,
        ),
        _check(
            "asks_ascending_by_level",
            "ask price strictly rises as level rises",
            "ExpectColumnValuesToBeBetween",
            column="ask_price_rise",
            min_value=0,
            strict_min=True,
        ),
        _check(
            "best_bid_lt_best_ask",
            "per snapshot best bid < best ask (book not crossed)",
            "ExpectColumnPairValuesAToBeGreaterThanB",
            column_A="best_ask",
            column_B="best_bid",
            ignore_row_if="either_value_is_missing",  # one row per snapshot carries the pair
        ),
    ]
    return checks


def _derive(df: pd.DataFrame, kind: str, params: ValidationParams, tf_ms: int | None) -> pd.DataFrame:
    """Copy of ``df`` plus the helper columns the suite checks (computed here, checked by GE)."""
    out = df.reset_index(drop=True).copy()
    if kind == "ohlcv":
        out["max_open_close"] = out[["open", "close"]].max(axis=1, skipna=False)
        out["min_open_close"] = out[["open", "close"]].min(axis=1, skipna=False)
        close = out["close"].astype("float64")
        with np.errstate(divide="ignore", invalid="ignore"):
            # Row order is the stored order (bar t vs the row before it); first row has no return (NaN).
            out["abs_log_return"] = np.abs(np.log(close / close.shift(1)))
        if tf_ms is not None:
            out["ts_grid_remainder_ms"] = out["ts_ms"] % tf_ms
    elif kind == "funding":
        out["funding_offset_ms"] = out["ts_ms"] % (params.funding_interval_hours * 3_600_000)
    else:
        out = out.sort_values(["ts_ms", "side", "level"], kind="stable").reset_index(drop=True)
        groups = out.groupby(["ts_ms", "side"], sort=False, dropna=False)
        out["expected_level"] = groups.cumcount().astype("int64")
        step = groups["price"].diff()  # price minus the previous (lower) level's price
        is_bid = out["side"] == "bid"
        is_ask = out["side"] == "ask"
        out["bid_price_drop"] = (-step).where(is_bid)
        out["ask_price_rise"] = step.where(is_ask)
        snap = out.groupby("ts_ms", sort=False, dropna=False)
        best_bid = out["price"].where(is_bid).groupby(out["ts_ms"], dropna=False).transform("max")
        best_ask = out["price"].where(is_ask).groupby(out["ts_ms"], dropna=False).transform("min")
        first_row = snap.cumcount() == 0
        out["best_bid"] = best_bid.where(first_row)
        out["best_ask"] = best_ask.where(first_row)
    return out


class _GxRuntime:
    """The one ephemeral GE context of this process, with one batch definition per dataset kind."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        # Progress bars would write to stderr on every validation.
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = self.context.data_sources.add_pandas(name="cryptoml")
        self.batch_definitions: dict[str, Any] = {
            kind: source.add_dataframe_asset(name=kind).add_batch_definition_whole_dataframe(f"{kind}_whole")
            for kind in KINDS
        }
        self.lock = threading.Lock()  # GE contexts are not documented as thread-safe

    def suite(self, kind: str, checks: tuple[_Check, ...]) -> Any:
        import great_expectations.expectations as gxe

        suite = self.gx.ExpectationSuite(name=f"cryptoml_{kind}")
        for c in checks:
            cls = getattr(gxe, c.ge_class)
            kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in c.kwargs}
            suite.add_expectation(cls(**kwargs, meta={"name": c.name}, description=c.description))
        return suite


_RUNTIME_LOCK = threading.Lock()
_RUNTIME: list[_GxRuntime] = []  # at most one: the process-wide GE context


def _runtime() -> _GxRuntime:
    if not _RUNTIME:
        with _RUNTIME_LOCK:  # two first callers in parallel must not build two contexts
            if not _RUNTIME:
                _RUNTIME.append(_GxRuntime())
    return _RUNTIME[0]


@functools.lru_cache(maxsize=64)
def _suite(kind: str, checks: tuple[_Check, ...]) -> Any:
    return _runtime().suite(kind, checks)


def _json_safe(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def _as_int_if_integral(value: Any) -> Any:
    """GE returns index-column values as strings ('1681755480000'); give ts_ms back as an int."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return int(f) if math.isfinite(f) and f == int(f) else f


def _format_example(row: Mapping[str, Any]) -> str:
    parts = []
    for k, v in row.items():
        if k == "ts_ms" and isinstance(v, int):
            iso = pd.Timestamp(v, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            parts.append(f"ts_ms={v} ({iso})")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def _examples(result: Mapping[str, Any], limit: int) -> list[dict[str, Any]]:
    rows = result.get("partial_unexpected_index_list") or []
    out: list[dict[str, Any]] = []
    for row in rows[:limit]:
        if isinstance(row, Mapping):
            ex = {k: (_as_int_if_integral(v) if k in ("ts_ms", "level") else _json_safe(v)) for k, v in row.items()}
            # ts_ms first: it is how a reader finds the row.
            out.append({k: ex[k] for k in sorted(ex, key=lambda k: (k != "ts_ms", k != "side", k != "level"))})
    if not out:
        out = [{"value": _json_safe(v)} for v in (result.get("partial_unexpected_list") or [])[:limit]]
    return out


def _exception_message(info: Any) -> str | None:
    """GE's ``exception_info`` is either one dict or a dict of them keyed by metric id."""
    if not isinstance(info, Mapping):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, Mapping) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _columns_of(kwargs: Mapping[str, Any]) -> str:
    if "column" in kwargs:
        return str(kwargs["column"])
    if "column_A" in kwargs:
        return f"{kwargs['column_A']}, {kwargs['column_B']}"
    return ", ".join(kwargs.get("column_list", []))


def validate_frame(
    df: pd.DataFrame, kind: str, params: ValidationParams, *, timeframe: str = "", dataset: str = ""
) -> ValidationReport:
    """Run the ``kind`` suite on ``df`` (store schema: ts_ms epoch ms UTC, float64 values).

    ``timeframe`` ('1m', '4h'...) enables the OHLCV grid check (bar open ``ts_ms % timeframe_ms == 0``);
    without it that one check is skipped (and absent from ``checked``). An empty frame fails with
    ``table_has_rows``; a frame missing a required column raises :class:`DataValidationError`.
    """
    if kind not in REQUIRED_COLUMNS:
        raise ConfigError(f"unknown dataset kind {kind!r}; expected one of {tuple(REQUIRED_COLUMNS)}")
    label = dataset or f"<{kind} frame>"
    missing = [c for c in REQUIRED_COLUMNS[kind] if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{label}: {kind} data is missing required column(s) {missing}; columns present: {list(df.columns)}"
        )
    not_numeric = [
        f"{c} ({df[c].dtype})"
        for c in REQUIRED_COLUMNS[kind]
        if c != "side" and (not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))
    ]
    if not_numeric:
        raise DataValidationError(f"{label}: {kind} column(s) must be numeric: {', '.join(not_numeric)}")
    tf_ms = timeframe_ms(timeframe) if (kind == "ohlcv" and timeframe) else None
    if kind == "ohlcv":
        checks = _ohlcv_checks(params, with_grid=tf_ms is not None)
    elif kind == "funding":
        checks = _funding_checks(params, with_mark="mark_price" in df.columns)
    else:
        checks = _book_checks()
    names = [c.name for c in checks]
    if df.empty:
        failure = ExpectationFailure(NO_ROWS, "", 0, [], "the dataset has no rows")
        return ValidationReport(dataset, kind, 0, False, [failure], [NO_ROWS, *names])

    frame = _derive(df, kind, params, tf_ms)
    runtime = _runtime()
    suite = _suite(kind, tuple(checks))
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": max(params.examples, 1),
        "unexpected_index_column_names": _INDEX_COLUMNS[kind],
    }
    with runtime.lock:
        batch = runtime.batch_definitions[kind].get_batch(batch_parameters={"dataframe": frame})
        outcome = batch.validate(suite, result_format=result_format)

    by_name = {c.name: c for c in checks}
    failures_by_name: dict[str, ExpectationFailure] = {}
    for res in outcome.results:
        config = res.expectation_config
        name = (config.meta or {}).get("name", config.type)
        if res.success:
            continue
        exc = _exception_message(res.exception_info)
        result = dict(res.result or {})
        count = int(result.get("unexpected_count") or 0)
        description = by_name[name].description if name in by_name else ""
        if exc:
            description = f"{description}; GE could not evaluate it: {exc}"
        failures_by_name[name] = ExpectationFailure(
            expectation=name,
            column=_columns_of(config.kwargs),
            unexpected_count=count,
            examples=_examples(result, params.examples),
            description=description,
        )
    failures = [failures_by_name[n] for n in names if n in failures_by_name]
    return ValidationReport(
        dataset=dataset, kind=kind, rows=len(df), success=not failures, failures=failures, checked=names
    )


def _report_for_file(path: Path, params: ValidationParams, meta: Mapping[str, str], label: str) -> ValidationReport:
    kind = meta.get("kind", "")
    df = pq.read_table(path).to_pandas()
    report = validate_frame(df, kind, params, timeframe=meta.get("timeframe", ""), dataset=label)
    return replace(report, synthetic=meta.get("synthetic", "").lower() == "true", path=str(path))


def validate_store(
    store: ParquetStore, params: ValidationParams, keys: Iterable[DatasetKey] | None = None
) -> list[ValidationReport]:
    """Validate every dataset of ``store`` (or only ``keys``), in key order. Missing keys raise."""
    reports = []
    for key in list(store.datasets()) if keys is None else list(keys):
        meta = store.metadata(key) if store.exists(key) else {}
        if not meta:
            raise DataValidationError(f"no stored data for {key.label()} (expected {store.path(key)})")
        meta = {**meta, "kind": key.kind, "timeframe": key.timeframe}
        reports.append(_report_for_file(store.path(key), params, meta, key.label()))
    return reports


def _file_metadata(path: Path) -> dict[str, str]:
    try:
        raw = pq.read_schema(path).metadata or {}
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise DataValidationError(f"{path}: not a readable Parquet file: {e}") from e
    return {k.decode()[len(META_PREFIX) :]: v.decode() for k, v in raw.items() if k.decode().startswith(META_PREFIX)}


def validate_path(path: Path, params: ValidationParams) -> list[ValidationReport]:
    """Validate one Parquet file written by the store, or every dataset under a store root directory.

    A file's kind and timeframe come from its ``cryptoml.*`` schema metadata; a file without it, or a
    directory holding no store datasets, raises :class:`DataValidationError`.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory to validate")
    if path.is_dir():
        reports = validate_store(ParquetStore(path), params)
        if not reports:
            raise DataValidationError(f"{path}: no datasets written by the store under this directory")
        return reports
    meta = _file_metadata(path)
    if meta.get("kind") not in KINDS:
        raise DataValidationError(
            f"{path}: no 'cryptoml.kind' metadata (not written by ParquetStore); cannot tell the dataset kind"
        )
    parts = [meta.get("exchange", ""), meta.get("symbol", ""), meta["kind"], meta.get("timeframe", "")]
    label = " ".join(p for p in parts if p) or path.name
    return [_report_for_file(path, params, meta, label)]


def write_report(reports: list[ValidationReport], path: Path) -> Path:
    """Write the gate's JSON report atomically (temp file + ``os.replace``); returns ``path``.

    Layout: ``{"success": bool, "datasets": n, "failed": n, "synthetic": n, "results": [report...]}``;
    no timestamps, so the same data gives the same bytes (DVC-friendly).
    """
    path = Path(path)
    doc = {
        "success": all(r.success for r in reports),
        "datasets": len(reports),
        "failed": sum(not r.success for r in reports),
        "synthetic": sum(r.synthetic for r in reports),
        "results": [r.to_dict() for r in reports],
    }
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def raise_on_failure(reports: list[ValidationReport], report_path: Path | None = None) -> None:
    """Raise :class:`DataValidationError` summarising every failing dataset; do nothing if all passed."""
    failing = [r for r in reports if not r.success]
    if not failing:
        return
    where = f" (full report: {report_path})" if report_path is not None else ""
    head = f"data validation failed for {len(failing)} of {len(reports)} dataset(s){where}"
    raise DataValidationError("\n".join([head, *(r.summary() for r in failing)]))
