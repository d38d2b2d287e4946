"""The edge runner against the stub exchange on 127.0.0.1 (Binance USDⓈ-M and spot JSON, ccxt's own code) on an
accelerated clock: the real BTC/USDT month replayed with every model loaded and the opportunity scorer on
(trades happen, both scorers decide and follow picks on paper; SIGKILL at random points and restart ends
in the state of an uninterrupted run), constructed candles that fire each rule, hot model swap, the bar
feed hook."""

from __future__ import annotations

import json
import os
import shutil
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

from cryptoml.config import load_params, replace_section
from cryptoml.edge.runner import CHAMPION, KERAS_MODEL, PRICE_MODEL, ModelSource, Runner
from cryptoml.edge.state import StateStore
from cryptoml.export.convert import export_model
from cryptoml.features.opportunity import ENTRY_FEATURE_NAMES, FEATURE_NAMES, feature_matrix
from cryptoml.features.technical import TECHNICAL_FEATURES, technical_features
from cryptoml.market.exchange import make_exchange
from tests.conftest import shared_file
from tests.edge.test_api import _meta_extra, build_price_bundles, synthetic_opportunities
from tests.support.stub_exchange import SPOT_EXCHANGE_INFO, Book, StubExchange, load_candles

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "flows.cli"]
SYMBOL = "BTC/USDT:USDT"
MINUTE = 60_000
HOLDS = (1.0, 4.0, 8.0, 24.0)


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


def opportunity_bundles(out: Path, rows: int = 600, seed: int = 3) -> None:
    """The three opportunity models (tiny XGBoost) trained on generated rows whose profit grows with the
    funding earned over the hold: on the replay's funding they see an edge, so the ML scorer opens picks."""
    from cryptoml.models.opportunity import HoldDurationModel, ProfitRegressor, SuccessClassifier

    cols = synthetic_opportunities(rows, seed, HOLDS)
    X = pd.DataFrame(feature_matrix(cols), columns=list(FEATURE_NAMES))
    rng = np.random.default_rng(seed)
    profit = cols["fund_profit_8h"] * cols["hold_hours"] / 8 + 0.01 + rng.normal(0, 0.01, rows)
    small = {"n_estimators": 20, "max_depth": 3, "n_jobs": 1, "random_state": 0}
    best = np.asarray(HOLDS)[rng.integers(0, len(HOLDS), rows)]
    sizing = {"sizing": {"mean_win_pct": 0.4, "mean_loss_pct": 0.3}}
    for kind, model, data, name, extra in (
        ("xgboost_regressor", ProfitRegressor(**small).fit(X, profit), X, "opportunity_profit", sizing),
        ("xgboost_classifier", SuccessClassifier(**small).fit(X, (profit > 0).astype(float)), X,
         "opportunity_success", {}),
        ("xgboost_multiclass", HoldDurationModel(**small, holds=HOLDS).fit(X[list(ENTRY_FEATURE_NAMES)], best),
         X[list(ENTRY_FEATURE_NAMES)], "opportunity_hold", {"classes": list(HOLDS)}),
    ):  # fmt: skip
        export_model(kind, model, data, out / name, name, _meta_extra(**extra))


@pytest.fixture(scope="module")
def month() -> pd.DataFrame:
    return load_candles(shared_file("binance_spot_btcusdt_1m_20230417-20230517.parquet"))


@pytest.fixture(scope="module")
def models_dir(month: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every model the runner loads: price_lgbm trained on the first ten days of the month (10-minute
    forward return), an untrained price_cnn_lstm, and the three opportunity models."""
    train = month.iloc[: 10 * 1440].reset_index(drop=True)
    feats = technical_features(train)
    close = train["close"].to_numpy()
    y = np.full(len(train), np.nan)
    y[:-10] = np.log(close[10:] / close[:-10])
    keep = ~feats["is_warmup"].to_numpy() & np.isfinite(y)
    out = tmp_path_factory.mktemp("models")
    price_bundle(out / "price_lgbm", feats.loc[keep, list(TECHNICAL_FEATURES)].reset_index(drop=True), y[keep])
    scratch = tmp_path_factory.mktemp("keras")
    build_price_bundles(scratch)  # also a toy price_lgbm and the sentiment variant: only price_cnn_lstm is kept
    shutil.copytree(scratch / KERAS_MODEL, out / KERAS_MODEL)
    opportunity_bundles(out)
    return out


def replay_funding(month: pd.DataFrame) -> pd.DataFrame:
    """Real Binance XRPUSDT settlement rates (shared data, in order) re-stamped on the month's 8-hour
    schedule: no BTC funding of that month was recorded."""
    raw = pd.read_csv(shared_file("funding_rates_binance_8h.csv"))
    rates = raw.loc[raw["symbol"] == "XRPUSDT", "funding_rate"].to_numpy()
    first = int(month["ts_ms"].iloc[0]) // (8 * 3_600_000) * (8 * 3_600_000) + 8 * 3_600_000
    ts = first + 8 * 3_600_000 * np.arange(len(rates)) + 5  # Binance stamps settlements a few ms late
    return pd.DataFrame({"ts_ms": ts, "funding_rate": rates})


@pytest.fixture(scope="module")
def stub(month: pd.DataFrame) -> Any:
    """The month as the BTCUSDT perp (candles, funding, a tight deep book) and as the spot (2 bps below)."""
    with StubExchange(spot_exchange_info=json.loads(SPOT_EXCHANGE_INFO.read_text())) as server:
        server.set_candles("BTCUSDT", month)
        spot = month.copy()
        spot[["open", "high", "low", "close"]] *= 0.9998
        server.set_spot_candles("BTCUSDT", spot)
        server.set_funding("BTCUSDT", replay_funding(month))
        # The perp book is stamped far ahead: the runner clamps it to the snapshot time (a fresh book there).
        server.set_book("BTCUSDT", Book([(29_000.0, 50.0)], [(29_000.5, 50.0)], ts_ms=2**52))
        server.set_spot_book("BTCUSDT", Book([(29_000.0, 50.0)], [(29_000.5, 50.0)], ts_ms=0))
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
    # The scorer runs with costs that a funding spread of 1 bp per 8 h can repay within the test's hours.
    start = int(month["ts_ms"].iloc[11 * 1440])
    until = start + 8 * 60 * MINUTE
    params = write_params(
        tmp_path / "params.yaml",
        strategy={"entry_bps": 2.0, "exit_reversal_bps": 1.0, "max_bar_age_seconds": 1e9},
        live={"buffer_hours": 2.0, "poll_seconds": 5.0, "model_poll_seconds": 3600.0, "shadow": False,
              "opportunity_scoring": True},
        market={"symbols": [SYMBOL]},
        simulate={"hold_hours": [1, 4, 8, 24], "taker_fee_bps": {"default": 0.0}},
    )  # fmt: skip
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
        picks = store.arbitrage_positions()
        comparison = store.scorer_comparison()
        keras = store.predictions_matrix(KERAS_MODEL, ["close"])
        labelled = store.prediction_outcomes(KERAS_MODEL)
    strategy = [d for _, d in decisions if d.source == "strategy"]
    assert summary["bars"] == len(strategy) == 2 * 60 + 8 * 60 + 1
    assert len(fills) >= 2, "the replay should trade"
    assert {d.action for d in strategy} & {"enter_long", "enter_short"}
    # Every model ran: the Keras model from its 120th bar on (logged, labelled one bar later), the
    # opportunity models on each 5-minute grid time.
    assert len(keras.bar_ts_ms) == summary["bars"] - 119 and len(labelled[0]) == len(keras.bar_ts_ms) - 1
    ml = [d for _, d in decisions if d.source == "opportunity_ml"]
    rule = [d for _, d in decisions if d.source == "opportunity_rule"]
    assert len(ml) == len(rule) >= 100  # one spot-perp opportunity per grid time with a settled rate >= 0
    assert all(d.model_version and "opportunity_profit=sha256:" in d.model_version for d in ml)
    assert all(d.symbol == "spot_perp:BTC:binance-spot:binanceusdm-swap" for d in ml + rule)
    assert {d.action for d in ml} == {d.action for d in rule} == {"open_arbitrage", "skip_arbitrage"}
    assert any(d.reason.startswith("already holding it") for d in ml + rule)
    # Both scorers' picks were followed on paper and some ended with an outcome a query compares.
    assert {p.entry.scorer for p in picks} == {"ml", "rule"}
    # Each leg on its own venue (the spot on binance beside the binanceusdm perp), so each pays its own fee.
    assert all([(g["exchange"], g["symbol"]) for g in p.entry.details["legs"]]
               == [("binance", "BTC/USDT"), ("binanceusdm", SYMBOL)] for p in picks)  # fmt: skip
    assert comparison["ml"].closed >= 1 and comparison["rule"].closed >= 1
    closed = [p for p in picks if p.status == "closed"]
    assert all(p.outcome is not None and np.isfinite(p.outcome.realised_profit_pct) for p in closed)
    assert any(p.outcome is not None and p.outcome.funding_usd != 0 for p in closed)

    # The same replay, SIGKILLed at random moments and restarted each time with the same command.
    crashed = tmp_path / "crashed.sqlite"
    rng = np.random.default_rng(7)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen(
            live_cmd(stub, params, crashed, models_dir, start, until, speed=600), cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(float(rng.uniform(2.0, 4.5)))
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


def run_in_process(
    bars: pd.DataFrame, models: Path, tmp_path: Path, now_lag_ms: int = 1000, bar_feed: Any = None, **strategy: Any
) -> Any:
    """Run the runner in this process over ``bars`` served by a fresh stub: (decisions, fills, runner stats)."""
    p = load_params(ROOT / "params.yaml")
    p = replace_section(p, "strategy", **strategy)
    p = replace_section(p, "live", buffer_hours=1.0, shadow=False)
    first, last = int(bars["ts_ms"].iloc[0]), int(bars["ts_ms"].iloc[-1])
    clock = {"now": first + 60 * MINUTE + MINUTE + now_lag_ms}

    def sleep(_: float) -> None:  # a simulated clock: waiting moves it to the next bar's close
        clock["now"] += MINUTE

    with StubExchange() as server:
        server.set_candles("BTCUSDT", bars)
        with StateStore(tmp_path / "state.sqlite") as store:
            client = make_exchange("binanceusdm", api_url=server.url, rate_limit_ms=1)  # no throttle on loopback
            runner = Runner(
                exchange=client, symbol=SYMBOL, store=store,
                models=ModelSource(models, shadow=False), strategy=p.strategy, broker_params=p.broker,
                live=p.live, clock_ms=lambda: clock["now"], sleep=sleep, start_ms=first + 60 * MINUTE,
                bar_feed=bar_feed,
            )  # fmt: skip
            stats = runner.run(until_ms=last)
            return store.decisions(), store.fills(), stats


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
    decisions, fills, _ = run_in_process(bars, always_long, tmp_path)
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
    decisions, fills, _ = run_in_process(bars, always_long, tmp_path, now_lag_ms=6 * 3_600_000)
    assert not fills
    assert "stale_data" in reasons(decisions)


def test_a_corrupt_model_is_refused_and_the_old_one_keeps_running(
    always_long: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    shutil.copytree(always_long, models)
    source = ModelSource(models, shadow=False)
    slots = source.poll({})
    old = slots[(PRICE_MODEL, CHAMPION)]
    onnx_path = models / "price_lgbm" / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    meta = models / "price_lgbm" / "model_meta.json"
    os.utime(meta, None)
    with caplog.at_level("ERROR"):
        after = source.poll(slots)
    assert after[(PRICE_MODEL, CHAMPION)] is old
    assert "refused the price_lgbm champion model" in caplog.text
    # a good bundle replaces it at the next poll
    shutil.rmtree(models / "price_lgbm")
    shutil.copytree(always_long / "price_lgbm", models / "price_lgbm")
    time.sleep(0.01)
    os.utime(models / "price_lgbm" / "model_meta.json", None)
    swapped = source.poll(after)
    assert swapped[(PRICE_MODEL, CHAMPION)] is not old and swapped[(PRICE_MODEL, CHAMPION)].version == old.version


def test_every_model_loads_and_a_mismatched_one_is_refused(
    models_dir: Path, always_long: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    slots = ModelSource(models, shadow=False).poll({})
    names = {"price_lgbm", "price_cnn_lstm", "opportunity_profit", "opportunity_success", "opportunity_hold"}
    assert set(slots) == {(n, CHAMPION) for n in names}
    assert slots[(KERAS_MODEL, CHAMPION)].horizon_minutes == 1 and slots[(KERAS_MODEL, CHAMPION)].sequence
    assert slots[(PRICE_MODEL, CHAMPION)].horizon_minutes == 10
    # A price bundle dropped where the profit model belongs is refused by name; the rest keep loading.
    shutil.rmtree(models / "opportunity_profit")
    shutil.copytree(always_long / "price_lgbm", models / "opportunity_profit")
    with caplog.at_level("ERROR"):
        fresh = ModelSource(models, shadow=False).poll({})
    assert ("opportunity_profit", CHAMPION) not in fresh and len(fresh) == 4
    assert "the bundle's meta names 'price_lgbm', expected 'opportunity_profit'" in caplog.text


class ListFeed:
    """A bar feed as :class:`cryptoml.edge.stream.KlineStream` answers: closed bars after since_ms, or None."""

    def __init__(self, bars: pd.DataFrame, connected_from_ms: int, gap_at_ms: int) -> None:
        self.rows = bars[["ts_ms", "open", "high", "low", "close", "volume"]].to_numpy().tolist()
        self.connected_from_ms = connected_from_ms
        self.gap_at_ms = gap_at_ms
        self.calls: list[int] = []

    def closed_bars(self, since_ms: int) -> list[list[float]] | None:
        self.calls.append(since_ms)
        if since_ms < self.connected_from_ms:
            return None  # not connected yet: REST
        if since_ms == self.gap_at_ms:  # the stream missed the next bar: its first one does not follow on
            return [r for r in self.rows if r[0] > since_ms + MINUTE][:3]
        return [r for r in self.rows if r[0] > since_ms][:5]


def test_the_bar_feed_answers_first_and_rest_fills_what_it_cannot(always_long: Path, tmp_path: Path) -> None:
    start = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000
    bars = flat_bars(start, 90)
    ref_decisions, _, ref_stats = run_in_process(bars, always_long, tmp_path / "rest")
    feed = ListFeed(bars, connected_from_ms=start + 65 * MINUTE, gap_at_ms=start + 75 * MINUTE)
    decisions, _, stats = run_in_process(bars, always_long, tmp_path / "feed", bar_feed=feed)
    assert decisions == ref_decisions  # the same bars whichever way they came
    assert feed.calls[0] < feed.connected_from_ms and feed.gap_at_ms in feed.calls
    assert ref_stats.stream_bars == 0 and 10 < stats.stream_bars < stats.bars


def test_bars_from_the_websocket_stream_give_the_decisions_of_rest_polling(
    month: pd.DataFrame, always_long: Path, tmp_path: Path
) -> None:
    """A real KlineStream (ccxt.pro against the Binance kline websocket stub) as the runner's bar feed: the
    stream answers once connected and linked up, REST before, and the decisions are those of REST alone."""
    from cryptoml.edge.stream import KlineStream
    from tests.support.stub_ws import StubKlineServer

    bars = month.iloc[:100].reset_index(drop=True)
    rows = bars[["ts_ms", "open", "high", "low", "close", "volume"]].to_numpy()
    first, last = int(rows[0][0]), int(rows[-1][0])
    ref, _, _ = run_in_process(bars, always_long, tmp_path / "rest")
    p = replace_section(load_params(ROOT / "params.yaml"), "live", buffer_hours=1.0, shadow=False)
    clock = {"now": first + 61 * MINUTE + 1000}
    with StubExchange() as rest, StubKlineServer(rows) as ws:
        rest.set_candles("BTCUSDT", bars)
        client = make_exchange("binanceusdm", api_url=rest.url, rate_limit_ms=1)
        ws.skip(61)  # the bars REST serves at the start: the stream begins with the next one
        with KlineStream("binanceusdm", SYMBOL, ws_url=ws.url, markets=client.load_markets(),
                         retry_base_s=0.05, retry_max_s=0.2) as stream:  # fmt: skip
            ws.wait_subscribers(1)

            def sleep(_: float) -> None:  # the next bar closes: on the websocket first, then the clock
                if ws.cursor < len(rows):
                    (bar,) = ws.emit(1)
                    deadline = time.monotonic() + 20
                    while not any(b[0] == bar[0] for b in stream.closed_bars(int(bar[0]) - MINUTE) or []):
                        assert time.monotonic() < deadline, "the stream never delivered the bar"
                        time.sleep(0.01)
                clock["now"] += MINUTE

            with StateStore(tmp_path / "ws.sqlite") as store:
                runner = Runner(
                    exchange=client, symbol=SYMBOL, store=store, models=ModelSource(always_long, shadow=False),
                    strategy=p.strategy, broker_params=p.broker, live=p.live, clock_ms=lambda: clock["now"],
                    sleep=sleep, start_ms=first + 60 * MINUTE, bar_feed=stream,
                )  # fmt: skip
                stats = runner.run(until_ms=last)
                decisions = store.decisions()
    assert decisions == ref
    assert stats.stream_bars >= 30 and stats.bars == len(decisions)


def test_live_imports_no_training_stack() -> None:
    code = (
        "import sys, flows.cli, cryptoml.edge.runner, cryptoml.edge.state, cryptoml.edge.scorer, "
        "cryptoml.edge.live_broker, cryptoml.market.exchange;"
        "bad=[m for m in ('pandas','tensorflow','mlflow','prefect','keras','lightgbm','xgboost') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
