"""The edge runner against the stub exchange on 127.0.0.1 (Binance USDⓈ-M JSON, ccxt's own code) on an
accelerated clock: the real BTC/USDT month replayed (trades happen; SIGKILL at random points and restart
ends in the state of an uninterrupted run), constructed candles that fire each rule, hot model swap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from cryptoml.config import load_params
from cryptoml.edge.runner import ModelSource, Runner
from cryptoml.edge.state import StateStore
from cryptoml.export.convert import export_model
from cryptoml.features.technical import TECHNICAL_FEATURES, technical_features
from cryptoml.market.exchange import make_exchange
from tests.conftest import shared_file
from tests.support.stub_exchange import StubExchange, load_candles

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "flows.cli"]
SYMBOL = "BTC/USDT:USDT"
MINUTE = 60_000


def _iso(ts_ms: int) -> str:
    return pd.Timestamp(ts_ms, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M")


def price_bundle(out: Path, X: pd.DataFrame, y: np.ndarray, horizon: int = 10) -> Path:
    """A real LightGBM forward-return bundle (export_model: parity gate, checksum, parity sample)."""
    import lightgbm as lgb

    model = lgb.LGBMRegressor(n_estimators=20, num_leaves=8, learning_rate=0.2, verbose=-1, deterministic=True)
    model.fit(X, y)
    extra = {
        "label": {"name": f"log_return_{horizon}m", "horizon_minutes": horizon},
        "horizon_minutes": horizon,
        "training_window": {"start_ms": 0, "end_ms": 1},
        "data_hash": {"md5": "test"},
        "metrics": {},
        "git_commit": "test",
    }
    return export_model("lightgbm_regressor", model.booster_, X, out, "price_lgbm", extra)


@pytest.fixture(scope="module")
def month() -> pd.DataFrame:
    return load_candles(shared_file("binance_spot_btcusdt_1m_20230417-20230517.parquet"))


@pytest.fixture(scope="module")
def models_dir(month: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A price_lgbm bundle trained on the first ten days of the month (10-minute forward return)."""
    train = month.iloc[: 10 * 1440].reset_index(drop=True)
    feats = technical_features(train)
    close = train["close"].to_numpy()
    y = np.full(len(train), np.nan)
    y[:-10] = np.log(close[10:] / close[:-10])
    keep = ~feats["is_warmup"].to_numpy() & np.isfinite(y)
    out = tmp_path_factory.mktemp("models")
    price_bundle(out / "price_lgbm", feats.loc[keep, list(TECHNICAL_FEATURES)].reset_index(drop=True), y[keep])
    return out


@pytest.fixture(scope="module")
def stub(month: pd.DataFrame) -> Any:
    with StubExchange() as server:
        server.set_candles("BTCUSDT", month)
        yield server


def write_params(path: Path, **sections: dict[str, Any]) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def live_cmd(
    stub: Any, params: Path, state: Path, models: Path, start_ms: int, until_ms: int, speed: float
) -> list[str]:
    return [
        *CLI, "live", "--paper", "--api-url", stub.url, "--exchange", "binanceusdm", "--symbol", SYMBOL,
        "--state", str(state), "--models", str(models), "--params", str(params),
        "--clock-start", _iso(start_ms), "--clock-speed", str(speed), "--until", _iso(until_ms),
        "--log-level", "WARNING",
    ]  # fmt: skip


def test_replayed_month_trades_and_a_killed_runner_restarts_into_the_same_state(
    stub: Any, models_dir: Path, month: pd.DataFrame, tmp_path: Path
) -> None:
    # Ten days in: the model never saw these bars. Entries above 2 bps (the 8 bps default rarely fires on a
    # 10-day toy model); staleness off, so the state depends on the bars alone (the stale rule is tested below).
    start = int(month["ts_ms"].iloc[11 * 1440])
    until = start + 8 * 60 * MINUTE
    params = write_params(
        tmp_path / "params.yaml",
        strategy={"entry_bps": 2.0, "exit_reversal_bps": 1.0, "max_bar_age_seconds": 1e9},
        live={"buffer_hours": 2.0, "poll_seconds": 5.0, "model_poll_seconds": 3600.0, "shadow": False},
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    reference = tmp_path / "reference.sqlite"
    done = subprocess.run(
        live_cmd(stub, params, reference, models_dir, start, until, speed=1e6), cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    with StateStore(reference, read_only=True) as store:
        fills = store.fills()
        decisions = store.decisions()
        expected = store.fingerprint()
        assert store.last_bar_ts_ms() == until
    assert summary["bars"] == len(decisions) == 2 * 60 + 8 * 60 + 1
    assert len(fills) >= 2, "the replay should trade"
    assert {d.action for _, d in decisions} & {"enter_long", "enter_short"}

    # The same replay, SIGKILLed at random moments and restarted each time with the same command.
    crashed = tmp_path / "crashed.sqlite"
    rng = np.random.default_rng(7)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen(
            live_cmd(stub, params, crashed, models_dir, start, until, speed=600), cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(float(rng.uniform(1.5, 4.0)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        if proc.returncode == 0:
            break
    else:
        final = subprocess.run(
            live_cmd(stub, params, crashed, models_dir, start, until, speed=1e6), cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 1
    with StateStore(crashed, read_only=True) as store:
        assert store.last_bar_ts_ms() == until
        assert store.fingerprint() == expected


# --- constructed cases -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def always_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle that predicts about +100 bps whatever the features: every flat bar is an entry signal."""
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(400, len(TECHNICAL_FEATURES))), columns=list(TECHNICAL_FEATURES))
    out = tmp_path_factory.mktemp("always_long")
    price_bundle(out / "price_lgbm", X, 0.01 + 1e-6 * rng.normal(size=400))
    return out


def flat_bars(start_ms: int, n: int, price: float = 100.0) -> pd.DataFrame:
    ts = start_ms + MINUTE * np.arange(n)
    return pd.DataFrame(
        {"ts_ms": ts, "open": price, "high": price * 1.0001, "low": price * 0.9999, "close": price, "volume": 10.0}
    )


def run_in_process(bars: pd.DataFrame, models: Path, tmp_path: Path, now_lag_ms: int = 1000, **strategy: Any) -> Any:
    """Run the runner in this process over ``bars`` served by a fresh stub; returns the state store rows."""
    p = load_params(ROOT / "params.yaml")
    from cryptoml.config import replace_section

    p = replace_section(p, "strategy", **strategy)
    p = replace_section(p, "live", buffer_hours=1.0, shadow=False)
    first, last = int(bars["ts_ms"].iloc[0]), int(bars["ts_ms"].iloc[-1])
    clock = {"now": first + 60 * MINUTE + MINUTE + now_lag_ms}

    def sleep(_: float) -> None:  # a simulated clock: waiting moves it to the next bar's close
        clock["now"] += MINUTE

    with StubExchange() as server:
        server.set_candles("BTCUSDT", bars)
        with StateStore(tmp_path / "state.sqlite") as store:
            runner = Runner(
                exchange=make_exchange("binanceusdm", api_url=server.url), symbol=SYMBOL, store=store,
                models=ModelSource(models, shadow=False), strategy=p.strategy, broker_params=p.broker,
                live=p.live, clock_ms=lambda: clock["now"], sleep=sleep, start_ms=first + 60 * MINUTE,
            )  # fmt: skip
            runner.run(until_ms=last)
            return store.decisions(), store.fills()


def reasons(decisions: list[Any]) -> list[str]:
    return [d.reason for _, d in decisions]


def test_stop_loss_cooldown_take_profit_and_kill_switch_fire(always_long: Path, tmp_path: Path) -> None:
    start = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000 + 3_600_000  # 01:00 UTC
    warm = flat_bars(start, 62)  # the features warm up (60 bars) before any entry
    t = int(warm["ts_ms"].iloc[-1]) + MINUTE
    rows = [warm]
    # entry at 100 -> a bar trading down to 98.5: the 1 % stop fills at 99
    rows.append(flat_bars(t, 1))
    rows.append(
        pd.DataFrame(
            {"ts_ms": [t + MINUTE], "open": [100.0], "high": [100.0], "low": [98.5], "close": [98.8], "volume": [10.0]}
        )
    )
    rows.append(flat_bars(t + 2 * MINUTE, 5, 98.8))  # cooldown, then a new entry at 98.8
    t2 = t + 7 * MINUTE
    rows.append(
        pd.DataFrame(
            {"ts_ms": [t2], "open": [98.8], "high": [102.5], "low": [98.8], "close": [102.0], "volume": [10.0]}
        )
    )
    rows.append(flat_bars(t2 + MINUTE, 6, 102.0))
    # three stop-losses in a row take the day below -3 %: the kill switch trips and blocks further entries
    t3 = t2 + 7 * MINUTE
    price = 102.0
    for k in range(7):
        rows.append(flat_bars(t3 + k * 6 * MINUTE, 2, price))
        low = price * 0.985
        rows.append(
            pd.DataFrame(
                {
                    "ts_ms": [t3 + k * 6 * MINUTE + 2 * MINUTE],
                    "open": [price],
                    "high": [price],
                    "low": [low],
                    "close": [low],
                    "volume": [10.0],
                }
            )
        )
        price = low
        rows.append(flat_bars(t3 + k * 6 * MINUTE + 3 * MINUTE, 3, price))
    bars = pd.concat(rows, ignore_index=True)
    decisions, fills = run_in_process(bars, always_long, tmp_path)
    seen = reasons(decisions)
    kinds = [f.kind for _, f in fills]
    assert "stop_loss" in kinds and "take_profit" in kinds
    assert "cooldown" in seen
    assert "kill_switch" in seen, [r for r in seen if r != "stale_data"]
    first_kill = seen.index("kill_switch")
    assert all(r in ("kill_switch",) for r in seen[first_kill:]), seen[first_kill:]
    stop_fill = next(f for _, f in fills if f.kind == "stop_loss")
    assert stop_fill.price == pytest.approx(99.0, rel=2e-3)


def test_stale_bars_are_not_traded(always_long: Path, tmp_path: Path) -> None:
    start = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000
    bars = flat_bars(start, 140)
    # the clock runs hours ahead of the bars: every bar is older than max_bar_age_seconds
    decisions, fills = run_in_process(bars, always_long, tmp_path, now_lag_ms=6 * 3_600_000)
    assert not fills
    assert "stale_data" in reasons(decisions)


def test_a_corrupt_model_is_refused_and_the_old_one_keeps_running(
    always_long: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    models = tmp_path / "models"
    shutil.copytree(always_long, models)
    source = ModelSource(models, shadow=False)
    slots = source.poll({})
    old = slots["champion"]
    onnx_path = models / "price_lgbm" / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    meta = models / "price_lgbm" / "model_meta.json"
    os.utime(meta, None)
    with caplog.at_level("ERROR"):
        after = source.poll(slots)
    assert after["champion"] is old
    assert "refused the champion model" in caplog.text
    # a good bundle replaces it at the next poll
    shutil.rmtree(models / "price_lgbm")
    shutil.copytree(always_long / "price_lgbm", models / "price_lgbm")
    time.sleep(0.01)
    os.utime(models / "price_lgbm" / "model_meta.json", None)
    swapped = source.poll(after)
    assert swapped["champion"] is not old and swapped["champion"].version == old.version


def test_live_imports_no_training_stack() -> None:
    code = (
        "import sys, flows.cli, cryptoml.edge.runner, cryptoml.edge.state, cryptoml.market.exchange;"
        "bad=[m for m in ('pandas','tensorflow','mlflow','prefect','keras','lightgbm','xgboost') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
