"""A real ``mlflow server`` subprocess on 127.0.0.1 for end-to-end registry tests.

Its SQLite store (runs and the model registry) and its artifacts live in a folder of the test's; clients
reach it through ``MLFLOW_TRACKING_URI = server.url`` and artifacts go through the server's proxy
(``mlflow-artifacts:/``), as with a shared team server. Ready in ~10-20 s here (``GET /health``). The
server runs in its own session (uvicorn is its child; the GenAI job runner is switched off) and is stopped with SIGTERM
to the group, then SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from tests.support.prefect_server import free_port


class MlflowServerError(RuntimeError):
    """The server did not become healthy in time, or died while starting."""


def mlflow_executable() -> Path:
    """The ``mlflow`` console script of the running interpreter's environment."""
    path = Path(sys.executable).with_name("mlflow")
    if not path.is_file():
        raise MlflowServerError(f"no mlflow executable next to {sys.executable}")
    return path


def _live_members(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies awaiting their reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: any member, zombie or not
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its closing parenthesis.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class MlflowServer:
    """``with MlflowServer(root) as server:`` -> a healthy tracking server at :attr:`url` until the block ends.

    ``root`` receives ``mlflow.db`` (backend and registry store), ``artifacts/`` (where the proxied
    artifacts land: ``artifacts/<experiment_id>/<run_id>/artifacts/...``) and ``server.log``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 10.0,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.log_path = self.root / "server.log"
        self.artifacts_dir = self.root / "artifacts"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The server's environment: no telemetry, and no tracking URI of its own to call."""
        env = {k: v for k, v in self.base_env.items() if not k.startswith("MLFLOW_")}
        env.update(
            MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="true",
            # The GenAI job runner would start ~8 huey consumer processes the registry never uses.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )
        return env

    def start(self) -> MlflowServer:
        if self._proc is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [
            str(mlflow_executable()),
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",  # the default 4 would cost memory and start time on a 2-core machine
            "--backend-store-uri",
            f"sqlite:///{(self.root / 'mlflow.db').resolve()}",
            "--artifacts-destination",
            str(self.artifacts_dir.resolve()),
        ]
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.root,  # anything the server writes by default lands in the test's folder
            env=self.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.url}/health"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise MlflowServerError(f"mlflow server exited with code {code} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise MlflowServerError(
                    f"mlflow server not healthy at {url} after {self.startup_timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return "(no server log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it if still alive after ``stop_timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout_s)
            except ProcessLookupError:
                pass
            self._reap_group(proc.pid)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _reap_group(self, pgid: int) -> None:
        """The CLI process has exited; wait for the rest of its group (uvicorn) to stop, then SIGKILL it."""
        deadline = time.monotonic() + self.stop_timeout_s
        while _live_members(pgid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                return
            time.sleep(0.1)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
