"""Edge runner figures: one decision (streaming features + every model + the strategy), the per-bar commit,
and `cryptoml live` start time and peak RSS against the local stub exchange (target: <= 1 ms p99 decision,
<= 150 MiB RSS).

Models: the pipeline's bundles in ``models/`` (run ``make run`` first); the bars are the real BTC/USDT month
of ../shared/data when present, else a seeded random walk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MONTH = ROOT / ".." / "shared" / "data" / "binance_spot_btcusdt_1m_20230417-20230517.parquet"


def _bars(n: int) -> pd.DataFrame:
    if MONTH.is_file():
        from tests.support.stub_exchange import load_candles

        return load_candles(MONTH).iloc[:n].reset_index(drop=True)
    rng = np.random.default_rng(0)
    close = 30_000 * np.exp(np.cumsum(rng.normal(0, 5e-4, n)))
    ts = 1_681_689_600_000 + 60_000 * np.arange(n)
    return pd.DataFrame({"ts_ms": ts, "open": close, "high": close * 1.0005, "low": close * 0.9995,
                         "close": close, "volume": rng.uniform(1, 50, n)})  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def decision_latency(bars: pd.DataFrame) -> dict[str, float]:
    from cryptoml.config import StrategyParams
    from cryptoml.edge.models import ModelSet
    from cryptoml.edge.opportunities import LIVE_OPPORTUNITY_KEYS  # noqa: F401  (the runner's scorer inputs)
    from cryptoml.export.bundle import load_bundle
    from cryptoml.features.streaming import StreamingFeatures
    from cryptoml.trading.strategy import StrategyState, decide

    price = load_bundle(MODELS / "price_lgbm")
    keras = load_bundle(MODELS / "price_cnn_lstm")
    models = ModelSet.load(MODELS)
    opportunity = {
        "ts_ms": int(bars["ts_ms"].iloc[-1]), "strategy": "spot_perp", "regime": "Ranging", "fund_apr": 12.0,
        "fund_profit_8h": 0.011, "break_even_hours": 30.0, "funding_spread": 0.0001,
        "funding_spread_avg_24h": 0.00009, "funding_spread_avg_3d": 0.00008, "spread_volatility_cv": 0.5,
        "ret_vol_24h": 0.0008, "volume_24h": 5e8, "orderbook_depth_usd": 2e6, "bid_ask_spread_pct": 0.01,
        "depth_is_proxy": 0.0, "next_funding_ts_ms": int(bars["ts_ms"].iloc[-1]) + 3_600_000,
        "btc_ret_trailing": 0.01,
    }  # fmt: skip
    sf = StreamingFeatures()
    params, state = StrategyParams(), StrategyState()
    values = bars[["open", "high", "low", "close", "volume"]].to_numpy()
    window = values[-120:]
    times: list[float] = []
    for i, (ts, row) in enumerate(zip(bars["ts_ms"].to_numpy(), values, strict=True)):
        started = time.perf_counter()
        feats = sf.update(int(ts), *row)
        if feats is not None:
            pred = float(price.predict(feats)[0])
            keras.predict_raw(window[None, ...])
            models.score_opportunity(opportunity)
            _, state = decide(
                state, params, bar_ts_ms=int(ts), now_ms=int(ts) + 60_000, close=row[3], high=row[1], low=row[2],
                predicted_return_bps=pred * 1e4, position_qty=0.0, entry_price=0.0, equity=10_000.0,
            )  # fmt: skip
            if i > 200:
                times.append((time.perf_counter() - started) * 1e6)
    return {"bars": len(times), "p50_us": _pct(times, 50), "p99_us": _pct(times, 99), "mean_us": float(np.mean(times))}


def runner_start_and_rss(bars: pd.DataFrame) -> dict[str, float]:
    from tests.support.stub_exchange import StubExchange

    with StubExchange() as stub, tempfile.TemporaryDirectory() as tmp:
        stub.set_candles("BTCUSDT", bars)
        start = int(bars["ts_ms"].iloc[600])
        iso = pd.Timestamp(start, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M")
        until = pd.Timestamp(start + 300 * 60_000, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M")
        cmd = [sys.executable, "-m", "flows.cli", "live", "--paper", "--api-url", stub.url, "--exchange",
               "binanceusdm", "--symbol", "BTC/USDT:USDT", "--state", f"{tmp}/state.sqlite", "--models", str(MODELS),
               "--clock-start", iso, "--clock-speed", "1000000", "--until", until,
               "--log-level", "WARNING"]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        # VmHWM of the child's own address space (ru_maxrss would count the parent's pages before exec)
        peak = {"kib": 0}

        def watch() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while proc.poll() is None:
                try:
                    for line in status.read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak["kib"] = max(peak["kib"], int(line.split()[1]))
                except OSError:
                    break
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        stdout, _ = proc.communicate()
        watcher.join()
        status = proc.returncode
        elapsed = time.perf_counter() - started
        if status != 0:
            raise RuntimeError(f"cryptoml live failed with status {status}")
        peak_kib = peak["kib"]
        summary = json.loads(stdout.strip().splitlines()[-1])
        # start-up: the interpreter, imports and model loading (a run with --max-bars 0 would not start)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import flows.cli, cryptoml.edge.runner, cryptoml.edge.models, ccxt; "
                        "from cryptoml.export.bundle import load_bundle; "
                        f"[load_bundle(p) for p in __import__('pathlib').Path({str(MODELS)!r}).iterdir() "
                        "if (p / 'model.onnx').is_file()]"], cwd=ROOT, check=True)  # fmt: skip
        startup = time.perf_counter() - t0
    return {
        "bars_processed": summary["bars"],
        "run_seconds": elapsed,
        "per_bar_ms_including_commit": elapsed * 1000 / max(summary["bars"], 1),
        "startup_seconds": startup,
        "peak_rss_mib": peak_kib / 1024.0,
    }


def run() -> dict[str, object]:
    if not (MODELS / "price_lgbm" / "model.onnx").is_file():
        print("bench_edge: no models/price_lgbm bundle (run `make run` first); skipped")
        return {"skipped": "no models/ bundles"}
    bars = _bars(3000)
    decision = decision_latency(bars)
    print(f"one decision (features + price_lgbm + Keras + opportunity models + strategy): "
          f"p50 {decision['p50_us']:.0f} us, p99 {decision['p99_us']:.0f} us over {decision['bars']} bars")  # fmt: skip
    live = runner_start_and_rss(bars)
    print(f"cryptoml live: start-up (imports + all bundles) {live['startup_seconds']:.2f} s, "
          f"{live['bars_processed']} bars in {live['run_seconds']:.1f} s "
          f"({live['per_bar_ms_including_commit']:.1f} ms/bar with the SQLite commit), "
          f"peak RSS {live['peak_rss_mib']:.0f} MiB")  # fmt: skip
    return {"decision": decision, "live": live}
