"""The edge runner's crash-safe state: one SQLite file that a SIGKILL at any moment cannot leave half-written.

Standard library ``sqlite3`` + ``json`` + numpy only (it runs on a Raspberry Pi).

**Unit of work = one closed bar.** :meth:`StateStore.commit_bar` writes everything a bar produced (the
portfolio snapshot, every decision, every prediction, the fills, the bar's metrics and the realised
returns that the bar labels) in one ``BEGIN IMMEDIATE ... COMMIT`` transaction, so after a crash a bar is
either fully present or fully absent. ``bar_ts_ms`` is the **open** time (UTC epoch ms) of the closed bar
that was processed, as everywhere in the project. Restart protocol for the runner: ``load_latest()`` gives
the last committed snapshot (broker and strategy state decoded from JSON), processing resumes at the bar
after ``last_bar_ts_ms()``; client order ids derived from the bar make re-sent orders idempotent and
``has_fill()`` tells whether a fill is already booked.

**Idempotent.** Each committed bar stores ``record_sha256``, a digest of the bar's canonical content.
Re-committing a bar with the same content changes nothing and returns ``False``; with different content
(the replay diverged) it raises :class:`~cryptoml.errors.DataValidationError`, because silently keeping
either version would hide a bug. The same rule holds row by row for keys that can be written from
several places: a fill's ``client_order_id``, a metric's ``(ts_ms, name)``, a prediction's realised
return: identical again is a no-op, different is an error. A bar older than the last committed one is
refused (the snapshot table is a time series).

**Tables** (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`, ``PRAGMA application_id`` =
:data:`APPLICATION_ID` marks the file as ours):

- ``portfolio_state``: one row per processed bar (cash, equity, position, PnL in quote currency, the
  broker's and the strategy's state as JSON, ``record_sha256``, and ``updated_ms``, the wall-clock commit
  time, which is informational only and left out of every comparison).
- ``trade_history``: fills, ``client_order_id`` unique, with the bar whose commit booked them.
- ``trade_decisions``: every decision with its reason and model version; unique per
  ``(bar_ts_ms, symbol, source, slot)``. ``source`` (not in the issue's sketch) tells apart deciders that
  share a bar and a symbol: the price strategy, the ONNX opportunity scorer and the rule-based scorer.
- ``performance_metrics``: ``(ts_ms, name) -> value``; a bar's metrics are stamped with its ``bar_ts_ms``.
- ``predictions``: per bar, symbol, model and slot (``champion`` trades, ``shadow`` only logs) the input
  features and the prediction; ``realised_return`` (the label, same units as the prediction) is filled in
  once the label's horizon has passed.
- ``feature_sets``: each distinct ordered feature-name list once; predictions point at it.
- ``arbitrage_positions`` (schema 2): the funding-arbitrage picks each opportunity scorer (``ml`` = the
  ONNX models, ``rule`` = the rule scorer) follows on paper: inserted open with the bar that opened it
  (entry, hold, the scorer's predictions), closed by the bar at which its hold ended with the realised
  outcome (profit in percent of one leg's notional and in USD, funding, fees, slippage: the simulator's
  cost model). :meth:`StateStore.scorer_comparison` compares the two scorers from it.

Features are stored as a **BLOB of little-endian float64** plus a reference to the feature-name list,
not as JSON: the drift check reads months of rows back into an ``(n, f)`` matrix, which is one
``np.frombuffer`` over the joined blobs instead of parsing ``n`` JSON documents; the bytes round-trip
exactly; 8 bytes a value instead of ~20 characters; and the names cost one integer per row. Features
and predictions must be finite (the runner does not predict during warm-up); an unlabelled
``realised_return`` is NULL.

**Foreign keys** are on: decisions, predictions and fills reference their bar's ``portfolio_state`` row
(inserted first in the transaction), so a decision without its snapshot cannot exist even through a bug.

**Durability and concurrency.** ``journal_mode=WAL``: readers (the HTTP API, the drift check) read a
consistent snapshot while the runner writes, and neither blocks the other. ``synchronous=FULL``: in WAL
mode ``NORMAL`` already survives a killed process, but a power cut (a Pi's usual death) can lose the last
commits; the runner may have sent a real order for them, so each commit is fsynced (one fsync a minute
costs nothing). Every connection has a busy ``timeout`` (default 10 s) for the short moments a lock is
held (a checkpoint, WAL recovery after a crash, two writers); a timeout raises
:class:`~cryptoml.errors.TemporaryError`. Multi-query reads run in one read transaction (one snapshot).
One store object may be shared between threads (a lock serialises its connection). WAL needs shared
memory: keep the file on a local disk, not a network share (where WAL cannot be enabled, opening raises
:class:`~cryptoml.errors.ConfigError`).

**Opening** never recreates or overwrites: a file that is not SQLite, an SQLite file of another program,
a newer schema (or an older one without a migration) raises :class:`~cryptoml.errors.DataValidationError`
naming the file. A missing or empty (0-byte) file is created. An older schema with a migration
(:data:`MIGRATIONS`: 1 -> 2 adds ``arbitrage_positions``) is migrated in one transaction when opened for
writing, and logged; opened read-only it is read as it is, and the reads that need a newer table say
so. Bad input (NaN or inf where a number is required, an unknown slot, action, side or order kind)
raises ``DataValidationError`` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cryptoml.errors import ConfigError, CryptoMLError, DataValidationError, TemporaryError

SCHEMA_VERSION = 2
APPLICATION_ID = 0x43524D4C  # "CRML": marks an SQLite file as a cryptoml state database

log = logging.getLogger(__name__)

SLOTS = ("champion", "shadow")
ACTIONS = (
    "enter_long",
    "enter_short",
    "exit_long",
    "exit_short",
    "hold",  # no signal
    "blocked",  # a signal a risk rule refused (kill switch, cooldown, stale data...): the reason says which
    "open_arbitrage",  # opportunity scorer: take the funding-arbitrage opportunity
    "skip_arbitrage",
)
SIDES = ("buy", "sell")
ORDER_KINDS = ("market", "limit", "stop_loss", "take_profit")
SCORERS = ("ml", "rule")  # opportunity scorers whose picks are followed on paper
ARBITRAGE_END_STATUSES = ("closed", "dropped")  # dropped: no price at exit (a data gap), like the simulator

_ARBITRAGE_SCHEMA = (
    """CREATE TABLE arbitrage_positions (
        position_id TEXT PRIMARY KEY,
        scorer TEXT NOT NULL CHECK (scorer IN ('ml', 'rule')),
        opportunity_id TEXT NOT NULL,
        opened_bar_ts_ms INTEGER NOT NULL REFERENCES portfolio_state(bar_ts_ms),
        entry_ts_ms INTEGER NOT NULL, exit_ts_ms INTEGER NOT NULL, hold_hours REAL NOT NULL,
        position_usd REAL NOT NULL, score REAL, predicted_profit_pct REAL, success_probability REAL,
        kelly_fraction REAL, model_version TEXT, entry_details TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed', 'dropped')),
        closed_bar_ts_ms INTEGER REFERENCES portfolio_state(bar_ts_ms),
        realised_profit_pct REAL, realised_profit_usd REAL, funding_usd REAL, fees_usd REAL, slippage_pct REAL,
        outcome_details TEXT)""",
    "CREATE INDEX arbitrage_scorer ON arbitrage_positions(scorer, status, entry_ts_ms)",
)
_SCHEMA = (
    """CREATE TABLE portfolio_state (
        bar_ts_ms INTEGER PRIMARY KEY,
        cash REAL NOT NULL, equity REAL NOT NULL, position_qty REAL NOT NULL, avg_entry_price REAL NOT NULL,
        realised_pnl REAL NOT NULL, unrealised_pnl REAL NOT NULL,
        broker_state TEXT NOT NULL, strategy_state TEXT NOT NULL,
        record_sha256 TEXT NOT NULL, updated_ms INTEGER NOT NULL)""",
    """CREATE TABLE trade_history (
        id INTEGER PRIMARY KEY,
        client_order_id TEXT NOT NULL UNIQUE,
        bar_ts_ms INTEGER NOT NULL REFERENCES portfolio_state(bar_ts_ms),
        ts_ms INTEGER NOT NULL, symbol TEXT NOT NULL, side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
        qty REAL NOT NULL, price REAL NOT NULL, fee_quote REAL NOT NULL, slippage_quote REAL NOT NULL,
        realised_pnl REAL NOT NULL, kind TEXT NOT NULL, model_version TEXT)""",
    "CREATE INDEX trade_history_bar ON trade_history(bar_ts_ms)",
    """CREATE TABLE trade_decisions (
        id INTEGER PRIMARY KEY,
        bar_ts_ms INTEGER NOT NULL REFERENCES portfolio_state(bar_ts_ms),
        symbol TEXT NOT NULL, source TEXT NOT NULL,
        slot TEXT NOT NULL CHECK (slot IN ('champion', 'shadow')),
        action TEXT NOT NULL, reason TEXT NOT NULL, predicted_return_bps REAL,
        model_name TEXT, model_version TEXT, extra TEXT NOT NULL,
        UNIQUE (bar_ts_ms, symbol, source, slot))""",
    """CREATE TABLE performance_metrics (
        ts_ms INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (ts_ms, name))""",
    "CREATE TABLE feature_sets (id INTEGER PRIMARY KEY, names TEXT NOT NULL UNIQUE)",
    """CREATE TABLE predictions (
        id INTEGER PRIMARY KEY,
        bar_ts_ms INTEGER NOT NULL REFERENCES portfolio_state(bar_ts_ms),
        symbol TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
        slot TEXT NOT NULL CHECK (slot IN ('champion', 'shadow')),
        feature_set_id INTEGER NOT NULL REFERENCES feature_sets(id),
        features BLOB NOT NULL, prediction REAL NOT NULL, realised_return REAL,
        UNIQUE (bar_ts_ms, symbol, model_name, slot))""",
    "CREATE INDEX predictions_model ON predictions(model_name, slot, bar_ts_ms)",
    *_ARBITRAGE_SCHEMA,
)
TABLES = (
    "portfolio_state", "trade_history", "trade_decisions", "performance_metrics", "feature_sets", "predictions",
    "arbitrage_positions",
)  # fmt: skip
# Tables each schema version has (a read-only opener accepts an older file holding its version's tables).
TABLES_OF_VERSION = {1: TABLES[:6], 2: TABLES}
# version -> statements that migrate a file of that version to the next one (run in one transaction).
MIGRATIONS: dict[int, tuple[str, ...]] = {1: _ARBITRAGE_SCHEMA}


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PortfolioSnapshot:
    """The account after a bar. Money in quote currency (USDT); ``position_qty`` in base units, signed
    (short < 0), of the traded symbol (with several symbols, ``broker_state`` holds the per-symbol book).
    ``broker_state`` / ``strategy_state`` must be JSON-serialisable (numpy scalars are converted; tuples
    come back as lists, dict keys as strings): everything needed to resume after a restart."""

    cash: float
    equity: float
    position_qty: float
    avg_entry_price: float
    realised_pnl: float
    unrealised_pnl: float
    broker_state: Mapping[str, Any] = field(default_factory=dict)
    strategy_state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """One decision of one decider for one symbol at one bar. ``predicted_return_bps`` is None for a
    decision no model made; ``extra`` holds decider-specific numbers (composite score, Kelly size...)."""

    symbol: str
    action: str
    reason: str
    slot: str = "champion"
    source: str = "strategy"
    predicted_return_bps: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Prediction:
    """One model's prediction at one bar: the ordered input features (finite) and the output, in the units
    of the model's label (see its bundle's ``model_meta.json``)."""

    symbol: str
    model_name: str
    model_version: str
    feature_names: Sequence[str]
    features: Sequence[float] | np.ndarray
    prediction: float
    slot: str = "champion"


@dataclass(frozen=True)
class Fill:
    """An executed order. ``ts_ms``: fill time (UTC epoch ms); ``qty`` > 0 in base units; ``price`` the fill
    price; ``fee_quote`` and ``slippage_quote`` its costs in quote currency (slippage = cost against the
    reference price, positive = worse); ``realised_pnl`` quote currency as the broker books it (0 for a
    fill that only opens or adds); ``kind`` one of :data:`ORDER_KINDS`."""

    client_order_id: str
    ts_ms: int
    symbol: str
    side: str
    qty: float
    price: float
    fee_quote: float
    slippage_quote: float
    realised_pnl: float
    kind: str
    model_version: str | None = None


@dataclass(frozen=True)
class RealisedReturn:
    """The label, once known, of the predictions of ``model_name`` at ``bar_ts_ms`` (every slot)."""

    bar_ts_ms: int
    symbol: str
    model_name: str
    realised_return: float


@dataclass(frozen=True)
class ArbitrageEntry:
    """A funding-arbitrage pick a scorer (``ml`` | ``rule``) opened on paper at ``entry_ts_ms`` (UTC ms, a
    snapshot time), to unwind at ``exit_ts_ms`` = entry + ``hold_hours``. ``position_usd``: notional of each
    leg; ``score``: the scorer's ranking value (composite score, % per sqrt(day), for ``ml``; ``fund_apr``
    in % per year for ``rule``); the ``ml`` predictions (profit in % of one leg's notional, P(profit),
    Kelly fraction of capital) are None for ``rule``. ``details``: legs, entry prices and slippage."""

    position_id: str
    scorer: str
    opportunity_id: str
    entry_ts_ms: int
    exit_ts_ms: int
    hold_hours: float
    position_usd: float
    score: float | None = None
    predicted_profit_pct: float | None = None
    success_probability: float | None = None
    kelly_fraction: float | None = None
    model_version: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArbitrageOutcome:
    """The end of a paper pick: ``status`` ``closed`` (with the realised profit in % of one leg's notional
    and in USD, funding received in USD, fees in USD, slippage in % of notional) or ``dropped`` (no price
    to unwind at: the outcome numbers are None)."""

    position_id: str
    status: str
    realised_profit_pct: float | None = None
    realised_profit_usd: float | None = None
    funding_usd: float | None = None
    fees_usd: float | None = None
    slippage_pct: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BarRecord:
    """Everything one processed bar produced; :meth:`StateStore.commit_bar` writes it atomically.
    ``metrics`` are stamped with ``bar_ts_ms``; ``realised_returns`` label earlier bars' predictions;
    ``arbitrage_opened`` / ``arbitrage_closed`` are the paper picks this bar opened / ended."""

    bar_ts_ms: int
    portfolio: PortfolioSnapshot
    decisions: Sequence[Decision] = ()
    predictions: Sequence[Prediction] = ()
    fills: Sequence[Fill] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    realised_returns: Sequence[RealisedReturn] = ()
    arbitrage_opened: Sequence[ArbitrageEntry] = ()
    arbitrage_closed: Sequence[ArbitrageOutcome] = ()


class StoredPortfolio(NamedTuple):
    bar_ts_ms: int
    portfolio: PortfolioSnapshot
    updated_ms: int  # wall-clock commit time: informational only


class StoredDecision(NamedTuple):
    bar_ts_ms: int
    decision: Decision


class StoredFill(NamedTuple):
    bar_ts_ms: int  # the bar whose commit booked the fill
    fill: Fill


class PredictionMatrix(NamedTuple):
    bar_ts_ms: np.ndarray  # int64 (n,)
    X: np.ndarray  # float64 (n, f), columns in the requested feature order
    prediction: np.ndarray  # float64 (n,)


class BarRows(NamedTuple):
    """Row counts stored for one bar (``metrics`` counts every metric stamped with that time;
    ``arbitrage`` the paper picks the bar opened)."""

    portfolio: int
    decisions: int
    predictions: int
    fills: int
    metrics: int
    arbitrage: int = 0


class StoredArbitrage(NamedTuple):
    opened_bar_ts_ms: int
    entry: ArbitrageEntry
    status: str  # open | closed | dropped
    closed_bar_ts_ms: int | None
    outcome: ArbitrageOutcome | None


class ScorerSummary(NamedTuple):
    """One scorer's paper picks: counts by status and, over the closed ones, the mean realised profit (%
    of one leg's notional), the share that made money, the USD total and the mean predicted profit (ml)."""

    opened: int
    open: int
    closed: int
    dropped: int
    mean_profit_pct: float | None
    win_rate: float | None
    total_profit_usd: float
    mean_predicted_profit_pct: float | None


# ------------------------------------------------------------------------------------------ validation
# Record field -> check, in the order of the table's columns: "number" (finite), "number?" (None or
# finite), "positive", "ts" (epoch ms >= 0), "text" (non-empty), "text?", "json" (a mapping), or a tuple
# of the allowed strings.
_PORTFOLIO_FIELDS: dict[str, Any] = {
    **dict.fromkeys(("cash", "equity", "position_qty", "avg_entry_price", "realised_pnl", "unrealised_pnl"), "number"),
    "broker_state": "json",
    "strategy_state": "json",
}
_DECISION_FIELDS: dict[str, Any] = {
    "symbol": "text",
    "source": "text",
    "slot": SLOTS,
    "action": ACTIONS,
    "reason": "text",
    "predicted_return_bps": "number?",
    "model_name": "text?",
    "model_version": "text?",
    "extra": "json",
}
_FILL_FIELDS: dict[str, Any] = {
    "client_order_id": "text",
    "ts_ms": "ts",
    "symbol": "text",
    "side": SIDES,
    "qty": "positive",
    "price": "positive",
    "fee_quote": "number",
    "slippage_quote": "number",
    "realised_pnl": "number",
    "kind": ORDER_KINDS,
    "model_version": "text?",
}
_PREDICTION_KEY_FIELDS: dict[str, Any] = {
    "symbol": "text",
    "model_name": "text",
    "model_version": "text",
    "slot": SLOTS,
}
_REALISED_FIELDS: dict[str, Any] = {
    "bar_ts_ms": "ts",
    "symbol": "text",
    "model_name": "text",
    "realised_return": "number",
}
_ARBITRAGE_ENTRY_FIELDS: dict[str, Any] = {
    "position_id": "text",
    "scorer": SCORERS,
    "opportunity_id": "text",
    "entry_ts_ms": "ts",
    "exit_ts_ms": "ts",
    "hold_hours": "positive",
    "position_usd": "positive",
    "score": "number?",
    "predicted_profit_pct": "number?",
    "success_probability": "number?",
    "kelly_fraction": "number?",
    "model_version": "text?",
    "details": "json",
}
_ARBITRAGE_OUTCOME_FIELDS: dict[str, Any] = {
    "position_id": "text",
    "status": ARBITRAGE_END_STATUSES,
    "realised_profit_pct": "number?",
    "realised_profit_usd": "number?",
    "funding_usd": "number?",
    "fees_usd": "number?",
    "slippage_pct": "number?",
    "details": "json",
}

# Column lists (no surrogate ids, no wall-clock columns) in the order rows are written, read and compared.
_PORTFOLIO_COLS = ", ".join(_PORTFOLIO_FIELDS)
_DECISION_COLS = ", ".join(_DECISION_FIELDS)
_FILL_COLS = ", ".join(_FILL_FIELDS)
_PREDICTION_COLS = ", ".join(_PREDICTION_KEY_FIELDS) + ", feature_set_id, features, prediction"
_ARB_ENTRY_COLS = ", ".join(_ARBITRAGE_ENTRY_FIELDS).replace("details", "entry_details")
_ARB_OUTCOME_COLS = ", ".join(f for f in _ARBITRAGE_OUTCOME_FIELDS if f != "position_id").replace(
    "details", "outcome_details"
)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _check(what: str, value: Any, check: Any) -> Any:
    """One field checked and converted for storage; ``what`` names it in the error."""
    if value is None and check in ("number?", "text?"):
        return None
    if check in ("number", "number?", "positive"):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise DataValidationError(f"{what}: expected a number, got {value!r}")
        out = float(value)
        if not math.isfinite(out) or (check == "positive" and out <= 0):
            raise DataValidationError(f"{what}: must be {'> 0' if check == 'positive' else 'finite'}, got {out!r}")
        return out
    if check == "ts":
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise DataValidationError(f"{what}: expected a non-negative integer epoch ms, got {value!r}")
        return int(value)
    if check == "json":
        if not isinstance(value, Mapping):
            raise DataValidationError(f"{what}: expected a mapping (JSON object), got {type(value).__name__}")
        try:
            return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)
        except (TypeError, ValueError) as e:  # ValueError: NaN / inf somewhere inside
            raise DataValidationError(f"{what}: not storable as strict JSON ({e})") from e
    if not isinstance(value, str) or not value:
        raise DataValidationError(f"{what}: expected a non-empty string, got {value!r}")
    if isinstance(check, tuple) and value not in check:
        raise DataValidationError(f"{what}: {value!r} is not one of {', '.join(check)}")
    return value


def _row(what: str, obj: Any, fields: Mapping[str, Any]) -> tuple[Any, ...]:
    prefix = f"{what}." if what else ""
    return tuple(_check(prefix + name, getattr(obj, name), check) for name, check in fields.items())


def _features(what: str, names: Sequence[str], values: Any) -> tuple[str, bytes]:
    """-> (feature names as JSON, the values as little-endian float64 bytes)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise DataValidationError(f"{what}.feature_names: expected a non-empty list of names")
    for j, name in enumerate(names):
        _check(f"{what}.feature_names[{j}]", name, "text")
    if len(set(names)) != len(names):
        raise DataValidationError(f"{what}.feature_names: duplicated names")
    try:
        arr = np.asarray(values, dtype="<f8")
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"{what}.features: not numeric ({e})") from e
    if arr.shape != (len(names),):
        raise DataValidationError(f"{what}.features: shape {arr.shape} does not match {len(names)} feature names")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataValidationError(f"{what}.features: {names[int(bad[0])]!r} is {arr[bad[0]]} (must be finite)")
    return json.dumps(list(names), separators=(",", ":")), arr.tobytes()


class _EncodedBar(NamedTuple):
    bar_ts_ms: int
    portfolio: tuple[Any, ...]
    decisions: list[tuple[Any, ...]]
    predictions: list[tuple[Any, ...]]  # symbol, model_name, model_version, slot, names JSON, blob, prediction
    fills: list[tuple[Any, ...]]
    metrics: list[tuple[str, float]]
    realised: list[tuple[Any, ...]]
    opened: list[tuple[Any, ...]]
    closed: list[tuple[Any, ...]]
    digest: str


def _unique(what: str, keys: Sequence[tuple[Any, ...]]) -> None:
    if len(set(keys)) != len(keys):
        raise DataValidationError(f"BarRecord.{what}: the same key appears twice in one bar")


def _encode_bar(record: BarRecord) -> _EncodedBar:
    """Validate a record and turn it into table rows plus its digest (pure: no database access)."""
    if not isinstance(record, BarRecord):
        raise DataValidationError(f"commit_bar expects a BarRecord, got {type(record).__name__}")
    if not isinstance(record.portfolio, PortfolioSnapshot):
        raise DataValidationError(f"BarRecord.portfolio: expected a PortfolioSnapshot, not {record.portfolio!r}")
    if not isinstance(record.metrics, Mapping):
        raise DataValidationError("BarRecord.metrics: expected a mapping name -> value")
    bar = _check("BarRecord.bar_ts_ms", record.bar_ts_ms, "ts")
    portfolio = _row("BarRecord.portfolio", record.portfolio, _PORTFOLIO_FIELDS)
    decisions = [_row(f"BarRecord.decisions[{i}]", d, _DECISION_FIELDS) for i, d in enumerate(record.decisions)]
    predictions = []
    for i, pr in enumerate(record.predictions):
        what = f"BarRecord.predictions[{i}]"
        names_json, blob = _features(what, pr.feature_names, pr.features)
        prediction = _check(f"{what}.prediction", pr.prediction, "number")
        predictions.append((*_row(what, pr, _PREDICTION_KEY_FIELDS), names_json, blob, prediction))
    fills = [_row(f"BarRecord.fills[{i}]", f, _FILL_FIELDS) for i, f in enumerate(record.fills)]
    metrics = sorted(
        (_check("BarRecord.metrics key", k, "text"), _check(f"BarRecord.metrics[{k!r}]", v, "number"))
        for k, v in record.metrics.items()
    )
    realised = [
        _row(f"BarRecord.realised_returns[{i}]", r, _REALISED_FIELDS) for i, r in enumerate(record.realised_returns)
    ]
    _unique("decisions", [r[:3] for r in decisions])  # (symbol, source, slot)
    _unique("predictions", [(r[0], r[1], r[3]) for r in predictions])  # (symbol, model_name, slot)
    _unique("fills", [r[:1] for r in fills])
    opened = [
        _row(f"BarRecord.arbitrage_opened[{i}]", a, _ARBITRAGE_ENTRY_FIELDS)
        for i, a in enumerate(record.arbitrage_opened)
    ]
    closed = [
        _row(f"BarRecord.arbitrage_closed[{i}]", a, _ARBITRAGE_OUTCOME_FIELDS)
        for i, a in enumerate(record.arbitrage_closed)
    ]
    _unique("realised_returns", [r[:3] for r in realised])
    _unique("arbitrage_opened", [r[:1] for r in opened])
    _unique("arbitrage_closed", [r[:1] for r in closed])
    for i, row in enumerate(opened):
        if row[4] <= row[3]:
            raise DataValidationError(f"BarRecord.arbitrage_opened[{i}]: exit_ts_ms must be after entry_ts_ms")
    # Canonical content, independent of the order the runner listed things in.
    canonical: list[Any] = [
        bar,
        portfolio,
        sorted(decisions, key=lambda r: r[:3]),
        sorted(((*r[:5], r[5].hex(), r[6]) for r in predictions), key=lambda r: (r[0], r[1], r[3])),
        sorted(fills, key=lambda r: r[0]),
        metrics,
        sorted(realised, key=lambda r: r[:3]),
    ]
    if opened or closed:  # only then: a bar without paper picks keeps the digest of schema 1
        canonical += [sorted(opened), sorted(closed)]
    digest = hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
    return _EncodedBar(bar, portfolio, decisions, predictions, fills, metrics, realised, opened, closed, digest)


def _portfolio_from_row(row: Sequence[Any]) -> PortfolioSnapshot:
    cash, equity, qty, entry, realised, unrealised, broker, strategy = row
    return PortfolioSnapshot(cash, equity, qty, entry, realised, unrealised, json.loads(broker), json.loads(strategy))


# ----------------------------------------------------------------------------------------------- store
class StateStore:
    """The runner's SQLite state file (see the module docstring). ``read_only=True`` opens an existing
    store for a reader (API, drift check) that must never create or change it."""

    def __init__(self, path: str | Path, *, read_only: bool = False, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.schema_version = SCHEMA_VERSION  # of the open file (an older one only when read-only)
        self._lock = threading.Lock()
        if read_only and not self.path.is_file():
            raise DataValidationError(f"state database {self.path} does not exist")
        if self.path.exists() and not self.path.is_file():
            raise DataValidationError(f"state database {self.path} is not a file")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        target = self.path.resolve().as_uri() + ("?mode=ro" if read_only else "?mode=rwc")
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread=False: self._lock guards.
            self._conn = sqlite3.connect(
                target, uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise DataValidationError(f"cannot open state database {self.path}: {e}") from e
        try:
            self._open()
        except BaseException:
            self._conn.close()
            raise

    # -- opening ----------------------------------------------------------------------------------
    def _inspect(self) -> tuple[int, int, set[str]]:
        app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return app_id, version, tables

    def _check_schema(self, app_id: int, version: int, tables: set[str]) -> None:
        """Refuse a foreign, newer, unmigratable or incomplete file; an older migratable one passes."""
        if app_id != APPLICATION_ID:
            raise DataValidationError(
                f"{self.path} is an SQLite database of another program, not a cryptoml state database; "
                "refusing to touch it"
            )
        if version > SCHEMA_VERSION:
            raise DataValidationError(
                f"state database {self.path} has schema version {version}, newer than this code's "
                f"{SCHEMA_VERSION}; upgrade cryptoml"
            )
        if version not in TABLES_OF_VERSION or any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
            raise DataValidationError(
                f"state database {self.path} has schema version {version} and no migration to {SCHEMA_VERSION} exists"
            )
        missing = set(TABLES_OF_VERSION[version]) - tables
        if missing:
            raise DataValidationError(f"state database {self.path} lacks tables {sorted(missing)}")

    def _migrate(self, version: int) -> None:
        """Bring a checked older file to SCHEMA_VERSION, all steps in one transaction (all or nothing)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            current = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if current == version:  # not migrated by another process meanwhile
                for v in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[v]:
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        if current == version:
            log.warning("state database %s migrated from schema %d to %d", self.path, version, SCHEMA_VERSION)

    def _open(self) -> None:
        try:
            # Inspect before any write: a garbage file fails here, untouched.
            app_id, version, tables = self._inspect()
            fresh = app_id == 0 and version == 0 and not tables
            if self.read_only:
                if fresh:
                    raise DataValidationError(f"state database {self.path} is empty (never initialised)")
                self._check_schema(app_id, version, tables)
                self.schema_version = version
                return
            if not fresh:
                self._check_schema(app_id, version, tables)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # e.g. a network filesystem without shared memory
                raise ConfigError(f"state database {self.path}: WAL journal not available here (got {mode!r})")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            if fresh:
                self._create()
            elif version < SCHEMA_VERSION:
                self._migrate(version)
        except sqlite3.OperationalError as e:
            raise self._translate(e) from e
        except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
            raise DataValidationError(f"{self.path} is not a readable cryptoml state database: {e}") from e

    def _create(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            app_id, version, tables = self._inspect()
            if app_id or version or tables:  # another process created it between our look and our lock
                self._conn.execute("ROLLBACK")
                self._check_schema(app_id, version, tables)
                return
            for statement in _SCHEMA:
                self._conn.execute(statement)
            self._conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _translate(self, e: sqlite3.Error) -> CryptoMLError:
        msg = str(e)
        if isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
            return TemporaryError(f"state database {self.path} is busy: {msg}")
        if isinstance(e, sqlite3.IntegrityError):
            return DataValidationError(f"state database {self.path}: constraint failed: {msg}")
        return CryptoMLError(f"state database {self.path}: {msg}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -----------------------------------------------------------------------------
    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """``BEGIN`` (read snapshot) or ``BEGIN IMMEDIATE`` (write); rolled back on any exception."""
        if begin != "BEGIN" and self.read_only:
            raise ConfigError(f"state database {self.path} was opened read-only")
        with self._lock:
            try:
                self._conn.execute(begin)
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise self._translate(e) from e

    # -- writing ----------------------------------------------------------------------------------
    def commit_bar(self, record: BarRecord) -> bool:
        """Write one bar atomically. True if written; False if this exact bar was already committed."""
        enc = _encode_bar(record)
        with self._transaction("BEGIN IMMEDIATE") as db:
            row = db.execute("SELECT record_sha256 FROM portfolio_state WHERE bar_ts_ms = ?", (enc.bar_ts_ms,))
            existing = row.fetchone()
            if existing is not None:
                if existing[0] != enc.digest:
                    raise DataValidationError(
                        f"bar {enc.bar_ts_ms} is already committed in {self.path} with different contents "
                        "(the replay diverged from the original run)"
                    )
                return False
            last = db.execute("SELECT MAX(bar_ts_ms) FROM portfolio_state").fetchone()[0]
            if last is not None and enc.bar_ts_ms < last:
                raise DataValidationError(
                    f"BarRecord.bar_ts_ms: bar {enc.bar_ts_ms} is older than the last committed bar {last}"
                )
            db.execute(
                f"INSERT INTO portfolio_state (bar_ts_ms, {_PORTFOLIO_COLS}, record_sha256, updated_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (enc.bar_ts_ms, *enc.portfolio, enc.digest, time.time_ns() // 1_000_000),
            )
            db.executemany(
                f"INSERT INTO trade_decisions (bar_ts_ms, {_DECISION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(enc.bar_ts_ms, *r) for r in enc.decisions],
            )
            # sorted: new feature sets get their ids in the same order on every run (hash order is not).
            set_ids = {names: self._feature_set_id(db, names) for names in sorted({r[4] for r in enc.predictions})}
            db.executemany(
                f"INSERT INTO predictions (bar_ts_ms, {_PREDICTION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(enc.bar_ts_ms, *r[:4], set_ids[r[4]], *r[5:]) for r in enc.predictions],
            )
            for fill in enc.fills:
                self._insert_fill(db, enc.bar_ts_ms, fill)
            for name, value in enc.metrics:
                self._insert_metric(db, enc.bar_ts_ms, name, value)
            for r in enc.realised:
                self._label(db, r, slot=None)
            for entry in enc.opened:
                self._open_arbitrage(db, enc.bar_ts_ms, entry)
            for outcome in enc.closed:
                self._close_arbitrage(db, enc.bar_ts_ms, outcome)
        return True

    def _open_arbitrage(self, db: sqlite3.Connection, bar_ts_ms: int, entry: tuple[Any, ...]) -> None:
        placeholders = ", ".join("?" * (len(entry) + 1))
        cur = db.execute(
            f"INSERT INTO arbitrage_positions (opened_bar_ts_ms, {_ARB_ENTRY_COLS}) VALUES ({placeholders}) "
            "ON CONFLICT (position_id) DO NOTHING",
            (bar_ts_ms, *entry),
        )
        if cur.rowcount == 0:
            stored = db.execute(
                f"SELECT {_ARB_ENTRY_COLS} FROM arbitrage_positions WHERE position_id = ?", (entry[0],)
            ).fetchone()
            if tuple(stored) != entry:
                raise DataValidationError(
                    f"arbitrage position {entry[0]!r} is already stored in {self.path} with different values"
                )

    def _close_arbitrage(self, db: sqlite3.Connection, bar_ts_ms: int, outcome: tuple[Any, ...]) -> None:
        position_id, rest = outcome[0], outcome[1:]
        sets = ", ".join(f"{c} = ?" for c in _ARB_OUTCOME_COLS.split(", "))
        cur = db.execute(
            f"UPDATE arbitrage_positions SET closed_bar_ts_ms = ?, {sets} WHERE position_id = ? AND status = 'open'",
            (bar_ts_ms, *rest, position_id),
        )
        if cur.rowcount:
            return
        stored = db.execute(
            f"SELECT closed_bar_ts_ms, {_ARB_OUTCOME_COLS} FROM arbitrage_positions WHERE position_id = ?",
            (position_id,),
        ).fetchone()
        if stored is None:
            raise DataValidationError(f"BarRecord.arbitrage_closed: no open arbitrage position {position_id!r}")
        if tuple(stored) != (bar_ts_ms, *rest):
            raise DataValidationError(f"arbitrage position {position_id!r} is already closed with other values")

    @staticmethod
    def _feature_set_id(db: sqlite3.Connection, names_json: str) -> int:
        db.execute("INSERT OR IGNORE INTO feature_sets (names) VALUES (?)", (names_json,))
        return int(db.execute("SELECT id FROM feature_sets WHERE names = ?", (names_json,)).fetchone()[0])

    def _insert_fill(self, db: sqlite3.Connection, bar_ts_ms: int, fill: tuple[Any, ...]) -> None:
        cur = db.execute(
            f"INSERT INTO trade_history (bar_ts_ms, {_FILL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (client_order_id) DO NOTHING",
            (bar_ts_ms, *fill),
        )
        if cur.rowcount == 0:  # already booked (a re-sent order): fine if it is the same fill
            stored = db.execute(f"SELECT {_FILL_COLS} FROM trade_history WHERE client_order_id = ?", (fill[0],))
            if tuple(stored.fetchone()) != fill:
                raise DataValidationError(
                    f"fill client_order_id={fill[0]!r} is already booked in {self.path} with different values"
                )

    def _insert_metric(self, db: sqlite3.Connection, ts_ms: int, name: str, value: float) -> bool:
        cur = db.execute(
            "INSERT INTO performance_metrics (ts_ms, name, value) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (ts_ms, name, value),
        )
        if cur.rowcount:
            return True
        stored = db.execute("SELECT value FROM performance_metrics WHERE ts_ms = ? AND name = ?", (ts_ms, name))
        if stored.fetchone()[0] != value:
            raise DataValidationError(f"metric {name!r} at {ts_ms} is already stored with a different value")
        return False

    def _label(self, db: sqlite3.Connection, label: tuple[Any, ...], slot: str | None) -> int:
        """Set the realised return of the predictions ``label = (bar_ts_ms, symbol, model_name, value)`` names."""
        bar_ts_ms, symbol, model_name, value = label
        key = "bar_ts_ms = ? AND symbol = ? AND model_name = ?" + ("" if slot is None else " AND slot = ?")
        args: tuple[Any, ...] = (bar_ts_ms, symbol, model_name) + (() if slot is None else (slot,))
        for (stored,) in db.execute(f"SELECT realised_return FROM predictions WHERE {key}", args):
            if stored is not None and stored != value:
                raise DataValidationError(
                    f"realised_return of {model_name} {symbol} at {bar_ts_ms} is already {stored}, not {value}"
                )
        return db.execute(f"UPDATE predictions SET realised_return = ? WHERE {key}", (value, *args)).rowcount

    def record_metric(self, ts_ms: int, name: str, value: float) -> bool:
        """Store a metric outside a bar (e.g. a daily summary). True if written, False if already identical."""
        ts, text, number = _check("ts_ms", ts_ms, "ts"), _check("name", name, "text"), _check("value", value, "number")
        with self._transaction("BEGIN IMMEDIATE") as db:
            return self._insert_metric(db, ts, text, number)

    def set_realised_return(
        self, bar_ts_ms: int, symbol: str, model_name: str, realised_return: float, slot: str | None = None
    ) -> int:
        """Label stored predictions (every slot unless ``slot`` is given); returns how many rows matched.
        Prefer :attr:`BarRecord.realised_returns` in the runner: labels then commit with their bar."""
        label = _row("", RealisedReturn(bar_ts_ms, symbol, model_name, realised_return), _REALISED_FIELDS)
        checked_slot = None if slot is None else _check("slot", slot, SLOTS)
        with self._transaction("BEGIN IMMEDIATE") as db:
            return self._label(db, label, slot=checked_slot)

    # -- reading ----------------------------------------------------------------------------------
    def last_bar_ts_ms(self) -> int | None:
        with self._transaction("BEGIN") as db:
            value = db.execute("SELECT MAX(bar_ts_ms) FROM portfolio_state").fetchone()[0]
        return None if value is None else int(value)

    def load_latest(self) -> StoredPortfolio | None:
        """The last committed snapshot with decoded broker and strategy state; None on a fresh store."""
        with self._transaction("BEGIN") as db:
            row = db.execute(
                f"SELECT bar_ts_ms, {_PORTFOLIO_COLS}, updated_ms FROM portfolio_state ORDER BY bar_ts_ms DESC LIMIT 1"
            ).fetchone()
        return None if row is None else StoredPortfolio(row[0], _portfolio_from_row(row[1:9]), row[9])

    def has_fill(self, client_order_id: str) -> bool:
        with self._transaction("BEGIN") as db:
            cur = db.execute("SELECT 1 FROM trade_history WHERE client_order_id = ?", (client_order_id,))
            return cur.fetchone() is not None

    def decisions(self, since_ms: int | None = None) -> list[StoredDecision]:
        """Decisions of bars at or after ``since_ms``, ordered by bar, symbol, source, slot."""
        with self._transaction("BEGIN") as db:
            rows = db.execute(
                f"SELECT bar_ts_ms, {_DECISION_COLS} FROM trade_decisions WHERE bar_ts_ms >= ? "
                "ORDER BY bar_ts_ms, symbol, source, slot",
                (since_ms or 0,),
            ).fetchall()
        return [
            StoredDecision(
                r[0],
                Decision(
                    symbol=r[1],
                    source=r[2],
                    slot=r[3],
                    action=r[4],
                    reason=r[5],
                    predicted_return_bps=r[6],
                    model_name=r[7],
                    model_version=r[8],
                    extra=json.loads(r[9]),
                ),
            )
            for r in rows
        ]

    def fills(self, since_ms: int | None = None) -> list[StoredFill]:
        """Fills with ``ts_ms`` at or after ``since_ms``, ordered by fill time then client order id."""
        with self._transaction("BEGIN") as db:
            rows = db.execute(
                f"SELECT bar_ts_ms, {_FILL_COLS} FROM trade_history WHERE ts_ms >= ? ORDER BY ts_ms, client_order_id",
                (since_ms or 0,),
            ).fetchall()
        return [StoredFill(r[0], Fill(*r[1:])) for r in rows]

    def metrics(self, name: str | None = None, since_ms: int | None = None) -> list[tuple[int, str, float]]:
        """``(ts_ms, name, value)`` rows, ordered by time then name."""
        query = "SELECT ts_ms, name, value FROM performance_metrics WHERE ts_ms >= ?"
        args: tuple[Any, ...] = (since_ms or 0,)
        if name is not None:
            query, args = query + " AND name = ?", (*args, name)
        with self._transaction("BEGIN") as db:
            return [tuple(r) for r in db.execute(query + " ORDER BY ts_ms, name", args)]

    def predictions_matrix(
        self,
        model_name: str,
        feature_names: Sequence[str],
        since_ms: int | None = None,
        slot: str = "champion",
        symbol: str | None = None,
        model_version: str | None = None,
    ) -> PredictionMatrix:
        """Stored features of one model as a matrix for the drift check, columns in ``feature_names`` order.

        Rows are ordered by ``(bar_ts_ms, symbol)`` (several symbols repeat a bar time unless ``symbol`` is
        given). A stored row lacking a requested feature raises ``DataValidationError`` naming it.
        """
        _check("slot", slot, SLOTS)
        wanted = list(feature_names)
        query = (
            "SELECT p.bar_ts_ms, p.feature_set_id, f.names, p.features, p.prediction FROM predictions p "
            "JOIN feature_sets f ON f.id = p.feature_set_id WHERE p.model_name = ? AND p.slot = ? AND p.bar_ts_ms >= ?"
        )
        args: list[Any] = [model_name, slot, since_ms or 0]
        if symbol is not None:
            query += " AND p.symbol = ?"
            args.append(symbol)
        if model_version is not None:
            query += " AND p.model_version = ?"
            args.append(model_version)
        with self._transaction("BEGIN") as db:
            rows = db.execute(query + " ORDER BY p.bar_ts_ms, p.symbol", args).fetchall()
        n = len(rows)
        X = np.empty((n, len(wanted)), dtype=np.float64)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row[1], []).append(i)
        for idx in groups.values():
            names = json.loads(rows[idx[0]][2])
            missing = [w for w in wanted if w not in names]
            if missing:
                raise DataValidationError(
                    f"predictions of {model_name} ({slot}) stored without features {missing}; pass model_version "
                    "or since_ms to select rows of one feature set"
                )
            block = np.frombuffer(b"".join(rows[i][3] for i in idx), dtype="<f8").reshape(len(idx), len(names))
            X[idx] = block[:, [names.index(w) for w in wanted]]
        return PredictionMatrix(
            np.fromiter((r[0] for r in rows), dtype=np.int64, count=n),
            X,
            np.fromiter((r[4] for r in rows), dtype=np.float64, count=n),
        )

    def prediction_outcomes(
        self, model_name: str, since_ms: int | None = None, slot: str = "champion", symbol: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labelled predictions for performance tracking: ``(bar_ts_ms int64, prediction, realised_return)``."""
        _check("slot", slot, SLOTS)
        query = (
            "SELECT bar_ts_ms, prediction, realised_return FROM predictions "
            "WHERE model_name = ? AND slot = ? AND bar_ts_ms >= ? AND realised_return IS NOT NULL"
        )
        args: list[Any] = [model_name, slot, since_ms or 0]
        if symbol is not None:
            query += " AND symbol = ?"
            args.append(symbol)
        with self._transaction("BEGIN") as db:
            rows = db.execute(query + " ORDER BY bar_ts_ms, symbol", args).fetchall()
        arr = np.array(rows, dtype=np.float64).reshape(len(rows), 3)
        return np.array([r[0] for r in rows], dtype=np.int64), arr[:, 1].copy(), arr[:, 2].copy()

    def _require_schema(self, version: int, what: str) -> None:
        if self.schema_version < version:
            raise DataValidationError(
                f"state database {self.path} has schema version {self.schema_version}: {what} needs {version} "
                "(open it once for writing, e.g. start the runner, to migrate it)"
            )

    def arbitrage_positions(self, scorer: str | None = None, status: str | None = None) -> list[StoredArbitrage]:
        """The paper picks of the opportunity scorers, by entry time then position id."""
        self._require_schema(2, "arbitrage_positions")
        query = (
            f"SELECT opened_bar_ts_ms, {_ARB_ENTRY_COLS}, status, closed_bar_ts_ms, {_ARB_OUTCOME_COLS} "
            "FROM arbitrage_positions WHERE 1 = 1"
        )
        args: list[Any] = []
        if scorer is not None:
            query, args = query + " AND scorer = ?", [*args, _check("scorer", scorer, SCORERS)]
        if status is not None:
            query, args = (
                query + " AND status = ?",
                [*args, _check("status", status, ("open", *ARBITRAGE_END_STATUSES))],
            )
        with self._transaction("BEGIN") as db:
            rows = db.execute(query + " ORDER BY entry_ts_ms, position_id", args).fetchall()
        n = len(_ARBITRAGE_ENTRY_FIELDS)
        out = []
        for r in rows:
            entry = ArbitrageEntry(*r[1:n], details=json.loads(r[n]))  # type: ignore[misc]
            status_ = r[n + 1]
            outcome = None
            if status_ != "open":
                profit_pct, profit_usd, funding, fees, slippage, details = r[n + 4 :]
                outcome = ArbitrageOutcome(
                    entry.position_id, status_, profit_pct, profit_usd, funding, fees, slippage, json.loads(details)
                )
            out.append(StoredArbitrage(r[0], entry, status_, r[n + 2], outcome))
        return out

    def scorer_comparison(self, since_ms: int | None = None) -> dict[str, ScorerSummary]:
        """Per scorer (``ml``, ``rule``), its paper picks entered at or after ``since_ms``; see
        :class:`ScorerSummary`. The same numbers as::

            SELECT scorer, COUNT(*), SUM(status = 'open'), SUM(status = 'closed'), SUM(status = 'dropped'),
                   AVG(CASE WHEN status = 'closed' THEN realised_profit_pct END),
                   AVG(CASE WHEN status = 'closed' THEN realised_profit_pct > 0 END),
                   TOTAL(realised_profit_usd), AVG(CASE WHEN status = 'closed' THEN predicted_profit_pct END)
            FROM arbitrage_positions WHERE entry_ts_ms >= ? GROUP BY scorer
        """
        self._require_schema(2, "scorer_comparison")
        query = (
            "SELECT scorer, COUNT(*), SUM(status = 'open'), SUM(status = 'closed'), SUM(status = 'dropped'), "
            "AVG(CASE WHEN status = 'closed' THEN realised_profit_pct END), "
            "AVG(CASE WHEN status = 'closed' THEN realised_profit_pct > 0 END), TOTAL(realised_profit_usd), "
            "AVG(CASE WHEN status = 'closed' THEN predicted_profit_pct END) "
            "FROM arbitrage_positions WHERE entry_ts_ms >= ? GROUP BY scorer ORDER BY scorer"
        )
        with self._transaction("BEGIN") as db:
            rows = db.execute(query, (since_ms or 0,)).fetchall()
        return {r[0]: ScorerSummary(*r[1:]) for r in rows}

    def rows_per_bar(self) -> dict[int, BarRows]:
        """Row counts per bar time across the tables, read from one snapshot (crash and consistency checks)."""
        counts: dict[int, list[int]] = {}
        queries = [
            "SELECT bar_ts_ms, COUNT(*) FROM portfolio_state GROUP BY bar_ts_ms",
            "SELECT bar_ts_ms, COUNT(*) FROM trade_decisions GROUP BY bar_ts_ms",
            "SELECT bar_ts_ms, COUNT(*) FROM predictions GROUP BY bar_ts_ms",
            "SELECT bar_ts_ms, COUNT(*) FROM trade_history GROUP BY bar_ts_ms",
            "SELECT ts_ms, COUNT(*) FROM performance_metrics GROUP BY ts_ms",
        ]
        if self.schema_version >= 2:
            queries.append("SELECT opened_bar_ts_ms, COUNT(*) FROM arbitrage_positions GROUP BY opened_bar_ts_ms")
        with self._transaction("BEGIN") as db:
            for j, query in enumerate(queries):
                for ts, count in db.execute(query):
                    counts.setdefault(ts, [0] * len(queries))[j] = count
        return {ts: BarRows(*c) for ts, c in sorted(counts.items())}

    def fingerprint(self) -> str:
        """sha256 over the ordered contents of every table, without surrogate ids and wall-clock columns:
        equal fingerprints mean equal state (e.g. a killed-and-restarted run vs an uninterrupted one)."""
        queries = (
            f"SELECT bar_ts_ms, {_PORTFOLIO_COLS}, record_sha256 FROM portfolio_state ORDER BY bar_ts_ms",
            f"SELECT bar_ts_ms, {_FILL_COLS} FROM trade_history ORDER BY client_order_id",
            f"SELECT bar_ts_ms, {_DECISION_COLS} FROM trade_decisions ORDER BY bar_ts_ms, symbol, source, slot",
            "SELECT ts_ms, name, value FROM performance_metrics ORDER BY ts_ms, name",
            "SELECT p.bar_ts_ms, p.symbol, p.model_name, p.model_version, p.slot, f.names, p.features, "
            "p.prediction, p.realised_return FROM predictions p JOIN feature_sets f ON f.id = p.feature_set_id "
            "ORDER BY p.bar_ts_ms, p.symbol, p.model_name, p.slot",
        ) + (
            (
                f"SELECT opened_bar_ts_ms, {_ARB_ENTRY_COLS}, status, closed_bar_ts_ms, {_ARB_OUTCOME_COLS} "
                "FROM arbitrage_positions ORDER BY position_id",
            )
            if self.schema_version >= 2
            else ()
        )
        digest = hashlib.sha256()
        with self._transaction("BEGIN") as db:
            for query in queries:
                digest.update(query.encode())
                for row in db.execute(query):
                    values = [v.hex() if isinstance(v, bytes) else v for v in row]
                    digest.update(json.dumps(values, separators=(",", ":")).encode() + b"\n")
        return digest.hexdigest()
