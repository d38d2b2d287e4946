"""The HTTP prediction API against real bundles and a real uvicorn server on 127.0.0.1.

The module fixture trains tiny models with the project's wrappers on generated rows (XGBoost profit /
success / hold, LightGBM forward return) plus two untrained Keras CNN+LSTM networks (built, not fitted:
the API only needs a valid bundle, and a fit costs seconds), exports each with the parity gate, and
serves them with uvicorn in a thread. Schemathesis then fuzzes the OpenAPI schema (positive and negative
cases, > 1,000 in all) checking that nothing answers 5xx, that every response matches the schema, and that
the fast path (the default) answers every case exactly as FastAPI alone does (a second server, built with
``fast_path=False``, gets each case too).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryptoml.edge.models import ModelSet
from cryptoml.export.bundle import load_bundle
from cryptoml.features.opportunity import (
    ENTRY_FEATURE_NAMES,
    FEATURE_NAMES,
    INPUT_COLUMNS,
    REGIMES,
    STRATEGIES,
    feature_matrix,
)
from cryptoml.features.streaming import StreamingFeatures
from cryptoml.features.technical import TECHNICAL_FEATURES
from cryptoml.models.sentiment import PRICE_FEATURES, SENTIMENT_COLUMNS, SENTIMENT_PRICE_FEATURES

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
T0_MS = 1_704_067_200_000  # 2024-01-01T00:00Z
MINUTE_MS = 60_000
HOLD_GRID = (1.0, 4.0, 8.0, 24.0)
WINDOW = 120
SIZING = {"mean_win_pct": 0.4, "mean_loss_pct": 0.3}


# --- building real bundles ---------------------------------------------------------------------------


def synthetic_opportunities(n: int, seed: int, holds: tuple[float, ...] = HOLD_GRID) -> dict[str, np.ndarray]:
    """``n`` plausible opportunity rows (the feature code's INPUT_COLUMNS), with a hold from ``holds``."""
    rng = np.random.default_rng(seed)
    ts = T0_MS + rng.integers(0, 30 * 1440, n) * MINUTE_MS
    spread = rng.normal(3e-4, 2e-4, n)
    return {
        "ts_ms": ts,
        "hold_hours": rng.choice(holds, n),
        "strategy": rng.choice(STRATEGIES, n),
        "regime": rng.choice(REGIMES, n),
        "fund_apr": spread * 3 * 365 * 100,
        "fund_profit_8h": spread * 100,
        "break_even_hours": rng.uniform(1.0, 100.0, n),
        "funding_spread": spread,
        "funding_spread_avg_24h": spread + rng.normal(0, 5e-5, n),
        "funding_spread_avg_3d": spread + rng.normal(0, 1e-4, n),
        "spread_volatility_cv": rng.uniform(0.0, 2.0, n),
        "ret_vol_24h": rng.uniform(2e-4, 2e-3, n),
        "volume_24h": 10 ** rng.uniform(6, 10, n),
        "orderbook_depth_usd": 10 ** rng.uniform(4, 7, n),
        "bid_ask_spread_pct": rng.uniform(0.001, 0.1, n),
        "depth_is_proxy": (rng.random(n) < 0.3).astype(float),
        "next_funding_ts_ms": ts + rng.integers(1, 8 * 60, n) * MINUTE_MS,
        "btc_ret_trailing": rng.normal(0, 0.02, n),
    }


def _meta_extra(**extra: Any) -> dict[str, Any]:
    return {
        "label": {"label": "synthetic test label"},
        "training_window": {"start_ms": T0_MS, "end_ms": T0_MS + 30 * 86_400_000},
        "data_hash": {"path": "generated", "md5": "0" * 32, "origin": "tests/edge"},
        "git_commit": "test",
        "metrics": {},
        **extra,
    }


def build_opportunity_bundles(
    out_dir: Path,
    rows: int = 600,
    seed: int = 1,
    holds: tuple[float, ...] = HOLD_GRID,
    n_estimators: int = 25,
    max_depth: int = 3,
) -> None:
    """Train the three opportunity models (tiny by default) on generated rows and export their bundles."""
    import pandas as pd

    from cryptoml.export.convert import export_model
    from cryptoml.models.opportunity import HoldDurationModel, ProfitRegressor, SuccessClassifier

    cols = synthetic_opportunities(rows, seed, holds)
    X = pd.DataFrame(feature_matrix(cols), columns=list(FEATURE_NAMES))
    rng = np.random.default_rng(seed)
    profit = cols["fund_profit_8h"] * cols["hold_hours"] / 8 - 0.05 + rng.normal(0, 0.02, rows)
    small = {"n_estimators": n_estimators, "max_depth": max_depth, "n_jobs": 1, "random_state": 0}
    profit_model = ProfitRegressor(**small).fit(X, profit)
    success_model = SuccessClassifier(**small).fit(X, (profit > 0).astype(float))
    cuts = np.quantile(cols["funding_spread"], np.linspace(0, 1, len(holds) + 1)[1:-1])
    best = np.asarray(holds)[np.digitize(cols["funding_spread"], cuts)]  # one best hold per spread quantile
    X_entry = X[list(ENTRY_FEATURE_NAMES)]
    hold_model = HoldDurationModel(**small, holds=holds).fit(X_entry, best)
    export_model(
        "xgboost_regressor", profit_model, X, out_dir / "opportunity_profit", "opportunity_profit",
        _meta_extra(sizing=SIZING),
    )  # fmt: skip
    export_model(
        "xgboost_classifier", success_model, X, out_dir / "opportunity_success", "opportunity_success", _meta_extra()
    )
    export_model(
        "xgboost_multiclass", hold_model, X_entry, out_dir / "opportunity_hold", "opportunity_hold",
        _meta_extra(classes=list(holds)),
    )  # fmt: skip


def build_price_bundles(out_dir: Path, seed: int = 2, keras: bool = True) -> None:
    """A tiny LightGBM forward-return bundle and (``keras``) both untrained CNN+LSTM bundles."""
    import pandas as pd

    from cryptoml.export.convert import export_model
    from cryptoml.models.price_lgbm import ForwardReturnModel

    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(0, 1e-3, (400, len(TECHNICAL_FEATURES))), columns=list(TECHNICAL_FEATURES))
    y = X["ret_5"].to_numpy() * 0.5 + rng.normal(0, 1e-4, len(X))
    lgbm = ForwardReturnModel(n_estimators=20, num_leaves=8, max_depth=4, n_jobs=1).fit(X, y)
    export_model("lightgbm_regressor", lgbm, X, out_dir / "price_lgbm", "price_lgbm", _meta_extra(horizon_minutes=10))
    if not keras:
        return
    from cryptoml.models.price_keras import MinMaxScaling, build_price_model

    for name, channels in (("price_cnn_lstm", PRICE_FEATURES), ("price_cnn_lstm_sentiment", SENTIMENT_PRICE_FEATURES)):
        import keras as keras_lib

        keras_lib.utils.set_random_seed(seed)
        model = build_price_model(len(channels), WINDOW)
        scaling = MinMaxScaling(
            feature_names=tuple(channels),
            feature_min=tuple([90.0] * 4 + [0.0] + [-1.0] * (len(channels) - 5)),
            feature_max=tuple([110.0] * 4 + [50.0] + [1.0] * (len(channels) - 5)),
            target_mean=1e-5,
            target_std=1e-3,
            fit_first_ts_ms=T0_MS,
            fit_last_ts_ms=T0_MS + 86_400_000,
        )
        windows = rng.uniform(0, 1, (8, WINDOW, len(channels))).astype(np.float32)
        export_model(
            "keras_sequence", model, windows, out_dir / name, name,
            _meta_extra(feature_names=list(channels), scaler=scaling.to_dict(), horizon_minutes=1, window_bars=WINDOW),
        )  # fmt: skip


def random_bars(n: int, seed: int, start_ms: int = T0_MS) -> dict[str, list[Any]]:
    """``n`` consecutive 1-minute bars of a random walk around 100, as columns."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 5e-4, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 5e-4, n))
    return {
        "ts_ms": [start_ms + i * MINUTE_MS for i in range(n)],
        "open": open_.tolist(),
        "high": high.tolist(),
        "low": low.tolist(),
        "close": close.tolist(),
        "volume": rng.uniform(1, 40, n).tolist(),
    }


def bars_payload(cols: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def opportunity_payload(cols: dict[str, np.ndarray], i: int, hold: bool = False) -> dict[str, Any]:
    """Row ``i`` as a /predict body (JSON types; ``hold_hours`` only when ``hold``)."""
    out: dict[str, Any] = {}
    for c in INPUT_COLUMNS:
        if c == "hold_hours" and not hold:
            continue
        v = cols[c][i]
        if c in ("ts_ms", "next_funding_ts_ms"):
            out[c] = int(v)
        elif c == "depth_is_proxy":
            out[c] = bool(v)
        elif c in ("strategy", "regime"):
            out[c] = str(v)
        else:
            out[c] = float(v)
    return out


# --- a real server -----------------------------------------------------------------------------------


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class Client:
    """A keep-alive HTTP/1.1 client on one connection (http.client: no extra dependency)."""

    def __init__(self, base_url: str) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"content-type": "application/json", **(headers or {})}
        self.conn.request(method, path, body=data, headers=hdrs)
        response = self.conn.getresponse()
        payload = response.read()
        if response.getheader("connection") == "close":
            self.conn.close()
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, payload

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    build_opportunity_bundles(out)
    build_price_bundles(out)
    return out


@pytest.fixture(scope="module")
def model_set(models_dir: Path) -> ModelSet:
    return ModelSet.load(models_dir)


@pytest.fixture(scope="module")
def base_url(models_dir: Path) -> Iterator[str]:
    from cryptoml.edge.api import create_app

    with running(create_app(models_dir, max_batch=16)) as url:
        yield url


@pytest.fixture(scope="module")
def fastapi_url(models_dir: Path) -> Iterator[str]:
    """The same app with every request answered by FastAPI (no fast path): the reference for the fast one."""
    from cryptoml.edge.api import create_app

    with running(create_app(models_dir, max_batch=16, fast_path=False)) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[Client]:
    c = Client(base_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def opportunities() -> dict[str, np.ndarray]:
    return synthetic_opportunities(40, seed=11)


# --- schema, health ----------------------------------------------------------------------------------


def test_openapi_schema_describes_every_endpoint_and_constraint(client: Client) -> None:
    status, schema = client.request("GET", "/openapi.json")
    assert status == 200
    assert {"/health", "/predict", "/predict/batch", "/predict/price"} <= set(schema["paths"])
    parts = schema["components"]["schemas"]
    opportunity = parts["OpportunityIn"]
    assert opportunity["additionalProperties"] is False
    assert set(opportunity["required"]) == set(INPUT_COLUMNS) - {"hold_hours"}
    assert parts["Strategy"]["enum"] == list(STRATEGIES) and parts["Regime"]["enum"] == list(REGIMES)
    assert opportunity["properties"]["funding_spread"]["maximum"] == 10.0
    assert parts["BatchIn"]["properties"]["opportunities"]["maxItems"] == 16
    responses = schema["paths"]["/predict"]["post"]["responses"]
    assert {"200", "400", "413", "422", "503"} <= set(responses)


def test_health_lists_models_versions_and_uptime(client: Client, model_set: ModelSet) -> None:
    status, health = client.request("GET", "/health")
    assert status == 200
    assert health["status"] == "ok" and health["skipped"] == []
    names = {m["name"]: m for m in health["models"]}
    assert (
        set(names)
        == set(model_set.bundles)
        == {
            "opportunity_profit",
            "opportunity_success",
            "opportunity_hold",
            "price_lgbm",
            "price_cnn_lstm",
            "price_cnn_lstm_sentiment",
        }
    )
    profit = names["opportunity_profit"]
    assert profit["version"] == "sha256:" + profit["onnx_sha256"][:12]
    assert profit["registry_version"] is None
    assert names["price_lgbm"]["horizon_minutes"] == 10 and names["price_cnn_lstm"]["horizon_minutes"] == 1
    assert health["uptime_s"] >= 0 and health["max_batch"] == 16


# --- predictions equal the models' own -------------------------------------------------------------


def _by_hand(bundles: dict[str, Any], payload: dict[str, Any]) -> dict[str, float]:
    """The /predict answer recomputed from the bundles and scoring functions directly."""
    from cryptoml.models.scoring import composite_score, kelly_fraction

    holds = np.asarray([payload["hold_hours"]] if "hold_hours" in payload else HOLD_GRID)
    cols = {c: np.asarray([payload.get(c, 0.0)] * len(holds)) for c in INPUT_COLUMNS if c != "hold_hours"}
    cols["hold_hours"] = holds
    X = feature_matrix(cols)
    profit = bundles["opportunity_profit"].predict(X)
    proba = bundles["opportunity_success"].predict(X)
    score = np.asarray(composite_score(profit, proba, holds))
    j = int(np.argmax(score))
    return {
        "predicted_profit_pct": float(profit[j]),
        "success_probability": float(proba[j]),
        "predicted_hold_hours": float(holds[j]),
        "composite_score": float(score[j]),
        "kelly_fraction": float(kelly_fraction(proba[j], SIZING["mean_win_pct"], SIZING["mean_loss_pct"])),
    }


def test_predict_equals_direct_model_set_and_bundle_predictions(
    client: Client, model_set: ModelSet, models_dir: Path, opportunities: dict[str, np.ndarray]
) -> None:
    bundles = {n: load_bundle(models_dir / n) for n in ("opportunity_profit", "opportunity_success")}
    for i in range(12):
        payload = opportunity_payload(opportunities, i, hold=i % 3 == 0)
        status, answer = client.request("POST", "/predict", payload)
        assert status == 200, answer
        assert answer == model_set.score_opportunity(payload)
        expected = _by_hand(bundles, payload)
        assert {k: answer[k] for k in expected} == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert answer["hold_choice"] == ("given" if "hold_hours" in payload else "best_composite")
        assert answer["hold_model_hours"] in HOLD_GRID and 0 <= answer["hold_model_probability"] <= 1
        assert "opportunity_hold=sha256:" in answer["model_version"]


def test_nullable_fields_take_the_documented_substitutes(client: Client, model_set: ModelSet) -> None:
    payload = opportunity_payload(synthetic_opportunities(1, 5), 0)
    for field in ("break_even_hours", "volume_24h", "orderbook_depth_usd", "depth_is_proxy", "next_funding_ts_ms"):
        payload[field] = None
    status, answer = client.request("POST", "/predict", payload)
    assert status == 200, answer
    assert answer == model_set.score_opportunity(payload)


def test_batch_equals_single_predictions(client: Client, opportunities: dict[str, np.ndarray]) -> None:
    payloads = [opportunity_payload(opportunities, i, hold=i % 2 == 0) for i in range(16)]
    status, answer = client.request("POST", "/predict/batch", {"opportunities": payloads})
    assert status == 200, answer
    assert answer["count"] == 16
    for payload, got in zip(payloads, answer["predictions"], strict=True):
        assert got == client.request("POST", "/predict", payload)[1]


# --- bad input: always 4xx, naming the field --------------------------------------------------------


def _valid() -> dict[str, Any]:
    return opportunity_payload(synthetic_opportunities(1, 9), 0)


def _raw(payload: dict[str, Any], field: str, literal: str) -> bytes:
    """``payload`` as JSON with ``field`` set to a raw JSON literal (NaN, Infinity...)."""
    marker = "__RAW__"
    return json.dumps({**payload, field: marker}).replace(f'"{marker}"', literal).encode()


BAD_OPPORTUNITIES: list[tuple[str, Any, str]] = [
    # (case, raw body bytes or a dict, field the message must name)
    ("NaN literal", _raw(_valid(), "fund_apr", "NaN"), "fund_apr"),
    ("Infinity literal", _raw(_valid(), "funding_spread", "Infinity"), "funding_spread"),
    ("-Infinity literal", _raw(_valid(), "ret_vol_24h", "-Infinity"), "ret_vol_24h"),
    ("huge number parsed as inf", _raw(_valid(), "fund_profit_8h", "1e999"), "fund_profit_8h"),
    ("string for a number", {**_valid(), "fund_apr": "12.5"}, "fund_apr"),
    ("bool for a number", {**_valid(), "fund_apr": True}, "fund_apr"),
    ("fraction for ts_ms", {**_valid(), "ts_ms": 1.7e12 + 0.5}, "ts_ms"),
    ("string for ts_ms", {**_valid(), "ts_ms": "1704067200000"}, "ts_ms"),
    ("ts_ms in microseconds", {**_valid(), "ts_ms": 1_704_067_200_000_000}, "ts_ms"),
    ("unknown strategy", {**_valid(), "strategy": "triangular"}, "strategy"),
    ("unknown regime", {**_valid(), "regime": "bull"}, "regime"),
    ("hold of zero", {**_valid(), "hold_hours": 0}, "hold_hours"),
    ("negative volume", {**_valid(), "volume_24h": -1.0}, "volume_24h"),
    ("missing field", {k: v for k, v in _valid().items() if k != "regime"}, "regime"),
    ("extra field", {**_valid(), "leverage": 3}, "leverage"),
    ("int for a bool", {**_valid(), "depth_is_proxy": 1}, "depth_is_proxy"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_OPPORTUNITIES, ids=[c[0] for c in BAD_OPPORTUNITIES])
def test_bad_opportunity_fields_get_422_naming_the_field(client: Client, case: str, body: Any, field: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = client.request("POST", "/predict", raw=raw)
    assert status == 422, (case, answer)
    assert field in [item["field"] for item in answer["detail"]], answer
    assert field in answer["message"]
    # the same item inside a batch is named by its position
    batch = b'{"opportunities": [' + json.dumps(_valid()).encode() + b", " + raw + b"]}"
    status, answer = client.request("POST", "/predict/batch", raw=batch)
    assert status == 422, (case, answer)
    assert f"opportunities.1.{field}" in [item["field"] for item in answer["detail"]], answer


@pytest.mark.parametrize(
    ("case", "raw", "content_type", "status", "needle"),
    [
        ("truncated JSON", b'{"ts_ms": 1704067200000, "strategy": ', "application/json", 422, "JSON decode error"),
        ("trailing comma", b'{"ts_ms": 1,}', "application/json", 422, "JSON decode error"),
        ("not JSON at all", b"ts_ms=1&fund_apr=2", "application/json", 422, "JSON decode error"),
        ("a list, not an object", b"[1, 2, 3]", "application/json", 422, "valid dictionary"),
        ("a bare NaN", b"NaN", "application/json", 422, "valid dictionary"),
        ("empty body", b"", "application/json", 422, "Field required"),
        ("form content type", b"ts_ms=1", "application/x-www-form-urlencoded", 422, "valid dictionary"),
        ("invalid UTF-8", b'{"ts_ms": "\xff\xfe"}', "application/json", 400, "error parsing the body"),
        ("nested too deep", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "error parsing the body"),
    ],
)
def test_malformed_bodies_get_4xx_with_a_message(
    client: Client, case: str, raw: bytes, content_type: str, status: int, needle: str
) -> None:
    got, answer = client.request("POST", "/predict", raw=raw, headers={"content-type": content_type})
    assert got == status, (case, answer)
    assert needle in json.dumps(answer), answer


def test_oversized_batches_and_bodies_are_refused(client: Client) -> None:
    item = _valid()
    status, answer = client.request("POST", "/predict/batch", {"opportunities": [item] * 17})
    assert status == 422
    assert "at most 16 items" in answer["message"] and answer["detail"][0]["field"] == "opportunities"
    status, answer = client.request("POST", "/predict/batch", {"opportunities": []})
    assert status == 422 and "at least 1 item" in answer["message"]
    # over max_body_bytes (1 MiB): refused before parsing, whether the length is declared or chunked
    big = json.dumps({"opportunities": [item] * 3000}).encode()
    assert len(big) > 1 << 20
    status, answer = client.request("POST", "/predict/batch", raw=big)
    assert status == 413 and "1048576 bytes" in answer["detail"]
    conn = http.client.HTTPConnection(client.conn.host, client.conn.port, timeout=30)
    conn.request(
        "POST",
        "/predict/batch",
        body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
        headers={"content-type": "application/json"},
        encode_chunked=True,
    )
    response = conn.getresponse()
    assert response.status == 413 and b"max_body_bytes" in response.read()
    conn.close()
    # a declared length far beyond the limit is answered at once, without waiting for the body
    with socket.create_connection((client.conn.host, client.conn.port), timeout=30) as sock:
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n"
        sock.sendall(head + b"\r\n{")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")


# --- price -------------------------------------------------------------------------------------------


def test_price_prediction_equals_the_models(client: Client, model_set: ModelSet, models_dir: Path) -> None:
    bars = random_bars(300, seed=4)
    status, answer = client.request("POST", "/predict/price", {"bars": bars_payload(bars)})
    assert status == 200, answer
    assert answer == model_set.predict_price(bars)
    assert answer["model"] == "price_lgbm" and answer["horizon_minutes"] == 10
    stream = StreamingFeatures()
    for row in zip(*bars.values(), strict=True):
        vector = stream.update(*row)
    assert vector is not None
    lgbm = load_bundle(models_dir / "price_lgbm")
    assert answer["forward_return"] == pytest.approx(float(lgbm.predict(vector[None, :])[0]), abs=1e-12)
    keras = {p["model"]: p for p in answer["predictions"]}["price_cnn_lstm"]
    window = np.column_stack([bars[c] for c in PRICE_FEATURES])[-WINDOW:]
    expected = float(load_bundle(models_dir / "price_cnn_lstm").predict_raw(window[None])[0])
    assert keras["forward_return"] == pytest.approx(expected, abs=1e-12)
    assert "no current sentiment readings" in answer["reason"]


def test_price_uses_the_sentiment_model_when_readings_cover_the_window(client: Client) -> None:
    bars = random_bars(200, seed=5)
    rng = np.random.default_rng(5)
    readings = [
        {"ts_ms": ts + MINUTE_MS, **{c: float(rng.normal()) for c in SENTIMENT_COLUMNS}} for ts in bars["ts_ms"][::5]
    ]
    status, answer = client.request("POST", "/predict/price", {"bars": bars_payload(bars), "sentiment": readings})
    assert status == 200, answer
    assert [p["model"] for p in answer["predictions"]] == ["price_lgbm", "price_cnn_lstm_sentiment"]
    assert "sentiment readings are available" in answer["reason"]
    # readings that stop an hour before the last bar do not cover its window: the price-only model answers
    late = [r for r in readings if r["ts_ms"] <= bars["ts_ms"][-120]]
    status, answer = client.request("POST", "/predict/price", {"bars": bars_payload(bars), "sentiment": late})
    assert status == 200, answer
    assert [p["model"] for p in answer["predictions"]] == ["price_lgbm", "price_cnn_lstm"]
    assert "no current sentiment readings" in answer["reason"]


def test_price_with_too_few_bars_answers_no_forecast_with_a_reason(client: Client) -> None:
    status, answer = client.request("POST", "/predict/price", {"bars": bars_payload(random_bars(30, seed=6))})
    assert status == 200
    assert answer["forward_return"] is None and answer["model"] is None and answer["predictions"] == []
    assert "needs 61 bars" in answer["reason"] and "120 bars" in answer["reason"]


@pytest.mark.parametrize(
    ("case", "edit", "field", "needle"),
    [
        ("bars out of order", lambda b: b.__setitem__(3, {**b[3], "ts_ms": b[1]["ts_ms"]}), "bars", "bars[3].ts_ms"),
        ("off-grid step", lambda b: b.__setitem__(5, {**b[5], "ts_ms": b[5]["ts_ms"] + 1}), "bars", "bars[5].ts_ms"),
        ("high below low", lambda b: b.__setitem__(7, {**b[7], "high": b[7]["low"] / 2}), "bars.7", "below low"),
        ("zero price", lambda b: b.__setitem__(2, {**b[2], "close": 0.0}), "bars.2.close", "greater than 0"),
        ("missing volume", lambda b: b[4].pop("volume"), "bars.4.volume", "Field required"),
        ("too many bars", lambda b: b.extend(b[-1:] * 1440), "bars", "at most 1440 items"),
    ],
)
def test_bad_bars_get_422_naming_the_bar(client: Client, case: str, edit: Any, field: str, needle: str) -> None:
    bars = bars_payload(random_bars(80, seed=7))
    edit(bars)
    status, answer = client.request("POST", "/predict/price", {"bars": bars})
    assert status == 422, (case, answer)
    assert field in [item["field"] for item in answer["detail"]], answer
    assert needle in answer["message"], answer


# --- bundles that cannot be served -------------------------------------------------------------------


def test_corrupt_and_mismatched_bundles_are_skipped_and_reported(models_dir: Path, tmp_path: Path) -> None:
    from cryptoml.edge.api import create_app

    for name in ("opportunity_profit", "opportunity_success", "opportunity_hold", "price_lgbm"):
        shutil.copytree(models_dir / name, tmp_path / name)
    onnx_path = tmp_path / "opportunity_hold" / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))  # corrupt: the checksum refuses it
    meta_path = tmp_path / "price_lgbm" / "model_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["feature_names"][0] = "close_vs_ema_13"  # trained on another feature code
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "price_cnn_lstm_sentiment").mkdir()
    (tmp_path / "price_cnn_lstm_sentiment" / "NOT_TRAINED.json").write_text('{"reason": "no sentiment table"}')
    (tmp_path / "native").mkdir()  # not a bundle: ignored

    with running(create_app(tmp_path)) as url:
        c = Client(url)
        status, health = c.request("GET", "/health")
        assert status == 200 and health["status"] == "degraded"
        assert [m["name"] for m in health["models"]] == ["opportunity_profit", "opportunity_success"]
        reasons = {Path(s["path"]).name: s["reason"] for s in health["skipped"]}
        assert set(reasons) == {"opportunity_hold", "price_lgbm", "price_cnn_lstm_sentiment"}
        assert "corrupt" in reasons["opportunity_hold"]
        assert "feature list differs" in reasons["price_lgbm"] and "close_vs_ema_13" in reasons["price_lgbm"]
        assert reasons["price_cnn_lstm_sentiment"] == "not trained: no sentiment table"
        # without the hold model there is no grid: the hold must be given
        status, answer = c.request("POST", "/predict", _valid())
        assert status == 422 and "hold_hours is required" in answer["message"]
        status, answer = c.request("POST", "/predict", {**_valid(), "hold_hours": 8.0})
        assert status == 200 and answer["hold_model_hours"] is None
        status, answer = c.request("POST", "/predict/price", {"bars": bars_payload(random_bars(100, seed=8))})
        assert status == 200 and answer["forward_return"] is None
        assert "price_lgbm is not loaded" in answer["reason"] and "no Keras price model" in answer["reason"]
        c.close()

    empty = tmp_path / "empty"
    empty.mkdir()
    with running(create_app(empty)) as url:
        c = Client(url)
        assert c.request("GET", "/health")[1]["status"] == "degraded"
        status, answer = c.request("POST", "/predict", _valid())
        assert status == 503 and "opportunity_profit is not loaded" in answer["detail"]
        c.close()


# --- the fast path: same answers as FastAPI, coalesced scoring ---------------------------------------

JSON = "application/json"


def _j(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


SAME_AS_FASTAPI: list[tuple[str, str, bytes, str]] = [
    # (case, path, raw body, content type): each must get the same status and body from both servers
    ("valid, best hold", "/predict", _j(_valid()), JSON),
    ("valid, given hold", "/predict", _j({**_valid(), "hold_hours": 8.0}), JSON),
    ("charset parameter", "/predict", _j(_valid()), "application/json; charset=utf-8"),
    ("upper-case type", "/predict", _j(_valid()), "Application/JSON"),
    ("+json subtype", "/predict", _j(_valid()), "application/vnd.api+json"),
    ("text/plain", "/predict", _j(_valid()), "text/plain"),
    ("duplicate key: the last wins", "/predict", _j(_valid())[:-1] + b', "fund_apr": -3.5}', JSON),
    ("UTF-8 BOM", "/predict", b"\xef\xbb\xbf" + _j(_valid()), JSON),
    ("UTF-16 body", "/predict", json.dumps(_valid()).encode("utf-16"), JSON),
    ("integer-valued float ts", "/predict", _j({**_valid(), "ts_ms": 1.7040672e12}), JSON),
    ("big integer for a float", "/predict", _j({**_valid(), "fund_apr": 10**30}), JSON),
    ("lone surrogate", "/predict", _j({**_valid(), "regime": "\ud800"}), JSON),
    ("valid batch", "/predict/batch", _j({"opportunities": [_valid()] * 3}), JSON),
    ("batch, one bad", "/predict/batch", _j({"opportunities": [_valid(), {**_valid(), "ts_ms": -1}]}), JSON),
    ("price", "/predict/price", _j({"bars": bars_payload(random_bars(130, seed=3))}), JSON),
    ("price, bad order", "/predict/price", _j({"bars": bars_payload(random_bars(3, seed=3))[::-1]}), JSON),
    *[(f"bad field: {case}", "/predict", _j(body), JSON) for case, body, _ in BAD_OPPORTUNITIES],
    ("truncated", "/predict", b'{"ts_ms": 1704067200000, "strategy": ', JSON),
    ("empty", "/predict", b"", JSON),
    ("a list", "/predict/batch", b"[1, 2]", JSON),
    ("nested too deep", "/predict/price", b"[" * 5000 + b"]" * 5000, JSON),
]


@pytest.mark.parametrize(("case", "path", "raw", "content_type"), SAME_AS_FASTAPI, ids=[c[0] for c in SAME_AS_FASTAPI])
def test_fast_path_answers_exactly_as_fastapi(
    base_url: str, fastapi_url: str, case: str, path: str, raw: bytes, content_type: str
) -> None:
    answers = []
    for url in (base_url, fastapi_url):
        c = Client(url)
        answers.append(c.request("POST", path, raw=raw, headers={"content-type": content_type}))
        c.close()
    assert answers[0] == answers[1], case
    assert answers[0][0] < 500


def _post_concurrently(app: Any, path: str | list[str], bodies: list[bytes]) -> list[tuple[int, Any]]:
    """POST ``bodies`` (to ``path``, or each to its own) to the ASGI ``app`` at once: one event loop, no sockets."""
    import httpx

    paths = [path] * len(bodies) if isinstance(path, str) else path

    async def main() -> list[tuple[int, Any]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            sent = [c.post(p, content=b, headers={"content-type": JSON}) for p, b in zip(paths, bodies, strict=True)]
            return [(r.status_code, r.json()) for r in await asyncio.gather(*sent)]

    return asyncio.run(main())


def _count_scoring(monkeypatch: pytest.MonkeyPatch, models: ModelSet) -> list[int]:
    rows_per_call: list[int] = []
    score = models.score_opportunities

    def counted(rows: Any) -> Any:
        rows_per_call.append(len(rows))
        return score(rows)

    monkeypatch.setattr(models, "score_opportunities", counted)
    return rows_per_call


def test_concurrent_requests_are_scored_together_with_their_own_answers(
    models_dir: Path, model_set: ModelSet, opportunities: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptoml.edge.api import create_app

    payloads = [opportunity_payload(opportunities, i, hold=i % 2 == 0) for i in range(8)]
    bodies = [json.dumps(p).encode() for p in payloads]
    expected = [model_set.score_opportunity(p) for p in payloads]
    fast = create_app(models_dir)
    calls = _count_scoring(monkeypatch, fast.state.models)
    assert _post_concurrently(fast, "/predict", bodies) == [(200, e) for e in expected]
    assert calls == [8]  # one vectorised call for the 8 requests that waited in the same loop turn
    batch = json.dumps({"opportunities": payloads[:3]}).encode()
    answers = _post_concurrently(fast, ["/predict/batch", "/predict", "/predict"], [batch, *bodies[3:5]])
    assert answers == [(200, {"predictions": expected[:3], "count": 3}), (200, expected[3]), (200, expected[4])]
    assert calls == [8, 5]

    slow = create_app(models_dir, fast_path=False)
    calls = _count_scoring(monkeypatch, slow.state.models)
    assert _post_concurrently(slow, "/predict", bodies) == [(200, e) for e in expected]
    assert calls == [1] * 8


def test_a_failing_request_among_coalesced_ones_gets_its_own_error_only(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the hold model, a request without hold_hours fails in the model code (not in validation):
    the joint call fails, each request is scored alone, and only that one gets FastAPI's 422."""
    from cryptoml.edge.api import create_app

    for name in ("opportunity_profit", "opportunity_success"):
        shutil.copytree(models_dir / name, tmp_path / name)
    app = create_app(tmp_path)
    calls = _count_scoring(monkeypatch, app.state.models)
    good = json.dumps({**_valid(), "hold_hours": 8.0}).encode()
    bad = json.dumps(_valid()).encode()
    answers = _post_concurrently(app, "/predict", [good, bad, good])
    alone = [_post_concurrently(create_app(tmp_path, fast_path=False), "/predict", [b])[0] for b in (good, bad)]
    assert answers == [alone[0], alone[1], alone[0]]
    assert answers[1][0] == 422 and "hold_hours is required" in answers[1][1]["message"]
    assert calls[0] == 3 and sorted(calls[1:4]) == [1, 1, 1]  # joint, then each alone (FastAPI retries the bad one)


# --- footprint, load ---------------------------------------------------------------------------------


def test_serving_imports_no_heavy_stack(models_dir: Path) -> None:
    """Create the app, serve one request with uvicorn, then look at sys.modules (fresh interpreter)."""
    code = f"""
import sys, json, threading, socket, urllib.request
from pathlib import Path
import uvicorn
from cryptoml.edge.api import create_app
app = create_app(Path({str(models_dir)!r}))
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
threading.Thread(target=server.run, kwargs={{"sockets": [sock]}}, daemon=True).start()
while not server.started:
    threading.Event().wait(0.01)
health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{{port}}/health"))
server.should_exit = True
names = ("pandas", "tensorflow", "keras", "mlflow", "prefect", "xgboost", "lightgbm")
heavy = sorted(m for m in names if m in sys.modules)
print(json.dumps({{"heavy": heavy, "models": len(health["models"])}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"heavy": [], "models": 6}


def test_bounded_load_has_zero_errors(base_url: str, model_set: ModelSet, opportunities: dict[str, np.ndarray]) -> None:
    """2,000 requests from 4 keep-alive clients at once: every one answers 200 with the right prediction."""
    payloads = [opportunity_payload(opportunities, i, hold=i % 2 == 1) for i in range(20)]
    expected = [model_set.score_opportunity(p) for p in payloads]

    def worker(k: int) -> list[str]:
        c = Client(base_url)
        errors = []
        for n in range(500):
            i = (k * 7 + n) % len(payloads)
            status, answer = c.request("POST", "/predict", payloads[i])
            if status != 200 or answer != expected[i]:
                errors.append(f"request {n} of client {k}: {status} {answer}")
        c.close()
        return errors

    with ThreadPoolExecutor(4) as pool:
        errors = [e for batch in pool.map(worker, range(4)) for e in batch]
    assert errors == []


# --- property-based fuzzing of the OpenAPI schema ----------------------------------------------------

FUZZ_EXAMPLES = 200  # per operation and mode: 3 operations x 2 modes = 1,200 generated cases (plus /health)


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> Any:
    import schemathesis

    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


FUZZ_TARGETS = [
    (method, path, mode)
    for method, path in (("POST", "/predict"), ("POST", "/predict/batch"), ("POST", "/predict/price"))
    for mode in ("positive", "negative")
] + [("GET", "/health", "positive")]  # /health takes no input: there is nothing negative to send


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ_TARGETS)
def test_fuzzing_the_schema_gives_no_5xx_and_conforming_responses(
    api_schema: Any, base_url: str, fastapi_url: str, method: str, path: str, mode: str
) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode == "negative":
        checks.append(negative_data_rejection)
    elif path != "/predict/price":  # bar order and high >= low are rules the JSON schema cannot state
        checks.append(positive_data_acceptance)
    operation = api_schema[path][method]
    statuses: list[int] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case: Any) -> None:
        response = case.call_and_validate(base_url=base_url, checks=checks)
        statuses.append(response.status_code)
        if method == "POST":  # the fast path answers as FastAPI alone would (/health differs by its uptime)
            reference = case.call(base_url=fastapi_url)
            assert (response.status_code, response.content) == (reference.status_code, reference.content) or (
                response.status_code == reference.status_code and response.json() == reference.json()
            )

    run()
    assert statuses and max(statuses) < 500
    if method == "POST":
        assert len(statuses) >= FUZZ_EXAMPLES * 0.9  # the 1,000-case budget is really spent
        if mode == "negative":
            assert set(statuses) <= {400, 413, 422}
