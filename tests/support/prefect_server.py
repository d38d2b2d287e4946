"""A real ``prefect server start`` subprocess on 127.0.0.1 for end-to-end tests.

CLI subprocesses given ``PREFECT_API_URL = server.api_url`` talk to it instead of starting their own
ephemeral API (10-17 s each). The server runs in its own session with its own ``PREFECT_HOME`` (database,
settings) and is stopped with SIGTERM, then SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.server_process import ServerError, ServerProcess, free_port

__all__ = ["PrefectServer", "PrefectServerError", "free_port", "prefect_executable"]

HEALTH_PATH = "/health"  # under the API URL: http://127.0.0.1:PORT/api/health


class PrefectServerError(ServerError):
    """The server did not become healthy in time, or died while starting."""


def prefect_executable() -> Path:
    """The ``prefect`` console script of the running interpreter's environment."""
    path = Path(sys.executable).with_name("prefect")
    if not path.is_file():
        raise PrefectServerError(f"no prefect executable next to {sys.executable}")
    return path


class PrefectServer(ServerProcess):
    """``with PrefectServer(home) as server:`` -> a healthy server at :attr:`api_url` until the block ends.

        ``home`` becomes the server's ``PREFECT_HOME`` (its SQLite database lives there) and receives
        ``server.log``. ``startup_timeout_s`` bounds the wait for ``/api/health``; on timeout the error
        carries the tail of the server's log. ``base_env`` replaces ``os.environ`` as the environment the
    server's own settings are added to.
    """

    name = "prefect server"
    error = PrefectServerError

    @property
    def home(self) -> Path:
        return self.folder

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def health_url(self) -> str:
        return self.api_url + HEALTH_PATH

    def command(self) -> list[str]:
        # --no-ui: the dashboard is not needed and copying its build slows the start.
        return [str(prefect_executable()), "server", "start", "--host", self.host, "--port", str(self.port), "--no-ui"]

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
