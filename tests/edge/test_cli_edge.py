"""`cryptoml serve` and `cryptoml predict` as a user runs them: real subprocesses, real bundles, 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.edge.test_api import build_opportunity_bundles, opportunity_payload, synthetic_opportunities

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "flows.cli"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles")
    build_opportunity_bundles(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_predict_command_answers_the_api_schema_and_names_bad_fields(models_dir: Path) -> None:
    payload = opportunity_payload(synthetic_opportunities(4, seed=5), 0)
    done = subprocess.run([*CLI, "predict", json.dumps(payload), "--models", str(models_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    for key in ("predicted_profit_pct", "success_probability", "predicted_hold_hours", "composite_score",
                "kelly_fraction", "model_version"):  # fmt: skip
        assert key in answer
    assert np.isfinite(answer["composite_score"])
    bad = {**payload, "fund_apr": "lots"}
    refused = subprocess.run([*CLI, "predict", json.dumps(bad), "--models", str(models_dir)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 3 and "fund_apr" in refused.stderr, refused.stderr


def test_serve_command_binds_loopback_and_serves_health(models_dir: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--models", str(models_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "serve did not answer within 60 s"
                time.sleep(0.3)
        assert {"opportunity_profit", "opportunity_success", "opportunity_hold"} <= {
            m["name"] for m in health["models"]
        }
        assert health["uptime_s"] >= 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
