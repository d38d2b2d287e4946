"""Edge runner figures: one decision (streaming features + every price model + the strategy and its orders),
one opportunity-grid decision (detection + the three opportunity models + the rule scorer + paper picks),
and `cryptoml live` with every model loaded: start time and peak RSS against the local stub exchange serving
the real recorded Binance USDⓈ-M exchangeInfo (122 symbols), REST polling alone and with the websocket bar
feed on (``--ws --ws-url`` against the kline websocket stub, ``tests/support/stub_ws.py``); targets: <= 1 ms
p99 per decision, <= 150 MiB RSS.

**What "one decision" is.** :meth:`cryptoml.edge.runner.Runner.decide_bar` on a bar already in memory:
the 19 streaming technical features, ``price_lgbm`` and ``price_cnn_lstm`` (the Keras CNN+LSTM on its
120-bar window), the strategy (:func:`~cryptoml.trading.strategy.decide`) and the paper broker's orders.
Not in it: the bar fetch (network) and the per-bar SQLite commit (an fsync; reported apart as ms/bar of
the whole run). The opportunity models run on the 5-minute snapshot grid only (one bar in five), which is
what the scorer needs (snapshots exist every 5 minutes); that grid decision is measured apart. Each
figure comes with its CPU-time twin (``time.thread_time``): on this shared 2-core machine wall-clock p99
is mostly other processes' scheduling, CPU time is what the code costs.

**The websocket run.** The runner's clock runs ``WS_CLOCK_SPEED`` times real time; after the 48 h REST
catch-up it follows ``WS_BARS`` bars that the websocket stub streams (Binance kline events, in-progress
updates then the closing one) a little ahead of the runner's clock, so that they come from the stream
(``stream_bars``), REST filling in only until the stream links up. Its peak RSS is the process's with ccxt.pro
connected, the async client's own markets loaded and the websocket's buffers live.

Models: the pipeline's bundles in ``models/`` (run ``make run`` first); the bars are the real BTC/USDT
month of ../shared/data when present, else a seeded random walk; the exchangeInfo bodies are the recorded
ones of ../shared/data when present, else the stub's generated entries.
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
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DATA = ROOT / ".." / "shared" / "data"
MONTH = DATA / "binance_spot_btcusdt_1m_20230417-20230517.parquet"
FUNDING = DATA / "funding_rates_binance_8h.csv"
FAPI_INFO = DATA / "binance_fapi_v1_exchangeInfo_20210722.json"  # real USDⓈ-M exchangeInfo, 122 symbols
RSS_LIMIT_MIB = 150.0
WS_BARS = 180  # bars the websocket run follows after its catch-up
WS_CLOCK_SPEED = 300.0  # simulated seconds per wall second there: a bar every 0.2 s
WS_LEAD_BARS = 2  # the stub streams a bar this many bars before the runner's clock closes it
N_DECISIONS = 12_000
WARMUP_BARS = 200  # features (60) and the Keras window (120) filled before timing starts
SYMBOL = "BTC/USDT:USDT"


def _bars(n: int) -> pd.DataFrame:
    if MONTH.is_file():
        from tests.support.stub_exchange import load_candles

        return load_candles(MONTH).iloc[:n].reset_index(drop=True)
    rng = np.random.default_rng(0)
    close = 30_000 * np.exp(np.cumsum(rng.normal(0, 5e-4, n)))
    ts = 1_681_689_600_000 + 60_000 * np.arange(n)
    return pd.DataFrame({"ts_ms": ts, "open": close, "high": close * 1.0005, "low": close * 0.9995,
                         "close": close, "volume": rng.uniform(1, 50, n)})  # fmt: skip


def _funding(bars: pd.DataFrame) -> pd.DataFrame:
    """Real XRPUSDT settlement rates (shared data) re-stamped on the bars' 8-hour schedule, else 1 bp."""
    rates = np.full(120, 1e-4)
    if FUNDING.is_file():
        raw = pd.read_csv(FUNDING)
        rates = raw.loc[raw["symbol"] == "XRPUSDT", "funding_rate"].to_numpy()
    first = int(bars["ts_ms"].iloc[0]) // 28_800_000 * 28_800_000 - 4 * 28_800_000
    return pd.DataFrame({"ts_ms": first + 28_800_000 * np.arange(len(rates)) + 5, "funding_rate": rates})


def _stats(wall_us: list[float], cpu_us: list[float]) -> dict[str, float]:
    w, c = np.asarray(wall_us), np.asarray(cpu_us)
    return {
        "n": len(w), "p50_us": float(np.percentile(w, 50)), "p99_us": float(np.percentile(w, 99)),
        "mean_us": float(w.mean()), "cpu_p50_us": float(np.percentile(c, 50)),
        "cpu_p99_us": float(np.percentile(c, 99)),
    }  # fmt: skip


def _runner(tmp: Path, scorer: Any = None) -> Any:
    from cryptoml.config import load_params
    from cryptoml.edge.runner import ModelSource, Runner
    from cryptoml.edge.state import StateStore

    p = load_params(ROOT / "params.yaml")
    store = StateStore(tmp / "bench.sqlite")
    runner = Runner(
        exchange=None, symbol=SYMBOL, store=store, models=ModelSource(MODELS, shadow=False), strategy=p.strategy,
        broker_params=p.broker, live=p.live, clock_ms=lambda: 0, scorer=scorer,
    )  # fmt: skip
    runner.poll_models(force=True)
    return runner, p


def decision_latency(bars: pd.DataFrame) -> dict[str, Any]:
    """Runner.decide_bar over N_DECISIONS bars, plus a per-step breakdown over the same bars."""
    from cryptoml.edge.runner import CHAMPION, KERAS_MODEL, PRICE_MODEL
    from cryptoml.features.streaming import StreamingFeatures
    from cryptoml.trading.strategy import StrategyState, decide

    rows = bars[["ts_ms", "open", "high", "low", "close", "volume"]].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        runner, p = _runner(Path(tmp))
        loaded = sorted(f"{n}/{s}" for n, s in runner.slots)
        wall, cpu = [], []
        for i, (ts, o, h, lo, c, v) in enumerate(rows[: N_DECISIONS + WARMUP_BARS]):
            runner.clock_ms = lambda ts=ts: int(ts) + 60_000  # a fresh bar: the strategy may trade
            w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            runner.decide_bar(int(ts), o, h, lo, c, v)
            w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            if i >= WARMUP_BARS:
                wall.append((w1 - w0) / 1e3)
                cpu.append((c1 - c0) / 1e3)
        fills = len(runner.broker.fills())
        runner.store.close()
        # Breakdown: the same steps one at a time (wall time, p50 / p99 in us).
        lgbm = runner.slots[(PRICE_MODEL, CHAMPION)]
        keras = runner.slots[(KERAS_MODEL, CHAMPION)].sequence
        stream, state = StreamingFeatures(), StrategyState()
        parts: dict[str, list[float]] = {"features": [], "price_lgbm": [], "price_cnn_lstm": [], "strategy": []}
        window = np.ascontiguousarray(rows[:120, 1:6], dtype=np.float64)
        for i, (ts, o, h, lo, c, v) in enumerate(rows[: N_DECISIONS + WARMUP_BARS]):
            t0 = time.perf_counter_ns()
            feats = stream.update(int(ts), o, h, lo, c, v)
            t1 = time.perf_counter_ns()
            pred = lgbm.predict(feats) if feats is not None else 0.0
            t2 = time.perf_counter_ns()
            keras(window)
            t3 = time.perf_counter_ns()
            _, state = decide(
                state, p.strategy, bar_ts_ms=int(ts), now_ms=int(ts) + 60_000, close=c, high=h, low=lo,
                predicted_return_bps=pred * 1e4, position_qty=0.0, entry_price=0.0, equity=10_000.0,
            )  # fmt: skip
            t4 = time.perf_counter_ns()
            if i >= WARMUP_BARS:
                for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    parts[k].append(dt / 1e3)
    return {
        **_stats(wall, cpu), "models": loaded, "fills": fills,
        "breakdown_p50_us": {k: float(np.percentile(v, 50)) for k, v in parts.items()},
        "breakdown_p99_us": {k: float(np.percentile(v, 99)) for k, v in parts.items()},
    }  # fmt: skip


def grid_latency(bars: pd.DataFrame) -> dict[str, Any]:
    """OpportunityScorer.on_grid at each 5-minute grid time, the market fed in memory (no network)."""
    from cryptoml.config import load_params
    from cryptoml.edge.scorer import OpportunityScorer

    p = load_params(ROOT / "params.yaml")
    scorer = OpportunityScorer(
        exchange="binanceusdm", perp_client=None, spot_client=None, bases=["BTC"], quote="USDT",
        snapshot_params=p.snapshots, opportunity_params=p.opportunities, simulate_params=p.simulate,
    )  # fmt: skip
    market = scorer.market
    rows = bars[["ts_ms", "open", "high", "low", "close", "volume"]].to_numpy()
    settlements = [(int(t), float(r)) for t, r in _funding(bars).to_numpy()]
    with tempfile.TemporaryDirectory() as tmp:
        runner, _ = _runner(Path(tmp), scorer)
        models = runner.opportunity_models()
        runner.store.close()
    wall, cpu, detected, opened = [], [], 0, 0
    start = 3 * 1440  # three days of history first: the 3-day funding averages and the CV window
    for i, (ts, o, h, lo, c, v) in enumerate(rows):
        while settlements and settlements[0][0] <= int(ts) + 60_000:  # in time order, as the exchange publishes
            market.add_funding(SYMBOL, *settlements.pop(0))
        market.add_bar(SYMBOL, int(ts), o, h, lo, c, v)
        market.add_bar("BTC/USDT", int(ts), o * 0.9998, h * 0.9998, lo * 0.9998, c * 0.9998, v,
                       exchange=scorer.spot_exchange)  # fmt: skip
        close_ms = int(ts) + 60_000
        if i < start or not scorer.on_grid_time(close_ms):
            continue
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        result = scorer.on_grid(close_ms, models, stale=False)
        w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        wall.append((w1 - w0) / 1e3)
        cpu.append((c1 - c0) / 1e3)
        detected += int(result.metrics["opportunities_detected"])
        opened += len(result.opened)
    return {**_stats(wall, cpu), "opportunities": detected, "picks_opened": opened}


def _serve(stub: Any, bars: pd.DataFrame) -> None:
    from tests.support.stub_exchange import Book

    stub.set_candles("BTCUSDT", bars)
    spot = bars.copy()
    spot[["open", "high", "low", "close"]] *= 0.9998
    stub.set_spot_candles("BTCUSDT", spot)
    stub.set_funding("BTCUSDT", _funding(bars))
    stub.set_book("BTCUSDT", Book([(29_000.0, 50.0)], [(29_000.5, 50.0)], ts_ms=2**52))
    stub.set_spot_book("BTCUSDT", Book([(29_000.0, 50.0)], [(29_000.5, 50.0)], ts_ms=0))


def _peak_rss_kib(proc: subprocess.Popen[str]) -> dict[str, int]:
    """VmHWM of the child's own address space, polled until it exits (ru_maxrss would count the parent's
    pages before exec)."""
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
    proc.wait()
    watcher.join()
    return peak


def _exchange_infos() -> dict[str, Any]:
    """The stub's recorded exchangeInfo bodies (USDⓈ-M: 122 symbols; spot, trimmed) where ../shared/data has them."""
    from tests.support.stub_exchange import SPOT_EXCHANGE_INFO

    return {
        "exchange_info": json.loads(FAPI_INFO.read_text()) if FAPI_INFO.is_file() else None,
        "spot_exchange_info": json.loads(SPOT_EXCHANGE_INFO.read_text()) if SPOT_EXCHANGE_INFO.is_file() else None,
    }


def _live_params(tmp: str) -> list[str]:
    """``--params`` of a params.yaml as the default but ``market.symbols``: the stub serves BTC only, so the
    scorer scans BTC (ETH and SOL would be empty series here)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["market"]["symbols"] = [SYMBOL]
    (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
    return ["--params", f"{tmp}/params.yaml"]


def runner_start_and_rss(bars: pd.DataFrame) -> dict[str, float]:
    """`cryptoml live` (default params but ``market.symbols``: every model, the opportunity scorer on) against
    the stub, replaying 48 h of catch-up (``live.buffer_hours``) and 5 h more on an accelerated clock."""
    from tests.support.stub_exchange import StubExchange

    infos = _exchange_infos()
    with StubExchange(**infos) as stub, tempfile.TemporaryDirectory() as tmp:
        _serve(stub, bars)
        start = int(bars["ts_ms"].iloc[4 * 1440])
        iso = pd.Timestamp(start, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M")
        until = pd.Timestamp(start + 300 * 60_000, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M")
        base = [sys.executable, "-m", "flows.cli", "live", "--paper", "--api-url", stub.url, "--exchange",
                "binanceusdm", "--symbol", SYMBOL, "--models", str(MODELS), "--clock-start", iso,
                "--clock-speed", "1000000", "--log-level", "WARNING"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        base += _live_params(tmp)
        # Start-up: process start to the first committed bar (imports, five models, markets, 74 h of history).
        t0 = time.perf_counter()
        subprocess.run([*base, "--state", f"{tmp}/first.sqlite", "--max-bars", "1"], cwd=ROOT, env=env,
                       check=True, capture_output=True)  # fmt: skip
        first_bar = time.perf_counter() - t0
        started = time.perf_counter()
        proc = subprocess.Popen([*base, "--state", f"{tmp}/state.sqlite", "--until", until], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        peak = _peak_rss_kib(proc)
        elapsed = time.perf_counter() - started
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"cryptoml live failed with status {proc.returncode}: {stderr[-2000:]}")
        summary = json.loads(stdout.strip().splitlines()[-1])
        # Imports and model loading alone, as the runner loads them.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import flows.cli, ccxt; from pathlib import Path; "
                        "from cryptoml.edge.runner import ModelSource; "
                        f"ModelSource(Path({str(MODELS)!r}), shadow=False).poll({{}})"],
                       cwd=ROOT, env=env, check=True)  # fmt: skip
        imports_and_models = time.perf_counter() - t0
    return {
        "bars_processed": summary["bars"],
        "run_seconds": elapsed,
        "per_bar_ms_including_commit": elapsed * 1000 / max(summary["bars"], 1),
        "startup_seconds": imports_and_models,
        "first_bar_seconds": first_bar,
        "peak_rss_mib": peak["kib"] / 1024.0,
        "exchange_info_symbols": len(infos["exchange_info"]["symbols"]) if infos["exchange_info"] else 0,
    }


def _stream_ahead_of(
    proc: subprocess.Popen[str], ws: Any, origin_ms: int, launched_s: float
) -> tuple[threading.Thread, dict[str, int]]:
    """Stream the stub's bars as the runner's clock reaches them, in a thread that ends with ``proc``.

    The runner's clock started a little after ``launched_s`` (its imports), so ``origin_ms`` + the wall time
    since ``launched_s`` x WS_CLOCK_SPEED is at or ahead of it: bars closing up to there, plus
    WS_LEAD_BARS, are streamed (the bars before the first connection are skipped: nobody is told)."""
    counts = {"streamed": 0, "skipped": 0}
    close_ms = ws.bars[:, 0].astype(np.int64) + 60_000

    def ahead() -> int:  # bars the stream should have closed by now
        upper_ms = origin_ms + (time.monotonic() - launched_s) * WS_CLOCK_SPEED * 1000 + WS_LEAD_BARS * 60_000
        return int(np.searchsorted(close_ms, upper_ms, side="right"))

    def play() -> None:
        try:
            ws.wait_subscribers(1, timeout=300)
        except TimeoutError:
            return
        counts["skipped"] = len(ws.skip(max(ahead() - 1, 0)))
        while proc.poll() is None and ws.cursor < len(ws.bars):
            n = min(ahead(), len(ws.bars)) - ws.cursor
            if n > 0:
                counts["streamed"] += len(ws.emit(n))
            time.sleep(0.02)

    thread = threading.Thread(target=play, name="bench-ws-clock", daemon=True)
    thread.start()
    return thread, counts


def runner_ws_rss(bars: pd.DataFrame) -> dict[str, float]:
    """`cryptoml live --ws --ws-url` (default params but ``market.symbols``): the REST catch-up, then
    WS_BARS bars taken from the websocket stub; peak RSS against RSS_LIMIT_MIB."""
    from tests.support.stub_exchange import StubExchange
    from tests.support.stub_ws import StubKlineServer

    infos = _exchange_infos()
    rows = bars[["ts_ms", "open", "high", "low", "close", "volume"]].to_numpy(dtype=np.float64)
    start = int(bars["ts_ms"].iloc[4 * 1440])
    until = start + WS_BARS * 60_000

    def iso(ts_ms: int) -> str:
        return pd.Timestamp(ts_ms, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M")

    with (
        StubExchange(**infos) as stub,
        StubKlineServer(rows) as ws,
        tempfile.TemporaryDirectory() as tmp,
    ):
        _serve(stub, bars)
        cmd = [sys.executable, "-m", "flows.cli", "live", "--paper", "--api-url", stub.url, "--ws", "--ws-url",
               ws.url, "--exchange", "binanceusdm", "--symbol", SYMBOL, "--models", str(MODELS), "--clock-start",
               iso(start), "--clock-speed", str(WS_CLOCK_SPEED), "--until", iso(until), "--state",
               f"{tmp}/ws.sqlite", "--log-level", "WARNING", *_live_params(tmp)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        launched = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        player, counts = _stream_ahead_of(proc, ws, start, launched)
        peak = _peak_rss_kib(proc)
        elapsed = time.monotonic() - launched
        player.join(timeout=10)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"cryptoml live --ws failed with status {proc.returncode}: {stderr[-2000:]}")
        summary = json.loads(stdout.strip().splitlines()[-1])
    return {
        "bars_processed": summary["bars"],
        "stream_bars": summary["stream_bars"],
        "ws_bars_streamed": counts["streamed"],
        "run_seconds": elapsed,
        "peak_rss_mib": peak["kib"] / 1024.0,
        "exchange_info_symbols": len(infos["exchange_info"]["symbols"]) if infos["exchange_info"] else 0,
    }


def run() -> dict[str, object]:
    if not all((MODELS / n / "model.onnx").is_file() for n in ("price_lgbm", "price_cnn_lstm", "opportunity_hold")):
        print("bench_edge: the models/ bundles are missing (run `make run` first); skipped")
        return {"skipped": "no models/ bundles"}
    bars = _bars(N_DECISIONS + WARMUP_BARS + 1)
    decision = decision_latency(bars)
    print(f"one decision ({', '.join(decision['models'])} + strategy + orders), {decision['n']} bars: "
          f"p50 {decision['p50_us']:.0f} us, p99 {decision['p99_us']:.0f} us wall; "
          f"CPU p50 {decision['cpu_p50_us']:.0f} us, p99 {decision['cpu_p99_us']:.0f} us")  # fmt: skip
    print("  breakdown p50/p99 us: " + ", ".join(
        f"{k} {decision['breakdown_p50_us'][k]:.0f}/{decision['breakdown_p99_us'][k]:.0f}"
        for k in decision["breakdown_p50_us"]))  # fmt: skip
    grid = grid_latency(bars)
    print(f"one grid decision (detection + 3 opportunity models + rule + picks), {grid['n']} grid times: "
          f"p50 {grid['p50_us']:.0f} us, p99 {grid['p99_us']:.0f} us wall; "
          f"CPU p50 {grid['cpu_p50_us']:.0f} us, p99 {grid['cpu_p99_us']:.0f} us "
          f"({grid['opportunities']} opportunities, {grid['picks_opened']} picks)")  # fmt: skip
    live = runner_start_and_rss(bars)
    print(f"cryptoml live (all models, scorer on): imports + models {live['startup_seconds']:.2f} s, "
          f"first committed bar after {live['first_bar_seconds']:.1f} s, "
          f"{live['bars_processed']} bars in {live['run_seconds']:.1f} s "
          f"({live['per_bar_ms_including_commit']:.1f} ms/bar with fetches, scorer and the SQLite commit), "
          f"peak RSS {live['peak_rss_mib']:.0f} MiB (limit {RSS_LIMIT_MIB:.0f}; "
          f"exchangeInfo of {live['exchange_info_symbols']} symbols)")  # fmt: skip
    ws = runner_ws_rss(bars)
    print(f"cryptoml live --ws (websocket bar feed on): {ws['bars_processed']} bars, {ws['stream_bars']} of them "
          f"from the stream, in {ws['run_seconds']:.1f} s; peak RSS {ws['peak_rss_mib']:.0f} MiB "
          f"(limit {RSS_LIMIT_MIB:.0f}; exchangeInfo of {ws['exchange_info_symbols']} symbols)")  # fmt: skip
    return {"decision": decision, "grid": grid, "live": live, "live_ws": ws}
