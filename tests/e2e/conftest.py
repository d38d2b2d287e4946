"""End-to-end fixtures: one real Prefect server per session, and the ``cryptoml`` CLI run as a subprocess.

Every CLI run gets ``PREFECT_API_URL`` of the session's server (no 10-17 s ephemeral API per process), a
PATH starting with the venv's ``bin`` (where ``cryptoml``, ``dvc`` and ``prefect`` live) and the default
Prefect logging level, so its output is what a user sees.

Subprocesses also share a bytecode cache (``PYTHONPYCACHEPREFIX``, kept in pytest's cache folder): where
``PYTHONDONTWRITEBYTECODE`` is set and the venv holds no ``.pyc`` files (``uv sync`` compiles none), every
process would otherwise compile prefect, pandas and great-expectations from source, seconds each time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CRYPTOML = VENV_BIN / "cryptoml"
CLI_TIMEOUT_S = 180  # a hung command fails its test instead of the whole session

RunCli = Callable[..., "subprocess.CompletedProcess[str]"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "scenario(name): the module scenario whose outcome a test checks")


@pytest.fixture(scope="session")
def bytecode_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables giving subprocesses a shared, writable bytecode cache outside the venv."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("e2e-pycache") if cache is not None else tmp_path_factory.mktemp("pycache")
    return {"PYTHONPYCACHEPREFIX": str(folder)}


def subprocess_env(**changes: str) -> dict[str, str]:
    """This process's environment without Prefect settings or the no-bytecode switch, plus ``changes``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(changes)
    return env


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, bytecode_env: dict[str, str]) -> Iterator[str]:
    """A real ``prefect server start`` on a free port of 127.0.0.1; yields its API URL (``.../api``)."""
    home = tmp_path_factory.mktemp("prefect-server")
    with PrefectServer(home, startup_timeout_s=90, base_env=subprocess_env(**bytecode_env)) as server:
        yield server.api_url


@pytest.fixture(scope="module")
def prefect_api(prefect_server: str) -> Iterator[str]:
    """In-process flows of the requesting module report to the session's real server, not an ephemeral one."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        yield prefect_server
        # Deliver the module's logs and events while the settings still name this server.
        APILogWorker.drain_all()
        EventsWorker.drain_all()


@pytest.fixture(scope="session")
def cli_env(
    prefect_server: str, bytecode_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """Environment of CLI subprocesses: the session's server, the venv first on PATH, no telemetry."""
    return subprocess_env(
        **bytecode_env,
        PREFECT_API_URL=prefect_server,
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-client")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )


@pytest.fixture(scope="session")
def run_cli(cli_env: dict[str, str]) -> RunCli:
    """``run_cli(*args, cwd=DIR)`` -> the finished ``cryptoml`` subprocess (text stdout / stderr)."""

    def run(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CRYPTOML), *args],
            cwd=cwd,
            env={**cli_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )

    return run


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "synthetic.days", 2)`` sets ``d["synthetic"]["days"] = 2``."""
    *parents, leaf = dotted.split(".")
    node = data
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value


def write_params(directory: Path, changes: Mapping[str, Any] | None = None, *, source: Path | None = None) -> Path:
    """``directory/params.yaml``: the repo's params.yaml (or ``source``) with dotted-key ``changes`` applied."""
    data = yaml.safe_load((source or ROOT / "params.yaml").read_text())
    for dotted, value in (changes or {}).items():
        set_dotted(data, dotted, value)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """A failed command's exit code and output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
