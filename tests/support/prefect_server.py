"""A real ``prefect server start`` subprocess on 127.0.0.1 for end-to-end tests.

CLI subprocesses given ``PREFECT_API_URL = server.api_url`` talk to it instead of starting their own
ephemeral API (10-17 s each). The server runs in its own session with its own ``PREFECT_HOME`` (database,
settings) and is stopped with SIGTERM, then SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

HEALTH_PATH = "/health"  # under the API URL: http://127.0.0.1:PORT/api/health


class PrefectServerError(RuntimeError):
    """The server did not become healthy in time, or died while starting."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def prefect_executable() -> Path:
    """The ``prefect`` console script of the running interpreter's environment."""
    path = Path(sys.executable).with_name("prefect")
    if not path.is_file():
        raise PrefectServerError(f"no prefect executable next to {sys.executable}")
    return path


class PrefectServer:
    """``with PrefectServer(home) as server:`` -> a healthy server at :attr:`api_url` until the block ends.

        ``home`` becomes the server's ``PREFECT_HOME`` (its SQLite database lives there) and receives
        ``server.log``. ``startup_timeout_s`` bounds the wait for ``/api/health``; on timeout the error
        carries the tail of the server's log. ``base_env`` replaces ``os.environ`` as the environment the
    server's own settings are added to.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 90.0,
        stop_timeout_s: float = 5.0,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.home = Path(home)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.log_path = self.home / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def env(self) -> dict[str, str]:
        """The server's environment: its own home, no telemetry, and no API URL of its own to call."""
        env = {k: v for k, v in self.base_env.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        return env

    def start(self) -> PrefectServer:
        if self._proc is not None:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [str(prefect_executable()), "server", "start", "--host", self.host, "--port", str(self.port)]
        # --no-ui: the dashboard is not needed and copying its build slows the start.
        cmd.append("--no-ui")
        # A new session: the server and any child it spawns can be signalled as one process group.
        self._proc = subprocess.Popen(
            cmd,
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
        url = self.api_url + HEALTH_PATH
        while True:
            code = self._proc.poll()
            if code is not None:
                raise PrefectServerError(f"prefect server exited with code {code} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise PrefectServerError(
                    f"prefect server not healthy at {url} after {self.startup_timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return "(no server log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

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
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
