"""A real ``mlflow server`` subprocess on 127.0.0.1 for end-to-end registry tests.

Its SQLite store (runs and the model registry) and its artifacts live in a folder of the test's; clients
reach it through ``MLFLOW_TRACKING_URI = server.url`` and artifacts go through the server's proxy
(``mlflow-artifacts:/``), as with a shared team server. Ready in ~10-20 s here (``GET /health``). The
server runs in its own session (uvicorn is its child; the GenAI job runner is switched off) and is stopped with SIGTERM
to the group, then SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.support.server_process import ServerError, ServerProcess

__all__ = ["MlflowServer", "MlflowServerError", "mlflow_executable"]


class MlflowServerError(ServerError):
    """The server did not become healthy in time, or died while starting."""


def mlflow_executable() -> Path:
    """The ``mlflow`` console script of the running interpreter's environment."""
    path = Path(sys.executable).with_name("mlflow")
    if not path.is_file():
        raise MlflowServerError(f"no mlflow executable next to {sys.executable}")
    return path


class MlflowServer(ServerProcess):
    """``with MlflowServer(root) as server:`` -> a healthy tracking server at :attr:`url` until the block ends.

    ``root`` receives ``mlflow.db`` (backend and registry store), ``artifacts/`` (where the proxied
    artifacts land: ``artifacts/<experiment_id>/<run_id>/artifacts/...``) and ``server.log``.
    """

    name = "mlflow server"
    error = MlflowServerError

    def __init__(self, root: Any, *, startup_timeout_s: float = 120.0, stop_timeout_s: float = 10.0, **kw: Any) -> None:
        super().__init__(root, startup_timeout_s=startup_timeout_s, stop_timeout_s=stop_timeout_s, **kw)
        self.artifacts_dir = self.folder / "artifacts"

    @property
    def root(self) -> Path:
        return self.folder

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def health_url(self) -> str:
        return f"{self.url}/health"

    def command(self) -> list[str]:
        return [
            str(mlflow_executable()),
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",  # the default 4 would cost memory and start time on a 2-core machine
            "--backend-store-uri",
            f"sqlite:///{(self.folder / 'mlflow.db').resolve()}",
            "--artifacts-destination",
            str(self.artifacts_dir.resolve()),
        ]

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
