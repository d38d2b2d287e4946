"""HTTP API benchmark: ``cryptoml serve`` POST /predict vs ``mlflow models serve`` on the same ONNX model.

Models: the bundles under ``models/`` when the three opportunity bundles load from there (what ``dvc
repro`` exports), else bundles trained here on generated rows (the test suite's builder, with the
default 9-hold grid and 200 trees of depth 6, near the pipeline's early-stopped sizes). The
``opportunity_profit`` ONNX graph is also logged with ``mlflow.onnx.log_model`` into a temporary sqlite
store and served with ``mlflow models serve --env-manager local`` (1 uvicorn worker, as ours).

Both servers run as separate processes on 127.0.0.1; the load comes from this process over keep-alive
HTTP/1.1 connections (``http.client``, one per client thread). Requests: ours is one opportunity's
entry-time fields, scored as the API does (features at each candidate hold, profit + success + hold
models, composite score, Kelly), once with ``hold_hours`` given (1 hold: the same single profit-model
row MLflow scores, plus the rest of the work) and once choosing among the 9 holds; MLflow's is the
same row's 34 features as ``{"inputs": [[...]]}``.

1. ``rates``: open loop at fixed request rates for ``RATE_SECONDS`` each: request ``i`` is due at
   ``i / rate``; latency is measured from the due time (so queueing when a server falls behind counts,
   no coordinated omission), ``p50_ms`` / ``p99_ms``; ``achieved_rps`` = answered / elapsed.
2. ``max_rps``: closed loop, ``CLIENTS`` connections sending back to back for ``MAX_SECONDS``.
3. ``ratio``: ours / MLflow of ``max_rps``, and MLflow / ours of p50 at each rate (target >= 3x).

On this 2-core machine the load generator shares the CPUs with the server under test, so absolute
figures are pessimistic; the ratio is the comparable number. No assertions (``python -m bench api``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RATES = (100, 250, 500)  # requests per second
SEQUENTIAL_REQUESTS = 2000
RATE_SECONDS = 5.0
MAX_SECONDS = 5.0
CLIENTS = 4
RATE_CLIENTS = 16  # connections of the open-loop generator (enough to keep up with slow answers)
WARMUP_REQUESTS = 200
BENCH_HOLDS = (1.0, 4.0, 8.0, 12.0, 24.0, 48.0, 72.0, 120.0, 168.0)  # params.yaml simulate.hold_hours


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], health_path: str, timeout_s: float, log: Path) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            client = _Client(url)
            status, _ = client.call(_request("GET", health_path))
            client.close()
            if status == 200:
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s} s")


class _Client:
    """A lean keep-alive HTTP/1.1 client: pre-encoded request, Content-Length framing, nothing else.

    ``http.client`` costs the load generator more CPU per request than some servers spend answering, on
    a machine where both share 2 cores; this keeps the generator's share small and equal for both servers.
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def call(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        self.buf = rest[length:]
        return int(head[9:12]), rest[:length]

    def close(self) -> None:
        self.sock.close()


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _ok(client: _Client, request: bytes) -> bytes:
    status, body = client.call(request)
    if status != 200:
        raise RuntimeError(f"{status} {body[:300]!r}")
    return body


def _percentiles(latencies_s: list[float]) -> dict[str, float]:
    lat = np.asarray(latencies_s) * 1e3
    if lat.size == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3)}


def sequential(url: str, request: bytes, n: int) -> dict[str, float]:
    """One connection, one request at a time: the latency of a request on an idle server."""
    client = _Client(url)
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        _ok(client, request)
        latencies.append(time.perf_counter() - t0)
    client.close()
    return _percentiles(latencies)


def fixed_rate(url: str, request: bytes, rate: float, seconds: float) -> dict[str, float]:
    """Open-loop load at ``rate`` requests/s; latency from each request's due time."""
    total = int(rate * seconds)
    next_index = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    start = time.perf_counter() + 0.05

    def worker() -> None:
        client = _Client(url)
        mine: list[float] = []
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                _ok(client, request)
                mine.append(time.perf_counter() - due)
            except (OSError, RuntimeError):
                errors[0] += 1
                client.close()
                client = _Client(url)
        client.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(RATE_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {
        "target_rps": float(rate),
        "achieved_rps": round(len(latencies) / elapsed, 1),
        **_percentiles(latencies),
        "errors": errors[0],
    }


def max_throughput(url: str, request: bytes, seconds: float) -> dict[str, float]:
    """Closed loop: CLIENTS connections back to back; requests/s and per-request latency."""
    stop = time.perf_counter() + seconds
    lock = threading.Lock()
    latencies: list[float] = []

    def worker() -> None:
        client = _Client(url)
        mine = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            _ok(client, request)
            mine.append(time.perf_counter() - t0)
        client.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rps": round(len(latencies) / (time.perf_counter() - started), 1), **_percentiles(latencies)}


def _measure(url: str, path: str, body: bytes) -> dict[str, Any]:
    request = _request("POST", path, body)
    sequential(url, request, WARMUP_REQUESTS)
    return {
        "sequential": sequential(url, request, SEQUENTIAL_REQUESTS),
        "rates": [fixed_rate(url, request, rate, RATE_SECONDS) for rate in RATES],
        "max": max_throughput(url, request, MAX_SECONDS),
    }


def _models_dir(tmp: Path) -> tuple[Path, str]:
    from cryptoml.edge.models import HOLD_MODEL, PROFIT_MODEL, SUCCESS_MODEL, ModelSet

    pipeline = ROOT / "models"
    if pipeline.is_dir():
        loaded = ModelSet.load(pipeline).bundles
        if all(n in loaded for n in (PROFIT_MODEL, SUCCESS_MODEL, HOLD_MODEL)):
            return pipeline, "models/ (pipeline bundles)"
    sys.path.insert(0, str(ROOT))
    from tests.edge.test_api import build_opportunity_bundles

    out = tmp / "models"
    out.mkdir()
    build_opportunity_bundles(out, rows=5000, holds=BENCH_HOLDS, n_estimators=200, max_depth=6)
    return out, "generated (5,000 rows, 200 trees of depth 6, 9 holds)"


def _payload(hold_hours: float | None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "ts_ms": 1_704_096_000_000,
        "strategy": "spot_perp",
        "regime": "Ranging",
        "fund_apr": 32.9,
        "fund_profit_8h": 0.03,
        "break_even_hours": 21.0,
        "funding_spread": 3e-4,
        "funding_spread_avg_24h": 2.5e-4,
        "funding_spread_avg_3d": 2.0e-4,
        "spread_volatility_cv": 0.6,
        "ret_vol_24h": 8e-4,
        "volume_24h": 2.5e8,
        "orderbook_depth_usd": 4e5,
        "bid_ask_spread_pct": 0.01,
        "depth_is_proxy": False,
        "next_funding_ts_ms": 1_704_096_000_000 + 3 * 3_600_000,
        "btc_ret_trailing": 0.004,
    }
    if hold_hours is not None:
        payload["hold_hours"] = hold_hours
    return payload


def _serve(
    cmd: list[str], env: dict[str, str], cwd: Path, url: str, health_path: str, timeout_s: float, log_dir: Path
) -> tuple[Any, float]:
    # output to a file, not a pipe: a server logging to a pipe nobody reads would block once it fills
    log = log_dir / f"server-{url.rsplit(':', 1)[1]}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        return proc, _wait_ready(url, proc, health_path, timeout_s, log)
    except Exception:
        proc.kill()
        raise


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _log_to_mlflow(onnx_path: Path, store: Path) -> str:
    """Log the ONNX graph with mlflow.onnx into a sqlite store under ``store``; returns the model URI."""
    code = f"""
import mlflow, mlflow.onnx, onnx
mlflow.set_tracking_uri("sqlite:///{store}/mlflow.db")
mlflow.set_experiment("bench_api")
with mlflow.start_run():
    info = mlflow.onnx.log_model(onnx.load({str(onnx_path)!r}), name="model",
                                 onnx_execution_providers=["CPUExecutionProvider"])
print(info.model_uri)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=store, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def run() -> dict[str, Any]:
    from cryptoml.edge.models import ModelSet
    from cryptoml.features.opportunity import INPUT_COLUMNS, feature_matrix

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models_dir, source = _models_dir(tmp)
        figures["models"] = source
        models = ModelSet.load(models_dir)
        one = _payload(8.0)
        grid = _payload(None)
        # in-process cost of the work behind one request, for reference
        one_row = {c: np.asarray([one[c]]) for c in INPUT_COLUMNS}
        calls: dict[str, Callable[[], Any]] = {
            "score_1_hold_us": lambda: models.score_opportunity(one),
            "score_grid_us": lambda: models.score_opportunity(grid),
            "feature_matrix_1_row_us": lambda: feature_matrix(one_row),
        }
        for key, call in calls.items():
            for _ in range(200):
                call()
            t0 = time.perf_counter()
            for _ in range(2000):
                call()
            figures[key] = round((time.perf_counter() - t0) / 2000 * 1e6, 1)

        env = {
            **os.environ,
            "OMP_WAIT_POLICY": "PASSIVE",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            # mlflow models serve runs `uvicorn` by name: the venv's bin must be on PATH
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # ... through uvicorn's CLI, which reads UVICORN_* variables: no access log, as ours
            "UVICORN_ACCESS_LOG": "false",
        }
        port = _free_port()
        ours_url = f"http://127.0.0.1:{port}"
        code = (
            "import logging, sys; from pathlib import Path; from cryptoml.edge.api import serve; "
            f"serve('127.0.0.1', {port}, Path({str(models_dir)!r}), log_level='warning')"
        )
        proc, figures["api_start_s"] = _serve([sys.executable, "-c", code], env, ROOT, ours_url, "/health", 60, tmp)
        try:
            figures["api_health_sequential"] = sequential(ours_url, _request("GET", "/health"), SEQUENTIAL_REQUESTS)
            figures["api_1_hold"] = _measure(ours_url, "/predict", json.dumps(one).encode())
            figures["api_grid"] = _measure(ours_url, "/predict", json.dumps(grid).encode())
        finally:
            _stop(proc)

        uri = _log_to_mlflow(models_dir / "opportunity_profit" / "model.onnx", tmp)
        port = _free_port()
        mlflow_url = f"http://127.0.0.1:{port}"
        mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
        cmd = [mlflow_bin, "models", "serve", "--env-manager", "local", "-m", uri, "-h", "127.0.0.1", "-p", str(port)]
        proc, figures["mlflow_start_s"] = _serve(cmd, env, tmp, mlflow_url, "/ping", 180, tmp)
        try:
            row = feature_matrix(one_row)[0].astype(np.float32).tolist()
            body = json.dumps({"inputs": [row]}).encode()
            probe = _Client(mlflow_url)
            answer = json.loads(_ok(probe, _request("POST", "/invocations", body)))["predictions"]
            probe.close()
            # the ONNX pyfunc answers {output name: values}; the regressor's output is "variable"
            served = float(np.ravel(answer["variable"] if isinstance(answer, dict) else answer)[0])
            ours = models.score_opportunity(one)["predicted_profit_pct"]
            figures["mlflow_answer_matches"] = abs(served - ours) < 1e-5
            figures["mlflow_ping_sequential"] = sequential(mlflow_url, _request("GET", "/ping"), SEQUENTIAL_REQUESTS)
            figures["mlflow"] = _measure(mlflow_url, "/invocations", body)
        finally:
            _stop(proc)

    ml = figures["mlflow"]
    for key in ("api_1_hold", "api_grid"):
        ours = figures[key]
        figures[f"ratio_{key}"] = {
            "sequential_p50": round(ml["sequential"]["p50_ms"] / ours["sequential"]["p50_ms"], 2),
            "max_rps": round(ours["max"]["rps"] / ml["max"]["rps"], 2),
            "p50_at_rate": {
                str(int(a["target_rps"])): round(b["p50_ms"] / a["p50_ms"], 2)
                for a, b in zip(ours["rates"], ml["rates"], strict=True)
            },
        }
    _print(figures)
    return figures


def _print(figures: dict[str, Any]) -> None:
    print(f"models: {figures['models']}")
    print(
        f"in-process: score 1 hold {figures['score_1_hold_us']} us, 9-hold grid {figures['score_grid_us']} us, "
        f"of which feature_matrix (1 row) {figures['feature_matrix_1_row_us']} us"
    )
    print(f"start: api {figures['api_start_s']:.1f} s, mlflow {figures['mlflow_start_s']:.1f} s")
    print(
        f"framework floor, sequential p50: GET /health {figures['api_health_sequential']['p50_ms']:.2f} ms, "
        f"mlflow GET /ping {figures['mlflow_ping_sequential']['p50_ms']:.2f} ms"
    )
    print(f"{'server':<22}{'rate':>6}{'achieved':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    servers = (("api_1_hold", "cryptoml 1 hold"), ("api_grid", "cryptoml 9 holds"), ("mlflow", "mlflow (profit)"))
    for key, label in servers:
        q = figures[key]["sequential"]
        print(f"{label:<22}{'seq':>6}{'':>10}{q['p50_ms']:>9.2f}{q['p99_ms']:>9.2f}")
        for r in figures[key]["rates"]:
            print(
                f"{label:<22}{r['target_rps']:>6.0f}{r['achieved_rps']:>10.1f}{r['p50_ms']:>9.2f}"
                f"{r['p99_ms']:>9.2f}{r['errors']:>8}"
            )
        m = figures[key]["max"]
        print(f"{label:<22}{'max':>6}{m['rps']:>10.1f}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}")
    for key in ("api_1_hold", "api_grid"):
        r = figures[f"ratio_{key}"]
        print(
            f"ratio {key} vs mlflow: sequential p50 x{r['sequential_p50']}, max rps x{r['max_rps']}, "
            f"p50 at each rate {r['p50_at_rate']} (> 1: ours is faster)"
        )
    print(f"mlflow answer equals ours: {figures['mlflow_answer_matches']}")


if __name__ == "__main__":
    run()
