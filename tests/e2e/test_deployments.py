"""The Prefect deployments against a real Prefect server on 127.0.0.1: built from params, served from a temp
project, the weekly schedule's upcoming runs, and ``prefect deployment run 'retrain/weekly'`` to Completed.

The serve process is ``python -m flows.deployments`` (what ``cryptoml deploy`` runs) in a temp project holding
only a params.yaml: a 2-day synthetic market, a LightGBM-only retrain on the newest day. The drift and backfill
crons are moved to once a year so that no scheduled run competes with the triggered ones while the module
runs; the weekly retrain keeps the default cron. The serve process is stopped (SIGTERM) before the session's
server, and its schedules are then paused.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cryptoml.config import params_from_dict
from flows.deployments import build_deployments, forming_bar_open_iso
from tests.e2e.conftest import CLI_TIMEOUT_S, VENV_BIN, describe, write_params
from tests.support.server_process import live_members

DEPLOYMENTS = (
    "pipeline/manual",
    "backfill/hourly",
    "drift_check/every-15-minutes",
    "retrain/weekly",
    "shadow_review/hourly",
)
ONCE_A_YEAR = "0 0 1 1 *"
PROJECT = {
    "synthetic.days": 2,
    "price_lgbm.n_estimators": 100,
    "retrain.families": ["price_lgbm"],
    "retrain.window_days": 1.0,
    "orchestration.drift_cron": ONCE_A_YEAR,
    "orchestration.backfill_cron": ONCE_A_YEAR,
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SERVE_START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600  # the retrain of a 1-day window takes ~1 min here; a hung run fails instead of blocking
T0_MS = 1_704_067_200_000  # 2024-01-01T00:00Z


# --- built from params (no server) ---------------------------------------------------------------------------


def test_deployments_are_built_from_the_orchestration_params() -> None:
    params = params_from_dict({"orchestration": {"retrain_cron": "0 4 * * 2", "timezone": "Europe/Paris"}})
    built = {d.full_name: d for d in build_deployments(params, "conf/params.yaml")}
    assert list(built) == list(DEPLOYMENTS)
    for deployment in built.values():
        assert deployment.parameters["params_path"] == "conf/params.yaml"
        assert deployment.entrypoint.startswith("flows.")  # a module path: runs import the installed code
    weekly = built["retrain/weekly"]
    assert weekly.entrypoint == "flows.retrain.retrain_flow" and weekly.parameters["reason"] == "schedule"
    [schedule] = weekly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 4 * * 2", "Europe/Paris", True)
    assert built["drift_check/every-15-minutes"].schedules[0].schedule.cron == "*/15 * * * *"
    assert built["backfill/hourly"].schedules[0].schedule.cron == "0 * * * *"
    assert not built["pipeline/manual"].schedules


def test_the_hourly_backfill_ends_at_the_open_of_the_forming_bar() -> None:
    now_ms = T0_MS + 10 * 86_400_000 + 90_500  # 2024-01-11T00:01:30.5
    assert forming_bar_open_iso("1m", now_ms) == "2024-01-11T00:01:00"
    assert forming_bar_open_iso("1h", now_ms) == "2024-01-11T00:00:00"


# --- served against a real server -----------------------------------------------------------------------------


def api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body``) ``url + path`` of the Prefect REST API; the decoded JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def deployment(url: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = api(url, f"/deployments/name/{name}")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    return found


@dataclass
class Served:
    """A serve process of the project's deployments, in ``project``, reporting to the server at ``api_url``."""

    project: Path
    api_url: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM the serve process (it pauses the schedules), SIGKILL its group if it lingers; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10  # flow-run subprocesses of the group
        while live_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if live_members(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def prefect(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real ``prefect`` CLI against the server."""
        return subprocess.run(
            [str(VENV_BIN / "prefect"), *args], cwd=self.project, env=self.env, capture_output=True, text=True,
            timeout=CLI_TIMEOUT_S, check=False,
        )  # fmt: skip

    def run_deployment(self, name: str) -> dict[str, Any]:
        """``prefect deployment run NAME``, then the flow run polled until it ends (or RUN_TIMEOUT_S)."""
        started = self.prefect("deployment", "run", name)
        assert started.returncode == 0, describe(started)
        match = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)
        assert match, describe(started)
        run_id = match.group(1)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            run: dict[str, Any] = api(self.api_url, f"/flow_runs/{run_id}")
            if run["state"]["type"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{name} run {run_id} still {run['state']['type']} after {RUN_TIMEOUT_S} s\n{self.log_tail()}"
                )
            assert self.proc.poll() is None, f"the serve process exited ({self.proc.returncode}):\n{self.log_tail()}"
            time.sleep(2)

    def run_logs(self, run_id: str) -> str:
        logs = api(self.api_url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        return "\n".join(f"{row['level']} {row['message']}" for row in logs)


@pytest.fixture(scope="module")
def served(prefect_server: str, cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``python -m flows.deployments`` serving from a temp project until every deployment is registered."""
    project = tmp_path_factory.mktemp("deployments-project")
    write_params(project, PROJECT)
    # The project's own MLflow store (sqlite under mlruns/), as a served project has.
    env = {k: v for k, v in cli_env.items() if k != "MLFLOW_TRACKING_URI"}
    log_path = project / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.deployments", "--params", "params.yaml"],
            cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # the serve process and its flow-run subprocesses form one group
        )  # fmt: skip
    serve = Served(project, prefect_server, env, log_path, proc)
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while not all(deployment(prefect_server, name) for name in DEPLOYMENTS):
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{serve.log_tail()}"
            assert time.monotonic() < deadline, f"deployments not registered after {SERVE_START_TIMEOUT_S} s"
            time.sleep(0.5)
        yield serve
    finally:
        serve.stop()  # before the session's server stops: a serve process whose server is gone hangs


@pytest.mark.server
def test_the_weekly_schedule_shows_upcoming_runs_on_monday_at_3_utc(served: Served) -> None:
    weekly = deployment(served.api_url, "retrain/weekly")
    assert weekly is not None and not weekly["paused"]
    [schedule] = weekly["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 3 * * 1"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert weekly["parameters"] == {"params_path": "params.yaml", "reason": "schedule"}

    # The server's scheduler fills the upcoming runs of a new deployment within seconds.
    query = {
        "deployments": {"id": {"any_": [weekly["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        "sort": "EXPECTED_START_TIME_ASC",
    }
    deadline = time.monotonic() + 60
    while not (upcoming := api(served.api_url, "/flow_runs/filter", query)):
        assert time.monotonic() < deadline, "no scheduled run of retrain/weekly after 60 s"
        time.sleep(1)
    starts = [datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00")) for run in upcoming]
    for start in starts:
        assert (start.weekday(), start.hour, start.minute, start.second) == (0, 3, 0, 0), start
        assert start.utcoffset() == timedelta(0)
    assert all(b - a == timedelta(days=7) for a, b in itertools.pairwise(starts)), starts
    assert all(run["parameters"]["reason"] == "schedule" for run in upcoming)

    # The CLI shows the same schedule.
    inspected = served.prefect("deployment", "inspect", "retrain/weekly")
    assert inspected.returncode == 0 and "0 3 * * 1" in inspected.stdout, describe(inspected)


@pytest.mark.server
def test_prefect_deployment_run_retrain_weekly_completes(served: Served) -> None:
    run = served.run_deployment("retrain/weekly")
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{served.run_logs(run['id'])}\n{served.log_tail()}"
    assert run["parameters"] == {"params_path": "params.yaml", "reason": "schedule"}
    # The run worked in the project folder: the retrain workspace and the project's MLflow store.
    assert (served.project / "state/retrain/run/models/price_lgbm/model.onnx").is_file()
    assert (served.project / "mlruns" / "mlflow.db").is_file()


@pytest.mark.server
def test_the_hourly_backfill_deployment_fills_the_project_store(served: Served) -> None:
    run = served.run_deployment("backfill/hourly")
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{served.run_logs(run['id'])}\n{served.log_tail()}"
    report = json.loads((served.project / "reports" / "backfill.json").read_text())
    assert report and list((served.project / "data" / "raw").rglob("*.parquet"))


@pytest.mark.server
def test_stopping_serve_pauses_the_schedules(served: Served) -> None:
    assert served.stop() == 0, served.log_tail()
    for name in DEPLOYMENTS:
        found = deployment(served.api_url, name)
        assert found is not None and found["paused"], name
