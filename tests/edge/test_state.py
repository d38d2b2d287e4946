"""Edge runner state in SQLite: round trips, idempotent re-commits, refusal of foreign files, and crash safety.

The crash tests run :func:`run_writer` (a miniature runner: resume from the stored snapshot, process bars,
commit each) in a subprocess and SIGKILL it, at random moments and, deterministically, at chosen SQLite
steps inside a bar's transaction; then every bar must be all-or-nothing, and resuming must reach the
fingerprint of an uninterrupted run. This module doubles as that subprocess:
``python -m tests.edge.test_state PATH N_BARS PAUSE_S [KILL_BAR KILL_AT_CALLBACK]``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cryptoml.edge.state import (
    _SCHEMA,
    APPLICATION_ID,
    SCHEMA_VERSION,
    ArbitrageEntry,
    ArbitrageOutcome,
    BarRecord,
    BarRows,
    Decision,
    Fill,
    PortfolioSnapshot,
    Prediction,
    RealisedReturn,
    StateStore,
    StoredPortfolio,
)
from cryptoml.errors import ConfigError, DataValidationError, TemporaryError

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "BTC/USDT:USDT"
FEATURES = tuple(f"feat_{j:02d}" for j in range(19))
T0_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC, open time of bar 0
BAR_MS = 60_000
HORIZON_BARS = 5
PROGRESS_STEP = 5  # SQLite VM instructions between progress callbacks (fault injection granularity)


# ------------------------------------------------------------------------- a deterministic mini runner
def next_bar(i: int, prev: PortfolioSnapshot | None) -> BarRecord:
    """Bar ``i`` computed from the previous snapshot only, as a runner resuming from the store would."""
    rng = np.random.default_rng(i)
    if prev is None:
        prev = PortfolioSnapshot(10_000.0, 10_000.0, 0.0, 0.0, 0.0, 0.0, {"orders": 0}, {"cooldown_until_ms": 0})
    bar_ts_ms = T0_MS + i * BAR_MS
    features = rng.normal(size=len(FEATURES))
    predicted_bps = float(features[:3].sum() * 4.0)
    fills = []
    realised_pnl = prev.realised_pnl
    position = prev.position_qty
    if i % 7 == 3:  # trade on some bars; the order id derives from the bar, so a replay re-sends the same id
        side = "buy" if position <= 0 else "sell"
        pnl = float(rng.normal()) if position else 0.0
        fills.append(
            Fill(f"b{bar_ts_ms}-0", bar_ts_ms + 1_234, SYMBOL, side, 0.01, 42_000.0 + i, 0.17, 0.02, pnl, "market", "3")
        )
        realised_pnl += pnl
        position = 0.01 if side == "buy" else 0.0
    unrealised = position * float(rng.normal()) * 10.0
    cash = prev.cash + (fills[0].realised_pnl - fills[0].fee_quote if fills else 0.0)
    portfolio = PortfolioSnapshot(
        cash=cash,
        equity=cash + unrealised,
        position_qty=position,
        avg_entry_price=42_000.0 + i if position else 0.0,
        realised_pnl=realised_pnl,
        unrealised_pnl=unrealised,
        broker_state={"orders": prev.broker_state["orders"] + len(fills), "open": [SYMBOL] if position else []},
        strategy_state={
            "cooldown_until_ms": bar_ts_ms + 180_000 if fills else prev.strategy_state["cooldown_until_ms"]
        },
    )
    decisions = [
        Decision(SYMBOL, "enter_long" if fills else "hold", "rule", "champion", "price", predicted_bps, "lgbm", "3"),
        Decision(SYMBOL, "hold", "shadow only logs", "shadow", "price", predicted_bps / 2, "lgbm", "4"),
    ]
    if i % 5 == 0:
        decisions.append(
            Decision(SYMBOL, "skip_arbitrage", "score 0.2 < 0.5", source="funding_rules", extra={"s": 0.2})
        )
    predictions = [
        Prediction(SYMBOL, "lgbm", "3", FEATURES, features, predicted_bps),
        Prediction(SYMBOL, "lgbm", "4", FEATURES, features, predicted_bps / 2, slot="shadow"),
    ]
    realised = []
    if i >= HORIZON_BARS:
        realised.append(RealisedReturn(bar_ts_ms - HORIZON_BARS * BAR_MS, SYMBOL, "lgbm", float(rng.normal() * 5)))
    metrics = {"equity": portfolio.equity, "drawdown_pct": float(abs(rng.normal()))}
    # A paper arbitrage pick opens on bars 1, 11, 21... and closes 4 bars later (scorers alternate).
    opened, closed = [], []
    if i % 10 == 1:
        opened.append(arbitrage_entry(i))
    if i % 10 == 5:
        gain = float(rng.normal(0.05, 0.1))
        closed.append(
            ArbitrageOutcome(f"p{i - 4}", "closed", gain, gain * 100, 3.0, 8.0, 0.02, {"exit": {"close": 1.0 + i}})
            if i % 20 == 5
            else ArbitrageOutcome(f"p{i - 4}", "dropped", details={"reason": "no bar at exit"})
        )
    return BarRecord(bar_ts_ms, portfolio, decisions, predictions, fills, metrics, realised, opened, closed)


def arbitrage_entry(i: int) -> ArbitrageEntry:
    bar_ts_ms = T0_MS + i * BAR_MS
    ml = i % 20 == 1
    return ArbitrageEntry(
        f"p{i}", "ml" if ml else "rule", "spot_perp:BTC:x-spot:x-swap", bar_ts_ms + BAR_MS, bar_ts_ms + 5 * BAR_MS,
        1.0, 10_000.0, 0.3 if ml else 12.0, 0.2 if ml else None, 0.6 if ml else None, 0.05 if ml else None,
        "profit=v1" if ml else None, {"legs": [{"symbol": "BTC/USDT", "price": 42_000.0 + i}]},
    )  # fmt: skip


def expected_rows(bar_ts_ms: int) -> BarRows:
    i = (bar_ts_ms - T0_MS) // BAR_MS
    return BarRows(1, 3 if i % 5 == 0 else 2, 2, 1 if i % 7 == 3 else 0, 2, 1 if i % 10 == 1 else 0)


def run_writer(
    path: Path, n_bars: int, pause_s: float = 0.0, announce: bool = False, kill_at: tuple[int, int] | None = None
) -> None:
    """Resume from the store's latest snapshot and commit bars up to ``n_bars``.

    ``kill_at=(bar, k)`` is fault injection: during the commit of bar ``bar`` the process SIGKILLs itself at
    the ``k``-th SQLite progress callback (one per PROGRESS_STEP VM instructions), i.e. inside the transaction.
    """
    with StateStore(path) as store:
        latest = store.load_latest()
        start = 0 if latest is None else (latest.bar_ts_ms - T0_MS) // BAR_MS + 1
        prev = None if latest is None else latest.portfolio
        if announce:
            print("ready", start, flush=True)
        for i in range(start, n_bars):
            record = next_bar(i, prev)
            if kill_at is not None and i == kill_at[0]:
                store._conn.set_progress_handler(_kill_at_callback(kill_at[1]), PROGRESS_STEP)
            assert store.commit_bar(record)
            store._conn.set_progress_handler(None, PROGRESS_STEP)
            prev = record.portfolio
            if announce:
                print("committed", i, flush=True)
            if pause_s:
                time.sleep(pause_s)


def _kill_at_callback(k: int) -> Callable[[], int]:
    calls = 0

    def handler() -> int:
        nonlocal calls
        calls += 1
        if calls >= k:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0  # 0 = let the statement continue

    return handler


def assert_all_or_nothing(store: StateStore) -> int:
    """Every stored bar is complete and bars are contiguous from bar 0; returns how many there are."""
    rows = store.rows_per_bar()
    for ts, counts in rows.items():
        assert counts == expected_rows(ts), f"bar {ts}: {counts}"
    assert list(rows) == [T0_MS + i * BAR_MS for i in range(len(rows))]
    return len(rows)


def writer_cmd(path: Path, n_bars: int, pause_s: float = 0.0, kill_at: tuple[int, int] | None = None) -> list[str]:
    kill = [] if kill_at is None else [str(kill_at[0]), str(kill_at[1])]
    return [sys.executable, "-m", "tests.edge.test_state", str(path), str(n_bars), str(pause_s), *kill]


# ------------------------------------------------------------------------------------------ round trips
def test_round_trip_of_every_table(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.sqlite") as store:
        assert store.load_latest() is None and store.last_bar_ts_ms() is None
        prev = None
        for i in range(8):
            record = next_bar(i, prev)
            assert store.commit_bar(record)
            prev = record.portfolio
        latest = store.load_latest()
        assert isinstance(latest, StoredPortfolio)
        assert latest.bar_ts_ms == store.last_bar_ts_ms() == T0_MS + 7 * BAR_MS
        assert latest.portfolio == prev  # floats exact, JSON state decoded to the same dicts

        decisions = store.decisions()
        assert [d.decision for d in decisions if d.bar_ts_ms == T0_MS + 5 * BAR_MS] == sorted(
            next_bar(5, None).decisions, key=lambda d: (d.source, d.slot)
        )
        assert store.decisions(since_ms=T0_MS + 7 * BAR_MS)[0].bar_ts_ms == T0_MS + 7 * BAR_MS
        fills = store.fills()
        assert [f.fill.client_order_id for f in fills] == [f"b{T0_MS + 3 * BAR_MS}-0"]
        assert fills[0] == (T0_MS + 3 * BAR_MS, next_bar(3, None).fills[0])
        assert store.has_fill(fills[0].fill.client_order_id) and not store.has_fill("nope")
        assert [m[1] for m in store.metrics(since_ms=T0_MS + 7 * BAR_MS)] == ["drawdown_pct", "equity"]
        assert store.metrics("equity")[-1][2] == prev.equity

        # Features come back exactly, in the requested column order.
        wanted = list(reversed(FEATURES[:5]))
        ts, X, pred = store.predictions_matrix("lgbm", wanted)
        assert ts.dtype == np.int64 and X.dtype == np.float64 and X.shape == (8, 5)
        first = next_bar(0, None).predictions[0]
        assert np.array_equal(X[0], np.asarray(first.features)[[FEATURES.index(w) for w in wanted]])
        assert pred[0] == first.prediction
        assert store.predictions_matrix("lgbm", FEATURES, slot="shadow").X.shape == (8, 19)

        # Bars 5..7 labelled bars 0..2 (both slots); outcomes list only labelled rows.
        out_ts, _, realised = store.prediction_outcomes("lgbm")
        assert list(out_ts) == [T0_MS + i * BAR_MS for i in range(3)]
        assert realised[0] == next_bar(5, None).realised_returns[0].realised_return
        assert len(store.prediction_outcomes("lgbm", slot="shadow")[0]) == 3

        # Bar 1 opened an ml pick that bar 5 closed: entry and outcome come back as written.
        (pick,) = store.arbitrage_positions()
        assert pick.entry == arbitrage_entry(1) and pick.opened_bar_ts_ms == T0_MS + BAR_MS
        assert pick.status == "closed" and pick.closed_bar_ts_ms == T0_MS + 5 * BAR_MS
        assert pick.outcome == next_bar(5, None).arbitrage_closed[0]
        assert store.arbitrage_positions(scorer="rule") == [] and store.arbitrage_positions(status="open") == []


def test_scorer_comparison_follows_both_scorers(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.sqlite") as store:
        prev = None
        for i in range(33):  # picks at 1 (ml, closed), 11 (rule, dropped), 21 (ml, closed), 31 (rule, open)
            record = next_bar(i, prev)
            store.commit_bar(record)
            prev = record.portfolio
        summary = store.scorer_comparison()
        assert set(summary) == {"ml", "rule"}
        ml, rule = summary["ml"], summary["rule"]
        gains = [next_bar(i, None).arbitrage_closed[0].realised_profit_pct for i in (5, 25)]
        assert (ml.opened, ml.open, ml.closed, ml.dropped) == (2, 0, 2, 0)
        assert ml.mean_profit_pct == pytest.approx(np.mean(gains))
        assert ml.win_rate == pytest.approx(np.mean([g > 0 for g in gains]))  # type: ignore[arg-type]
        assert ml.mean_predicted_profit_pct == pytest.approx(0.2)
        assert ml.total_profit_usd == pytest.approx(100 * sum(gains))  # type: ignore[arg-type]
        assert (rule.opened, rule.open, rule.closed, rule.dropped) == (2, 1, 0, 1)
        assert rule.mean_profit_pct is None and rule.total_profit_usd == 0.0
        assert store.scorer_comparison(since_ms=T0_MS + 30 * BAR_MS)["rule"].opened == 1
        # Closing an unknown pick, or one already closed with other numbers, aborts the bar.
        with pytest.raises(DataValidationError, match="no open arbitrage position 'nope'"):
            store.commit_bar(
                BarRecord(T0_MS + 40 * BAR_MS, prev, arbitrage_closed=[ArbitrageOutcome("nope", "dropped")])
            )
        again = ArbitrageOutcome("p21", "dropped")
        with pytest.raises(DataValidationError, match="already closed"):
            store.commit_bar(BarRecord(T0_MS + 41 * BAR_MS, prev, arbitrage_closed=[again]))
        assert store.last_bar_ts_ms() == T0_MS + 32 * BAR_MS


def test_file_settings_and_schema_markers(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "state.sqlite"
    with StateStore(path) as store:
        store.commit_bar(next_bar(0, None))
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    raw.close()


def test_recommit_is_a_no_op_and_a_diverged_replay_is_refused(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state.sqlite") as store:
        records = []
        prev = None
        for i in range(6):
            records.append(next_bar(i, prev))
            store.commit_bar(records[-1])
            prev = records[-1].portfolio
        before = store.fingerprint()
        # Same bar again, decisions listed in another order: same content, nothing changes.
        again = records[5]
        shuffled = dataclasses.replace(again, decisions=list(reversed(again.decisions)))
        assert store.commit_bar(again) is False and store.commit_bar(shuffled) is False
        assert store.commit_bar(records[3]) is False  # an older, identical bar too
        assert store.fingerprint() == before

        changed = BarRecord(again.bar_ts_ms, PortfolioSnapshot(1.0, 1.0, 0.0, 0.0, 0.0, 0.0))
        with pytest.raises(DataValidationError, match=r"already committed .* different contents"):
            store.commit_bar(changed)
        gap = next_bar(2, None)
        older = BarRecord(T0_MS - BAR_MS, gap.portfolio)
        with pytest.raises(DataValidationError, match="older than the last committed bar"):
            store.commit_bar(older)

        # A fill re-reported identically by a later bar is ignored; a conflicting one aborts the whole bar.
        fill = records[3].fills[0]
        dup = BarRecord(T0_MS + 6 * BAR_MS, prev, fills=[fill])
        assert store.commit_bar(dup)
        assert len(store.fills()) == 1 and store.rows_per_bar()[dup.bar_ts_ms].fills == 0
        conflict = Fill(fill.client_order_id, fill.ts_ms, SYMBOL, "sell", 1.0, 1.0, 0.0, 0.0, 0.0, "limit")
        bad = BarRecord(T0_MS + 7 * BAR_MS, prev, decisions=[Decision(SYMBOL, "hold", "x")], fills=[conflict])
        with pytest.raises(DataValidationError, match="already booked"):
            store.commit_bar(bad)
        assert store.last_bar_ts_ms() == dup.bar_ts_ms  # rolled back: no snapshot, no decision of bar 7
        assert T0_MS + 7 * BAR_MS not in store.rows_per_bar()

        # Standalone metrics and labels follow the same rule.
        assert store.record_metric(T0_MS, "sharpe_1d", 1.5) and not store.record_metric(T0_MS, "sharpe_1d", 1.5)
        with pytest.raises(DataValidationError, match="different value"):
            store.record_metric(T0_MS, "sharpe_1d", 1.6)
        label = records[5].realised_returns[0]
        assert store.set_realised_return(label.bar_ts_ms, SYMBOL, "lgbm", label.realised_return) == 2
        assert store.set_realised_return(label.bar_ts_ms, SYMBOL, "lgbm", label.realised_return, slot="shadow") == 1
        with pytest.raises(DataValidationError, match="already"):
            store.set_realised_return(label.bar_ts_ms, SYMBOL, "lgbm", label.realised_return + 1.0)
        assert store.set_realised_return(T0_MS + 5 * BAR_MS, SYMBOL, "lgbm", 0.5) == 2  # unlabelled until now
        assert store.set_realised_return(T0_MS + 99 * BAR_MS, SYMBOL, "lgbm", 0.5) == 0  # no prediction there


def test_predictions_across_feature_sets(tmp_path: Path) -> None:
    """A model version with another feature order reads back aligned; a missing feature is named."""
    with StateStore(tmp_path / "state.sqlite") as store:
        snap = PortfolioSnapshot(1e4, 1e4, 0.0, 0.0, 0.0, 0.0)
        store.commit_bar(
            BarRecord(T0_MS, snap, predictions=[Prediction(SYMBOL, "m", "1", ["a", "b"], [1.0, 2.0], 0.1)])
        )
        store.commit_bar(
            BarRecord(T0_MS + BAR_MS, snap, predictions=[Prediction(SYMBOL, "m", "2", ["b", "a"], [20.0, 10.0], 0.2)])
        )
        store.commit_bar(
            BarRecord(T0_MS + 2 * BAR_MS, snap, predictions=[Prediction(SYMBOL, "m", "3", ["a", "c"], [5.0, 6.0], 0.3)])
        )
        with pytest.raises(DataValidationError, match=r"without features \['b'\]"):
            store.predictions_matrix("m", ["a", "b"])
        ts, X, pred = store.predictions_matrix("m", ["a"], symbol=SYMBOL)
        assert ts.tolist() == [T0_MS, T0_MS + BAR_MS, T0_MS + 2 * BAR_MS]
        assert X.tolist() == [[1.0], [10.0], [5.0]] and pred.tolist() == [0.1, 0.2, 0.3]
        assert store.predictions_matrix("m", ["c", "a"], model_version="3").X.tolist() == [[6.0, 5.0]]
        assert store.predictions_matrix("m", ["b", "a"], since_ms=T0_MS + 3 * BAR_MS).X.shape == (0, 2)
        assert store.predictions_matrix("m", ["b", "a"], model_version="2").X.tolist() == [[20.0, 10.0]]
        assert store.predictions_matrix("other", ["a"]).X.shape == (0, 1)


# ------------------------------------------------------------------------------------------- bad input
SNAP = PortfolioSnapshot(1e4, 1e4, 0.0, 0.0, 0.0, 0.0)
GOOD_FILL = Fill("o1", T0_MS, SYMBOL, "buy", 1.0, 100.0, 0.1, 0.0, 0.0, "market")


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (BarRecord(T0_MS, PortfolioSnapshot(math.nan, 1e4, 0.0, 0.0, 0.0, 0.0)), "portfolio.cash"),
        (BarRecord(T0_MS, PortfolioSnapshot(1e4, math.inf, 0.0, 0.0, 0.0, 0.0)), "portfolio.equity"),
        (BarRecord(T0_MS, PortfolioSnapshot(1e4, 1e4, True, 0.0, 0.0, 0.0)), "portfolio.position_qty"),
        (BarRecord(T0_MS, PortfolioSnapshot(1e4, 1e4, 0.0, 0.0, 0.0, 0.0, {"x": math.nan})), "broker_state"),
        (BarRecord(T0_MS, PortfolioSnapshot(1e4, 1e4, 0.0, 0.0, 0.0, 0.0, {}, {"t": object()})), "strategy_state"),
        (BarRecord(-1, SNAP), "bar_ts_ms"),
        (BarRecord(T0_MS, SNAP, decisions=[Decision(SYMBOL, "hold", "r", slot="canary")]), "decisions[0].slot"),
        (BarRecord(T0_MS, SNAP, decisions=[Decision(SYMBOL, "yolo", "r")]), "decisions[0].action"),
        (BarRecord(T0_MS, SNAP, decisions=[Decision(SYMBOL, "hold", "")]), "decisions[0].reason"),
        (
            BarRecord(T0_MS, SNAP, decisions=[Decision(SYMBOL, "hold", "r", predicted_return_bps=math.nan)]),
            "decisions[0].predicted_return_bps",
        ),
        (BarRecord(T0_MS, SNAP, decisions=[Decision(SYMBOL, "hold", "r")] * 2), "decisions: the same key"),
        (
            BarRecord(T0_MS, SNAP, predictions=[Prediction(SYMBOL, "m", "1", ["a", "b"], [1.0, math.nan], 0.0)]),
            "predictions[0].features: 'b'",
        ),
        (
            BarRecord(T0_MS, SNAP, predictions=[Prediction(SYMBOL, "m", "1", ["a", "b"], [1.0], 0.0)]),
            "predictions[0].features: shape",
        ),
        (
            BarRecord(T0_MS, SNAP, predictions=[Prediction(SYMBOL, "m", "1", ["a"], [1.0], math.inf)]),
            "predictions[0].prediction",
        ),
        (
            BarRecord(T0_MS, SNAP, predictions=[Prediction(SYMBOL, "m", "1", ["a"], [1.0], 0.0, slot="x")]),
            "predictions[0].slot",
        ),
        (BarRecord(T0_MS, SNAP, fills=[Fill("o1", T0_MS, SYMBOL, "long", 1.0, 1.0, 0.0, 0.0, 0.0, "market")]), "side"),
        (BarRecord(T0_MS, SNAP, fills=[Fill("o1", T0_MS, SYMBOL, "buy", 0.0, 1.0, 0.0, 0.0, 0.0, "market")]), "qty"),
        (BarRecord(T0_MS, SNAP, fills=[Fill("o1", T0_MS, SYMBOL, "buy", 1.0, 1.0, 0.0, 0.0, 0.0, "iceberg")]), "kind"),
        (BarRecord(T0_MS, SNAP, fills=[GOOD_FILL, GOOD_FILL]), "fills: the same key"),
        (BarRecord(T0_MS, SNAP, metrics={"sharpe": math.nan}), "metrics['sharpe']"),
        (
            BarRecord(T0_MS, SNAP, realised_returns=[RealisedReturn(T0_MS, SYMBOL, "m", math.nan)]),
            "realised_returns[0].realised_return",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_field(tmp_path: Path, record: BarRecord, field: str) -> None:
    with StateStore(tmp_path / "state.sqlite") as store:
        with pytest.raises(DataValidationError) as info:
            store.commit_bar(record)
        assert field in str(info.value)
        assert store.rows_per_bar() == {}


# ------------------------------------------------------------------------------- files that are not ours
def test_garbage_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    data = b"this is a CSV, not a database\n" + bytes(range(256)) * 20
    path.write_bytes(data)
    with pytest.raises(DataValidationError, match=str(path)):
        StateStore(path)
    with pytest.raises(DataValidationError, match=str(path)):
        StateStore(path, read_only=True)
    assert path.read_bytes() == data


def test_foreign_sqlite_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "mlflow.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE experiments (id INTEGER)")
    raw.commit()
    raw.close()
    data = path.read_bytes()
    with pytest.raises(DataValidationError, match="another program"):
        StateStore(path)
    assert path.read_bytes() == data


def _schema_1_file(path: Path) -> None:
    """A state file as schema 1 wrote it (the tables before ``arbitrage_positions``), with one bar."""
    raw = sqlite3.connect(path, isolation_level=None)
    for statement in _SCHEMA:
        if "arbitrage" not in statement:
            raw.execute(statement)
    raw.execute(f"PRAGMA application_id={APPLICATION_ID}")
    raw.execute("PRAGMA user_version=1")
    raw.execute("INSERT INTO portfolio_state VALUES (?, 1, 1, 0, 0, 0, 0, '{}', '{}', 'x', 0)", (T0_MS,))
    raw.close()


def test_a_schema_1_file_is_read_as_is_and_migrated_when_opened_for_writing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.sqlite"
    _schema_1_file(path)
    with StateStore(path, read_only=True) as reader:
        assert reader.schema_version == 1 and reader.last_bar_ts_ms() == T0_MS
        assert reader.rows_per_bar()[T0_MS].portfolio == 1 and reader.fingerprint()
        with pytest.raises(DataValidationError, match="schema version 1: arbitrage_positions needs 2"):
            reader.arbitrage_positions()
    with caplog.at_level("WARNING"), StateStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.last_bar_ts_ms() == T0_MS and store.arbitrage_positions() == []
    assert f"migrated from schema 1 to {SCHEMA_VERSION}" in caplog.text
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()
    # A version with no migration path (0 with our application id) is refused, untouched.
    old = tmp_path / "old.sqlite"
    raw = sqlite3.connect(old)
    raw.execute(f"PRAGMA application_id={APPLICATION_ID}")
    raw.execute("CREATE TABLE portfolio_state (bar_ts_ms INTEGER)")
    raw.commit()
    raw.close()
    data = old.read_bytes()
    with pytest.raises(DataValidationError, match="schema version 0 and no migration"):
        StateStore(old)
    assert old.read_bytes() == data


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with StateStore(path) as store:
        store.commit_bar(next_bar(0, None))
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(DataValidationError, match=rf"{path}.*schema version {SCHEMA_VERSION + 1}, newer"):
        StateStore(path)
    with pytest.raises(DataValidationError, match="newer"):
        StateStore(path, read_only=True)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="does not exist"):
        StateStore(tmp_path / "absent.sqlite", read_only=True)
    assert not (tmp_path / "absent.sqlite").exists()
    with pytest.raises(DataValidationError, match="not a file"):
        StateStore(tmp_path)
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(DataValidationError, match="never initialised"):
        StateStore(empty, read_only=True)
    with StateStore(empty) as store:  # a 0-byte file is a fresh database
        assert store.commit_bar(next_bar(0, None))
    with StateStore(empty, read_only=True) as reader:
        assert reader.last_bar_ts_ms() == T0_MS
        with pytest.raises(ConfigError, match="read-only"):
            reader.commit_bar(next_bar(1, None))


# ---------------------------------------------------------------------------------------- concurrency
def test_reader_sees_the_last_commit_not_an_open_transaction(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    run_writer(path, 3)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")  # a writer half-way through bar 3
    raw.execute("INSERT INTO portfolio_state VALUES (?, 0, 0, 0, 0, 0, 0, '{}', '{}', 'x', 0)", (T0_MS + 3 * BAR_MS,))
    with StateStore(path, read_only=True) as reader:
        assert reader.last_bar_ts_ms() == T0_MS + 2 * BAR_MS
        assert assert_all_or_nothing(reader) == 3
    with StateStore(path, timeout_s=0.05) as second_writer, pytest.raises(TemporaryError, match="busy"):
        second_writer.commit_bar(next_bar(3, None))
    raw.execute("ROLLBACK")
    raw.close()


def test_concurrent_reader_sees_consistent_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    n_bars = 150
    proc = subprocess.Popen(writer_cmd(path, n_bars, 0.002), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        seen = []
        with StateStore(path, read_only=True) as reader:
            while proc.poll() is None:
                seen.append(assert_all_or_nothing(reader))
                m = reader.predictions_matrix("lgbm", FEATURES)
                assert len(m.bar_ts_ms) >= seen[-1] and not np.isnan(m.X).any()
            assert proc.wait() == 0
            assert assert_all_or_nothing(reader) == n_bars
    finally:
        proc.kill()
        proc.wait()
    assert seen == sorted(seen)  # snapshots only move forward
    assert any(0 < k < n_bars for k in seen)  # the reads did overlap the writes


# --------------------------------------------------------------------------------------- crash safety
def test_sigkill_inside_the_transaction_leaves_no_trace_of_the_bar(tmp_path: Path) -> None:
    """Deterministic complement of the random kills: die at chosen steps inside bar 10's transaction."""
    reference = tmp_path / "uninterrupted.sqlite"
    calls: list[int] = []
    with StateStore(reference) as store:  # count the progress callbacks of bar 10's commit, as the writer runs it
        prev = None
        for i in range(12):
            record = next_bar(i, prev)
            if i == 10:
                store._conn.set_progress_handler(lambda: calls.append(1) or 0, PROGRESS_STEP)
            store.commit_bar(record)
            store._conn.set_progress_handler(None, PROGRESS_STEP)
            prev = record.portfolio
        expected = store.fingerprint()
    assert len(calls) >= 20
    for k in sorted({1, len(calls) // 3, 2 * len(calls) // 3, len(calls) - 1}):
        path = tmp_path / f"killed_at_{k}.sqlite"
        proc = subprocess.run(writer_cmd(path, 12, kill_at=(10, k)), cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr  # it died inside bar 10's commit
        with StateStore(path) as store:
            assert assert_all_or_nothing(store) == 10
        run_writer(path, 12)
        with StateStore(path) as store:
            assert store.fingerprint() == expected


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    n_bars = 600
    reference = tmp_path / "uninterrupted.sqlite"
    run_writer(reference, n_bars)

    path = tmp_path / "killed.sqlite"
    rng = random.Random(20240101)
    stops = []
    for attempt in range(7):
        proc = subprocess.Popen(writer_cmd(path, n_bars), cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            if attempt == 0:  # anywhere, even before or while the file is created
                time.sleep(rng.uniform(0.0, 0.5))
            else:  # after a random number of further commits, at a random instant of the next ones
                target = rng.randint(10, 60)
                for _ in range(target):
                    if not proc.stdout.readline().startswith(("ready", "committed")):
                        break
                time.sleep(rng.uniform(0.0, 0.004))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        if path.exists():
            with StateStore(path) as store:  # opens cleanly after every kill
                stops.append(assert_all_or_nothing(store))
    assert len(set(stops)) >= 3 and max(stops) < n_bars, stops  # the kills landed at different points

    subprocess.run(writer_cmd(path, n_bars), cwd=ROOT, check=True, capture_output=True)
    with StateStore(path) as resumed, StateStore(reference, read_only=True) as uninterrupted:
        assert assert_all_or_nothing(resumed) == n_bars
        assert resumed.fingerprint() == uninterrupted.fingerprint()
        assert resumed.decisions() == uninterrupted.decisions()
        assert resumed.fills() == uninterrupted.fills()


if __name__ == "__main__":
    kill = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else None
    run_writer(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), announce=True, kill_at=kill)
