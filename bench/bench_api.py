"""HTTP API benchmark: ``cryptoml serve`` POST /predict vs ``mlflow models serve`` on the same ONNX model.

Models: the bundles under ``models/`` when the three opportunity bundles load from there (what ``dvc
repro`` exports), else bundles trained here on generated rows (the test suite's builder, with the
default 9-hold grid and 200 trees of depth 6, near the pipeline's early-stopped sizes). The
``opportunity_profit`` ONNX graph is also logged with ``mlflow.onnx.log_model`` into a temporary sqlite
store and served with ``mlflow models serve --env-manager local``.

Servers: each a separate process on 127.0.0.1 with one uvicorn worker, uvloop + httptools (mlflow's
``uvicorn`` CLI picks the same pair when installed), no access log. Ours runs twice: with the fast path
(the default) and with ``fast_path=False`` (every request through FastAPI: the "before" figures).

Work per request: ours is one opportunity's entry-time fields, scored as the API does (features at each
candidate hold, profit + success + hold models, composite score, Kelly), once with ``hold_hours`` given
(1 hold: the same single profit-model row MLflow scores, plus the rest of the work) and once choosing
among the 9 holds; MLflow's is that row's 34 features as ``{"inputs": [[...]]}`` through the profit model
only. Ours does more work per request; the ratios below are end to end, as a client sees them.

Client: this process, one thread driving non-blocking keep-alive HTTP/1.1 connections with ``select``
(pre-encoded requests, Content-Length framing; no thread switches or GIL hand-offs, so its own cost per
request is small and the same for every server). The client and the server under test share the 2 cores.

1. ``sequential``: one connection, one request at a time (latency of an idle server).
2. ``rates``: open loop at fixed request rates for ``RATE_SECONDS`` each over ``RATE_CONNECTIONS``
   connections: request ``i`` is due at ``i / rate`` and is sent then on an idle connection (or as soon
   as one frees up); latency is measured from the due time, so queueing when a server falls behind
   counts (no coordinated omission). ``p50_ms`` / ``p99_ms``; ``achieved_rps`` = answered / elapsed.
3. ``max``: closed loop, ``CLIENTS`` connections each sending its next request as soon as the answer
   to the last one arrives, for ``MAX_SECONDS``: the maximum sustainable throughput (``rps``) at that
   concurrency, with its latencies.
4. ``ratio``: ours / MLflow of ``max`` rps; MLflow / ours of p50 and p99 at each rate and sequentially
   (> 1: ours is faster; target >= 3x).

All three servers run at once; each measurement is taken against every server back to back, and the whole
series twice (``REPEATS``; figures are medians), so that the drifting load of a shared machine hits all
servers alike. No assertions (``python -m bench api``).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RATES = (100, 300, 600, 1000)  # requests per second
SEQUENTIAL_REQUESTS = 2000
RATE_SECONDS = 4.0
MAX_SECONDS = 4.0
CLIENTS = 8  # closed-loop connections
RATE_CONNECTIONS = 32  # open-loop connections (enough to keep sending on time while a server lags)
WARMUP_REQUESTS = 200
REPEATS = 2  # whole series per server; figures are medians
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


class _Connection:
    """One non-blocking keep-alive connection of the load generator: at most one request in flight."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        self.due = 0.0  # when the request in flight was due (perf_counter seconds)

    def answer(self) -> tuple[int, bytes] | None:
        """The complete answer in the buffer, if any (status, body); raises when the server closed."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return None
        self.buf = rest[length:]
        return int(head[9:12]), rest[:length]


def _drive(
    url: str, request: bytes, n_connections: int, due_times: list[float] | None, seconds: float
) -> dict[str, Any]:
    """Send ``request`` over ``n_connections`` from one thread; latencies in seconds.

    ``due_times`` (open loop): request ``i`` goes out at ``due_times[i]`` on an idle connection, or when one
    frees up; its latency counts from the due time. None (closed loop): every connection sends again as
    soon as its answer arrives, until ``seconds`` have passed.
    """
    # select(), not epoll: its timeout has microsecond resolution (epoll rounds up to milliseconds)
    selector = selectors.SelectSelector()
    connections = [_Connection(url) for _ in range(n_connections)]
    idle = list(connections)
    for c in connections:
        selector.register(c.sock, selectors.EVENT_READ, c)
    latencies: list[float] = []
    errors = 0
    next_i = 0
    started = time.perf_counter()
    stop = started + seconds
    while True:
        now = time.perf_counter()
        if due_times is None:
            while idle and now < stop:
                c = idle.pop()
                c.due = now
                c.sock.sendall(request)
            if len(idle) == n_connections:
                break
            timeout = None
        else:
            while idle and next_i < len(due_times) and due_times[next_i] <= now:
                c = idle.pop()
                c.due = due_times[next_i]
                next_i += 1
                c.sock.sendall(request)
            if next_i == len(due_times) and len(idle) == n_connections:
                break
            timeout = max(due_times[next_i] - now, 0.0) if idle and next_i < len(due_times) else None
        for key, _ in selector.select(timeout):
            c = key.data
            answer = c.answer()
            if answer is None:
                continue
            latencies.append(time.perf_counter() - c.due)
            errors += answer[0] != 200
            idle.append(c)
    elapsed = time.perf_counter() - started
    for c in connections:
        selector.unregister(c.sock)
        c.sock.close()
    return {"latencies": latencies, "errors": errors, "elapsed_s": elapsed}


def fixed_rate(url: str, request: bytes, rate: float, seconds: float) -> dict[str, float]:
    """Open-loop load at ``rate`` requests/s; latency from each request's due time."""
    start = time.perf_counter() + 0.05
    due = [start + i / rate for i in range(int(rate * seconds))]
    run = _drive(url, request, RATE_CONNECTIONS, due, seconds)
    return {
        "target_rps": float(rate),
        "achieved_rps": round(len(run["latencies"]) / (run["elapsed_s"] - 0.05), 1),
        **_percentiles(run["latencies"]),
        "errors": run["errors"],
    }


def max_throughput(url: str, request: bytes, seconds: float) -> dict[str, float]:
    """Closed loop: CLIENTS connections back to back; requests/s and per-request latency."""
    run = _drive(url, request, CLIENTS, None, seconds)
    return {
        "rps": round(len(run["latencies"]) / run["elapsed_s"], 1),
        **_percentiles(run["latencies"]),
        "errors": run["errors"],
    }


def _measure_all(targets: dict[str, tuple[str, bytes]], repeats: int) -> dict[str, dict[str, Any]]:
    """Every measurement against every target back to back (a target: url, pre-encoded request), the whole
    series ``repeats`` times; each figure is the median over the repeats. On a shared machine the load of
    other processes drifts over minutes: interleaving gives every server the same conditions."""
    for url, request in targets.values():
        sequential(url, request, WARMUP_REQUESTS)
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in targets}
    for _ in range(repeats):
        one: dict[str, dict[str, Any]] = {key: {"rates": []} for key in targets}
        for key, (url, request) in targets.items():
            one[key]["sequential"] = sequential(url, request, SEQUENTIAL_REQUESTS)
        for rate in RATES:
            for key, (url, request) in targets.items():
                one[key]["rates"].append(fixed_rate(url, request, rate, RATE_SECONDS))
        for key, (url, request) in targets.items():
            one[key]["max"] = max_throughput(url, request, MAX_SECONDS)
        for key in targets:
            runs[key].append(one[key])
    return {key: _median_run(r) for key, r in runs.items()}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(items: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(float(np.median([i[k] for i in items])), 3) for k in items[0]}

    return {
        "sequential": med([r["sequential"] for r in runs]),
        "rates": [med([r["rates"][i] for r in runs]) for i in range(len(RATES))],
        "max": med([r["max"] for r in runs]),
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
        profit_row = feature_matrix(one_row).astype(np.float32)
        calls: dict[str, Callable[[], Any]] = {
            "score_1_hold_us": lambda: models.score_opportunity(one),
            "score_grid_us": lambda: models.score_opportunity(grid),
            "feature_matrix_1_row_us": lambda: feature_matrix(one_row),
            "profit_onnx_1_row_us": lambda: models.bundles["opportunity_profit"].predict(profit_row),
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
        uri = _log_to_mlflow(models_dir / "opportunity_profit" / "model.onnx", tmp)
        procs = []
        try:
            urls = {}
            for fast in (True, False):  # ours with the fast path, and FastAPI alone ("before")
                port = _free_port()
                urls[fast] = f"http://127.0.0.1:{port}"
                code = (
                    "from pathlib import Path; from cryptoml.edge.api import serve; "
                    f"serve('127.0.0.1', {port}, Path({str(models_dir)!r}), log_level='warning', fast_path={fast})"
                )
                proc, figures["api_start_s" if fast else "api_fastapi_start_s"] = _serve(
                    [sys.executable, "-c", code], env, ROOT, urls[fast], "/health", 60, tmp
                )
                procs.append(proc)
            port = _free_port()
            mlflow_url = f"http://127.0.0.1:{port}"
            mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
            cmd = [mlflow_bin, "models", "serve", "--env-manager", "local", "-m", uri, "-h", "127.0.0.1"]
            proc, figures["mlflow_start_s"] = _serve([*cmd, "-p", str(port)], env, tmp, mlflow_url, "/ping", 180, tmp)
            procs.append(proc)

            row = feature_matrix(one_row)[0].astype(np.float32).tolist()
            mlflow_body = json.dumps({"inputs": [row]}).encode()
            probe = _Client(mlflow_url)
            answer = json.loads(_ok(probe, _request("POST", "/invocations", mlflow_body)))["predictions"]
            probe.close()
            # the ONNX pyfunc answers {output name: values}; the regressor's output is "variable"
            served = float(np.ravel(answer["variable"] if isinstance(answer, dict) else answer)[0])
            figures["mlflow_answer_matches"] = (
                abs(served - models.score_opportunity(one)["predicted_profit_pct"]) < 1e-5
            )

            figures["api_health_sequential"] = sequential(urls[True], _request("GET", "/health"), SEQUENTIAL_REQUESTS)
            figures["mlflow_ping_sequential"] = sequential(mlflow_url, _request("GET", "/ping"), SEQUENTIAL_REQUESTS)
            one_body, grid_body = json.dumps(one).encode(), json.dumps(grid).encode()
            targets = {
                "api_1_hold": (urls[True], _request("POST", "/predict", one_body)),
                "api_grid": (urls[True], _request("POST", "/predict", grid_body)),
                "api_fastapi_1_hold": (urls[False], _request("POST", "/predict", one_body)),
                "api_fastapi_grid": (urls[False], _request("POST", "/predict", grid_body)),
                "mlflow": (mlflow_url, _request("POST", "/invocations", mlflow_body)),
            }
            figures.update(_measure_all(targets, REPEATS))
        finally:
            for proc in procs:
                _stop(proc)

    # per-request cost beyond the model work: sequential p50 minus the in-process work of that request
    work_us = {"api_1_hold": "score_1_hold_us", "api_grid": "score_grid_us", "mlflow": "profit_onnx_1_row_us"}
    work_us |= {"api_fastapi_1_hold": "score_1_hold_us", "api_fastapi_grid": "score_grid_us"}
    figures["overhead_ms"] = {
        key: round(figures[key]["sequential"]["p50_ms"] - figures[work_us[key]] / 1e3, 3) for key in (*OURS, "mlflow")
    }
    ml = figures["mlflow"]
    for key in OURS:
        ours = figures[key]
        figures[f"ratio_{key}"] = {
            "sequential_p50": round(ml["sequential"]["p50_ms"] / ours["sequential"]["p50_ms"], 2),
            "sequential_p99": round(ml["sequential"]["p99_ms"] / ours["sequential"]["p99_ms"], 2),
            "max_rps": round(ours["max"]["rps"] / ml["max"]["rps"], 2),
            "p50_at_rate": {
                str(int(a["target_rps"])): round(b["p50_ms"] / a["p50_ms"], 2)
                for a, b in zip(ours["rates"], ml["rates"], strict=True)
            },
            "p99_at_rate": {
                str(int(a["target_rps"])): round(b["p99_ms"] / a["p99_ms"], 2)
                for a, b in zip(ours["rates"], ml["rates"], strict=True)
            },
        }
    _print(figures)
    return figures


OURS = ("api_1_hold", "api_grid", "api_fastapi_1_hold", "api_fastapi_grid")
LABELS = {
    "api_1_hold": "fast path, 1 hold",
    "api_grid": "fast path, 9 holds",
    "api_fastapi_1_hold": "FastAPI, 1 hold",
    "api_fastapi_grid": "FastAPI, 9 holds",
    "mlflow": "mlflow (profit only)",
}


def _print(figures: dict[str, Any]) -> None:
    print(f"models: {figures['models']}")
    print(
        f"in-process: score 1 hold {figures['score_1_hold_us']} us, 9-hold grid {figures['score_grid_us']} us, "
        f"of which feature_matrix (1 row) {figures['feature_matrix_1_row_us']} us; mlflow's work: the profit "
        f"model on 1 row {figures['profit_onnx_1_row_us']} us"
    )
    print(
        f"start: api {figures['api_start_s']:.1f} s, mlflow {figures['mlflow_start_s']:.1f} s; framework floor, "
        f"sequential p50: GET /health {figures['api_health_sequential']['p50_ms']:.2f} ms, "
        f"mlflow GET /ping {figures['mlflow_ping_sequential']['p50_ms']:.2f} ms"
    )
    print(f"{'server':<24}{'rate':>6}{'achieved':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for key, label in LABELS.items():
        q = figures[key]["sequential"]
        print(f"{label:<24}{'seq':>6}{'':>10}{q['p50_ms']:>9.2f}{q['p99_ms']:>9.2f}")
        for r in figures[key]["rates"]:
            print(
                f"{label:<24}{r['target_rps']:>6.0f}{r['achieved_rps']:>10.1f}{r['p50_ms']:>9.2f}"
                f"{r['p99_ms']:>9.2f}{r['errors']:>8}"
            )
        m = figures[key]["max"]
        print(f"{label:<24}{'max':>6}{m['rps']:>10.1f}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}{m['errors']:>8}")
    for key in OURS:
        r = figures[f"ratio_{key}"]
        print(
            f"ratio {LABELS[key]} vs mlflow (> 1: ours is faster): max rps x{r['max_rps']}, sequential p50 "
            f"x{r['sequential_p50']} p99 x{r['sequential_p99']}, p50 by rate {r['p50_at_rate']}, "
            f"p99 by rate {r['p99_at_rate']}"
        )
    print(
        "per-request overhead beyond the model work (sequential p50 - in-process work), ms: "
        + ", ".join(f"{LABELS[k]} {v:.2f}" for k, v in figures["overhead_ms"].items())
    )
    print(f"mlflow answer equals ours: {figures['mlflow_answer_matches']}")


if __name__ == "__main__":
    run()
