"""Backtest report files: contents, JSON safety, byte-identical rewrites, and no partial report on bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from cryptoml.backtest.metrics import performance_metrics
from cryptoml.backtest.report import (
    REPORT_FILES,
    fold_boundaries_ms,
    json_safe,
    metrics_json,
    trades_frame,
    write_backtest_report,
)
from cryptoml.errors import DataValidationError
from tests.conftest import shared_file

MIN = 60_000
DAY = 86_400_000
T0 = 1_700_006_400_000  # a UTC midnight


@dataclasses.dataclass(frozen=True)
class FoldLike:
    index: int
    test_start_ms: int
    test_end_ms: int


def curve(n: int = 3 * 1440, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ts = T0 + MIN * np.arange(n, dtype=np.int64)
    equity = 10_000 * np.cumprod(1 + rng.normal(2e-5, 1e-3, n))
    close = 30_000 * np.cumprod(1 + rng.normal(0, 1e-3, n))
    return ts, equity, close


TRADES = [
    {
        "side": "long",
        "entry_ts_ms": T0 + 5 * MIN,
        "exit_ts_ms": T0 + 65 * MIN,
        "net_pnl": 12.5,
        "exit_reason": "signal",
    },
    {
        "side": "short",
        "entry_ts_ms": T0 + DAY,
        "exit_ts_ms": T0 + DAY + MIN,
        "net_pnl": -0.1,
        "exit_reason": "stop_loss",
    },
]


def report_inputs(seed: int = 0) -> dict:
    ts, equity, close = curve(seed=seed)
    folds = [{"index": k, "test_start_ms": T0 + k * DAY, "test_end_ms": T0 + (k + 1) * DAY} for k in range(3)]
    overall = performance_metrics(ts, equity, trade_pnl=[t["net_pnl"] for t in TRADES], benchmark_close=close)
    return {
        "metrics": overall,
        "folds": folds,
        "trades": TRADES,
        "ts_ms": ts,
        "equity": equity,
        "benchmark_close": close,
    }


def test_writes_the_four_contract_files(tmp_path: Path) -> None:
    inputs = report_inputs()
    paths = write_backtest_report(tmp_path / "reports" / "backtest", **inputs, title="BTC/USDT:USDT")
    assert {name: p.name for name, p in paths.items()} == REPORT_FILES
    assert sorted(p.name for p in paths["metrics"].parent.iterdir()) == sorted(REPORT_FILES.values())  # no temps
    doc = json.loads(paths["metrics"].read_text())
    assert set(doc) == {"overall", "folds"} and len(doc["folds"]) == 3
    assert doc["overall"]["n_trades"] == 2 and doc["overall"]["sharpe"] == pytest.approx(inputs["metrics"]["sharpe"])
    trades = pd.read_csv(paths["trades"])
    assert list(trades.columns) == list(TRADES[0]) and trades["net_pnl"].tolist() == [12.5, -0.1]
    for name in ("equity", "drawdown"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(paths[name]).shape
        assert width == 1000 and height > 300
        assert b"Software" not in paths[name].read_bytes()


def test_same_input_gives_identical_bytes_and_a_rewrite_replaces_the_report(tmp_path: Path) -> None:
    first = write_backtest_report(tmp_path / "a", **report_inputs())
    second = write_backtest_report(tmp_path / "b", **report_inputs())
    for name in REPORT_FILES:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    other = write_backtest_report(tmp_path / "b", **report_inputs(seed=1))
    assert other["equity"].read_bytes() != first["equity"].read_bytes()
    assert other["drawdown"].read_bytes() != first["drawdown"].read_bytes()
    assert other["metrics"].read_bytes() != first["metrics"].read_bytes()


def test_metrics_json_is_sorted_and_nan_free() -> None:
    metrics = {"sharpe": float("nan"), "b": np.float64(1.5), "a": np.int64(3), "pf": float("inf"), "ok": True}
    folds = [{"z": np.array([1.0, np.nan]), "index": 0, "window": (T0, T0 + DAY)}]
    text = metrics_json(metrics, folds)
    assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
    doc = json.loads(text)
    assert doc == {
        "folds": [{"index": 0, "window": [T0, T0 + DAY], "z": [1.0, None]}],
        "overall": {"a": 3, "b": 1.5, "ok": True, "pf": None, "sharpe": None},
    }
    assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n"


def test_json_safe_names_what_cannot_be_written() -> None:
    with pytest.raises(DataValidationError, match=r"overall\.model: object"):
        json_safe({"model": object()}, "overall")
    assert json_safe(FoldLike(0, 1, 2)) == {"index": 0, "test_start_ms": 1, "test_end_ms": 2}


def test_fold_boundaries_from_dicts_and_dataclasses() -> None:
    folds = [FoldLike(0, T0, T0 + DAY), {"test_start_ms": T0 + DAY, "test_end_ms": T0 + 2 * DAY}, {"index": 2}]
    assert fold_boundaries_ms(folds) == [T0, T0 + DAY, T0 + 2 * DAY]
    assert fold_boundaries_ms([]) == []
    with pytest.raises(DataValidationError, match=r"folds\[0\]"):
        fold_boundaries_ms([3])


def test_trades_from_a_frame_or_records_give_the_same_csv(tmp_path: Path) -> None:
    as_records = write_backtest_report(tmp_path / "r", **report_inputs())
    inputs = {**report_inputs(), "trades": pd.DataFrame(TRADES, index=[7, 9])}
    as_frame = write_backtest_report(tmp_path / "f", **inputs)
    assert as_records["trades"].read_bytes() == as_frame["trades"].read_bytes()
    assert trades_frame([]).empty
    with pytest.raises(DataValidationError, match=r"trades\[1\]"):
        trades_frame([TRADES[0], 5])  # type: ignore[list-item]


def test_no_benchmark_and_no_folds(tmp_path: Path) -> None:
    ts, equity, _ = curve(n=10)
    paths = write_backtest_report(tmp_path, metrics={}, folds=[], trades=[], ts_ms=ts, equity=equity)
    assert json.loads(paths["metrics"].read_text()) == {"folds": [], "overall": {}}
    assert imread(paths["equity"]).size > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"benchmark_close": np.ones(5)}, "benchmark_close and equity differ"),
        ({"equity": np.full(3 * 1440, np.nan)}, "equity holds NaN"),
        ({"metrics": {"bad": object()}}, "overall.bad"),
        ({"trades": [1, 2]}, r"trades\[0\]"),
        ({"folds": ["x"]}, r"folds\[0\]"),
    ],
)
def test_bad_input_writes_nothing(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(DataValidationError, match=message):
        write_backtest_report(tmp_path / "out", **{**report_inputs(), **change})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_real_btc_month_report(tmp_path: Path) -> None:
    """A month of real 1-minute BTC closes as the benchmark of a half-exposed curve, daily folds."""
    bars = pd.read_parquet(shared_file("binance_spot_btcusdt_1m_20230417-20230517.parquet"))
    ts = bars["date"].astype("int64").to_numpy() // 1_000_000
    close = bars["close"].to_numpy()
    equity = 10_000 * np.cumprod(np.concatenate(([1.0], 1 + 0.5 * (close[1:] / close[:-1] - 1))))
    folds = [{"test_start_ms": int(t), "test_end_ms": int(t) + DAY} for t in range(int(ts[0]), int(ts[-1]), DAY)]
    metrics = performance_metrics(ts, equity, trade_pnl=[], benchmark_close=close, position_qty=np.ones(ts.size))
    paths = write_backtest_report(
        tmp_path, metrics=metrics, folds=folds, trades=[], ts_ms=ts, equity=equity, benchmark_close=close
    )
    doc = json.loads(paths["metrics"].read_text())
    assert len(doc["folds"]) == 30
    held = performance_metrics(ts, close, trade_pnl=[])
    assert 0.0 < doc["overall"]["max_drawdown"] < held["max_drawdown"]  # half the exposure, a shallower drawdown
    # Scaling every return by 0.5 scales mean and std alike: the Sharpe ratio is unchanged.
    assert doc["overall"]["sharpe"] == pytest.approx(doc["overall"]["buy_hold_sharpe"], rel=1e-9)
