"""A server subprocess for end-to-end tests: start in its own session, wait for a health URL, stop the group.

Subclasses name the command, the health URL and the environment (:class:`PrefectServer`,
:class:`MlflowServer`). The server and its children form one process group: stopping sends SIGTERM to
the group, SIGKILL after ``stop_timeout_s``, and waits for every member (uvicorn workers) to be gone.
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Self


class ServerError(RuntimeError):
    """The server did not become healthy in time, or died while starting."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def live_members(pgid: int) -> bool:
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


class ServerProcess(abc.ABC):
    """``with Server(folder) as server:`` -> a healthy server until the block ends (see the module doc)."""

    name = "server"
    error: type[ServerError] = ServerError

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 90.0,
        stop_timeout_s: float = 5.0,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.log_path = self.folder / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- what a subclass names ---
    @abc.abstractmethod
    def command(self) -> list[str]:
        """The server's command line."""

    @abc.abstractmethod
    def health_url(self) -> str:
        """The URL that answers 200 once the server is ready."""

    def env(self) -> dict[str, str]:
        return dict(self.base_env)

    # --- the life cycle ---
    def start(self) -> Self:
        if self._proc is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.folder,  # anything the server writes by default lands in the test's folder
            env=self.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the server and its children can be signalled as one group
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
        url = self.health_url()
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self.error(f"{self.name} exited with code {code} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise self.error(
                    f"{self.name} not healthy at {url} after {self.startup_timeout_s:g} s:\n{self.log_tail()}"
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
        """The CLI process has exited; wait for the rest of its group to stop, then SIGKILL it."""
        deadline = time.monotonic() + self.stop_timeout_s
        while live_members(pgid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                return
            time.sleep(0.1)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
