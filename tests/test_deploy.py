"""The edge deployment files (deploy/, /.dockerignore) checked without docker or a running systemd.

- systemd units: parsed into ``{section: {key: [values]}}`` (systemd allows repeated keys, which
  ``configparser`` would collapse) and checked for the keys the Pi deployment relies on; then
  ``systemd-analyze verify`` and ``systemd-analyze security --offline`` when the binary is here.
- Dockerfile: split into instructions the way BuildKit's parser does (continuation lines keep their
  leading whitespace, comment lines inside them are dropped), then checked: the edge extra only, locked,
  a non-root user, a healthcheck, no secrets. The footprint gates and the healthcheck it embeds are run
  here for real (the gates against this venv, the healthcheck against a local HTTP server and state files).
- /.dockerignore: evaluated with Docker's rules (last matching pattern wins, a pattern matching a parent
  directory matches its files) over the repository's files.
- uv.lock: the closure of ``.[edge]`` holds none of the training stack, and on linux/arm64 (and x86_64)
  every package of it has a wheel for CPython 3.11 and glibc <= 2.36 (Raspberry Pi OS bookworm), since
  the slim image has no compiler.
"""

from __future__ import annotations

import http.server
import json
import os
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = ("cryptoml-live.service", "cryptoml-serve.service")
MiB = 1024 * 1024

# Distributions that must never reach the edge (the issue names the first four; the rest is the training stack).
TRAINING_STACK = frozenset(
    {
        "tensorflow",
        "tensorflow-cpu",
        "pandas",
        "mlflow",
        "mlflow-skinny",
        "prefect",
        "keras",
        "dvc",
        "great-expectations",
        "scikit-learn",
        "pyarrow",
        "lightgbm",
        "xgboost",
        "xgboost-cpu",
        "tf2onnx",
        "onnx",
        "onnxmltools",
        "skl2onnx",
        "torch",
    }
)
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|PASSPHRASE|CREDENTIAL", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- systemd units


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [value, ...]}}`` in file order; backslash continuations joined, comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any [section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= missing"
    return values[-1]  # systemd: the last assignment wins for single-valued settings


def size_bytes(value: str) -> int:
    """systemd's memory sizes: ``200M`` = 200 MiB (base 1024)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)", value)
    assert m, f"not a size: {value!r}"
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit or "s"]
    return total


@pytest.fixture(params=UNITS)
def unit(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict[str, list[str]]]]:
    return request.param, parse_unit(DEPLOY / request.param)


def test_unit_runs_the_edge_command_as_a_dedicated_user(unit: tuple[str, dict[str, dict[str, list[str]]]]) -> None:
    name, u = unit
    assert one(u, "Service", "User") == "cryptoml"
    assert one(u, "Service", "Group") == "cryptoml"
    assert Path(one(u, "Service", "WorkingDirectory")).is_absolute()
    argv = one(u, "Service", "ExecStart").split()
    assert argv[0] == "/opt/cryptoml/.venv/bin/cryptoml"
    assert argv[1] == name.removeprefix("cryptoml-").removesuffix(".service")
    assert "--params" in argv and argv[argv.index("--params") + 1] == "/etc/cryptoml/params.yaml"
    assert argv[argv.index("--models") + 1] == "/var/lib/cryptoml/models"
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_unit_restarts_forever_with_a_backoff(unit: tuple[str, dict[str, dict[str, list[str]]]]) -> None:
    _, u = unit
    assert one(u, "Service", "Restart") == "always"
    assert one(u, "Unit", "StartLimitIntervalSec") == "0"  # never give up...
    first_s = seconds(one(u, "Service", "RestartSec"))
    assert first_s >= 1  # ...but never spin
    assert int(one(u, "Service", "RestartSteps")) > 0
    assert seconds(one(u, "Service", "RestartMaxDelaySec")) > first_s


def test_unit_is_hardened_and_bounded(unit: tuple[str, dict[str, dict[str, list[str]]]]) -> None:
    _, u = unit
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "StandardOutput": "journal",
        "StandardError": "journal",
    }
    for key, value in expected.items():
        assert one(u, "Service", key) == value, key
    memory_max = size_bytes(one(u, "Service", "MemoryMax"))
    memory_high = size_bytes(one(u, "Service", "MemoryHigh"))
    # The target is <= 150 MiB RSS: the ceiling sits a bit above it, not at "unlimited".
    assert 150 * MiB < memory_high < memory_max <= 256 * MiB
    assert u["Service"]["SystemCallFilter"][0] == "@system-service"


def test_unit_environment_carries_no_secret(unit: tuple[str, dict[str, dict[str, list[str]]]]) -> None:
    _, u = unit
    for assignment in " ".join(u["Service"].get("Environment", [])).split():
        assert not SECRET_NAME.search(assignment.partition("=")[0]), assignment


def test_live_unit_reads_keys_from_an_optional_root_only_file_and_writes_only_its_state() -> None:
    u = parse_unit(DEPLOY / "cryptoml-live.service")
    assert one(u, "Service", "EnvironmentFile") == "-/etc/cryptoml/env"
    argv = one(u, "Service", "ExecStart").split()
    assert "--paper" in argv and "--live" not in argv  # real orders only through an explicit override
    state = Path(argv[argv.index("--state") + 1])
    writable = [Path(p) for p in " ".join(u["Service"]["ReadWritePaths"]).split()]
    assert writable == [Path("/var/lib/cryptoml")]
    assert any(state.is_relative_to(w) for w in writable), state
    state_dirs = [Path("/var/lib") / d for d in one(u, "Service", "StateDirectory").split()]
    assert state.parent in state_dirs, "systemd must create the state file's folder"
    assert Path(argv[argv.index("--models") + 1]) in state_dirs


def test_serve_unit_gets_no_keys_no_writable_path_and_loopback_only() -> None:
    u = parse_unit(DEPLOY / "cryptoml-serve.service")
    argv = one(u, "Service", "ExecStart").split()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    for key in ("EnvironmentFile", "ReadWritePaths", "StateDirectory"):
        assert key not in u["Service"], key
    assert one(u, "Service", "IPAddressDeny") == "any"
    assert one(u, "Service", "IPAddressAllow") == "localhost"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed here: the unit files are only checked statically")
    return exe


def _systemd_version(exe: str) -> int:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.match(r"systemd (\d+)", out)
    assert m, out
    return int(m.group(1))


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_finds_nothing_but_the_known_gaps(name: str) -> None:
    """`systemd-analyze verify` on the unit; tolerated: the backoff keys on systemd < 254, and the venv
    that does not exist at /opt/cryptoml on this machine. Anything else (typo, bad value) fails."""
    exe = _systemd_analyze()
    path = DEPLOY / name
    proc = subprocess.run([exe, "verify", str(path)], capture_output=True, text=True, timeout=60)
    known = []
    if _systemd_version(exe) < 254:
        known += [re.compile(r"Unknown key '(RestartSteps|RestartMaxDelaySec)' in section \[Service\]")]
    exec_start = one(parse_unit(path), "Service", "ExecStart").split()[0]
    if not Path(exec_start).exists():
        known.append(re.compile(rf"Command {re.escape(exec_start)} is not executable: No such file"))
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    unexpected = [ln for ln in lines if not any(k.search(ln) for k in known)]
    assert not unexpected, "\n".join(lines)
    if not known:
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", UNITS)
def test_systemd_security_exposure_is_low(name: str) -> None:
    exe = _systemd_analyze()
    if "--offline" not in subprocess.run([exe, "--help"], capture_output=True, text=True).stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    # --threshold is on systemd's 0..100 scale: 20 = exposure 2.0 ("OK"); 10.0 is an unconfined service.
    proc = subprocess.run(
        [exe, "security", "--offline=yes", "--threshold=20", str(DEPLOY / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr


# ------------------------------------------------------------------------------------------------- Dockerfile

Instruction = tuple[str, str]  # (INSTRUCTION, its arguments after line joining)


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions as BuildKit's parser reads them (moby/buildkit frontend/dockerfile/parser): a line ending
    in a backslash continues on the next; continuation lines keep their leading whitespace; comment lines and
    empty lines inside a continuation are skipped."""
    out: list[Instruction] = []
    lines = text.splitlines()
    i = 0
    continuation = re.compile(r"\\[ \t]*$")
    while i < len(lines):
        line = lines[i].lstrip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while continuation.search(line) and i < len(lines):
            line = continuation.sub("", line)
            nxt = lines[i]
            i += 1
            while (not nxt.strip() or nxt.lstrip().startswith("#")) and i < len(lines):
                nxt = lines[i]
                i += 1
            line += nxt
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            out.append([])
        assert out, "instruction before FROM"
        out[-1].append(ins)
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return dockerfile_instructions((DEPLOY / "Dockerfile").read_text())


def json_args(args: str) -> list[str]:
    """The exec form. Docker silently falls back to the shell form when this is not valid JSON."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def python_gates(dockerfile: list[Instruction]) -> list[str]:
    """The code of every ``RUN ["python", "-c", CODE]`` (the footprint gates)."""
    out = []
    for word, args in dockerfile:
        if word == "RUN" and args.startswith("["):
            argv = json_args(args)
            if argv[:2] == ["python", "-c"]:
                out.append(argv[2])
    return out


def healthcheck_code(dockerfile: list[Instruction]) -> str:
    (args,) = [a for w, a in dockerfile if w == "HEALTHCHECK"]
    m = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(\[.*\])", args, re.DOTALL)
    assert m, f"HEALTHCHECK must be `[--options] CMD [exec form]`: {args[:80]}"
    argv = json_args(m.group(2))
    assert argv[:2] == ["python", "-c"], argv[:2]
    return argv[2]


def test_dockerfile_every_exec_form_is_valid_json(dockerfile: list[Instruction]) -> None:
    for word, args in dockerfile:
        if word in ("RUN", "CMD", "ENTRYPOINT", "VOLUME", "SHELL") and args.startswith("["):
            json_args(args)
        if word == "HEALTHCHECK":
            healthcheck_code(dockerfile)


def test_dockerfile_is_multistage_on_multiarch_python_slim(dockerfile: list[Instruction]) -> None:
    froms = [args for word, args in dockerfile if word == "FROM"]
    assert len(froms) >= 2
    for args in froms:
        # No --platform: each stage must run on the target arch (the venv it builds holds native wheels).
        assert re.fullmatch(r"python:3\.11-slim AS \w+", args), args
    final = stages(dockerfile)[-1]
    assert any(w == "COPY" and a.startswith("--from=") and "/opt/venv" in a for w, a in final)


def test_dockerfile_installs_the_locked_edge_extra_only(dockerfile: list[Instruction]) -> None:
    runs = [args for word, args in dockerfile if word == "RUN"]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs, "the venv must come from uv.lock (uv sync --frozen)"
    for r in syncs:
        flags = r.split()
        assert "--frozen" in flags and "--no-dev" in flags, r
        extras = [flags[i + 1] for i, f in enumerate(flags) if f == "--extra"]
        assert extras == ["edge"], r
        assert not {"--all-extras", "--dev", "--all-groups", "--group", "--only-dev"} & set(flags), r
    for r in runs:
        for m in re.finditer(r"pip install\s+(.+)", r):
            assert m.group(1).strip() == '"uv==0.13.9"', f"nothing but uv itself is pip-installed: {r}"
    assert not re.search(r"\b(curl|wget)\b", " ".join(runs)), "no curl/wget: the healthcheck uses python"


def test_dockerfile_runtime_is_non_root_with_volumes_healthcheck_and_paper_default(
    dockerfile: list[Instruction],
) -> None:
    final = stages(dockerfile)[-1]
    users = [a for w, a in final if w == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0"), users[-1]
    volumes = [v for w, a in final if w == "VOLUME" for v in json_args(a)]
    assert {"/var/lib/cryptoml/state", "/var/lib/cryptoml/models"} <= set(volumes)
    assert [w for w, _ in final].count("HEALTHCHECK") == 1
    (entrypoint,) = [json_args(a) for w, a in final if w == "ENTRYPOINT"]
    assert entrypoint == ["cryptoml"]  # so `docker run IMAGE serve ...` works
    (cmd,) = [json_args(a) for w, a in final if w == "CMD"]
    assert cmd[0] == "live" and "--paper" in cmd and "--live" not in cmd
    state = Path(cmd[cmd.index("--state") + 1])
    assert any(state.is_relative_to(v) for v in volumes), "the state file must live on a volume"
    assert cmd[cmd.index("--models") + 1] in volumes


def test_dockerfile_holds_no_secret(dockerfile: list[Instruction]) -> None:
    for word, args in dockerfile:
        assert "CRYPTOML_API_KEY" not in args and "CRYPTOML_API_SECRET" not in args, (word, args)
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or args.split()[:1]:
                assert not SECRET_NAME.search(name), (word, args)
        if word in ("COPY", "ADD"):
            assert not re.search(r"(^|[\s/])(\.?env|[^\s]*\.(key|pem|env))(\s|$)", args), (word, args)


def test_dockerfile_import_gate_passes_here(dockerfile: list[Instruction]) -> None:
    """The image's first gate run in this venv: every edge module and the CLI import without the training stack."""
    (code,) = [c for c in python_gates(dockerfile) if "walk_packages" in c]
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_distribution_gate_catches_the_training_stack(dockerfile: list[Instruction]) -> None:
    """The second gate run in this (full, dev) venv must fail and name what it found."""
    from importlib.metadata import distributions

    (code,) = [c for c in python_gates(dockerfile) if "importlib.metadata" in c]
    installed = {canonicalize_name(d.metadata["Name"]) for d in distributions()} & TRAINING_STACK
    if not installed:
        pytest.skip("this venv has no training-stack distribution for the gate to catch")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for name in installed:
        assert f"'{name}'" in proc.stderr, (name, proc.stderr)


# ---- the embedded healthcheck, run for real


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/health" else 404
        body = b'{"status": "ok"}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Health,), {"status": 200}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_healthcheck(code: str, *argv: str, env: dict[str, str] | None = None) -> int:
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    clean["HTTP_PROXY"] = "http://127.0.0.1:9"  # a proxy must be ignored: nothing listens there
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], env=clean | (env or {}), capture_output=True, text=True, timeout=30
    )
    return proc.returncode


def test_healthcheck_serve_mode_asks_health_on_the_given_port(
    dockerfile: list[Instruction], health_server: http.server.ThreadingHTTPServer
) -> None:
    code = healthcheck_code(dockerfile)
    port = str(health_server.server_address[1])
    assert run_healthcheck(code, "/opt/venv/bin/cryptoml", "serve", "--host", "0.0.0.0", "--port", port) == 0
    assert run_healthcheck(code, "cryptoml", "serve", "--port", port) == 0
    health_server.RequestHandlerClass.status = 503  # type: ignore[attr-defined]  # this server's own subclass
    assert run_healthcheck(code, "cryptoml", "serve", "--port", port) == 1
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = str(s.getsockname()[1])
    assert run_healthcheck(code, "cryptoml", "serve", "--port", closed_port) == 1


def test_healthcheck_live_mode_wants_a_recent_state_commit(dockerfile: list[Instruction], tmp_path: Path) -> None:
    code = healthcheck_code(dockerfile)
    state = tmp_path / "live.sqlite"
    argv = ("cryptoml", "live", "--paper", "--state", str(state))
    assert run_healthcheck(code, *argv) == 1  # nothing committed yet
    state.write_bytes(b"")
    assert run_healthcheck(code, *argv) == 0
    hour_ago = time.time() - 3600
    os.utime(state, (hour_ago, hour_ago))
    assert run_healthcheck(code, *argv) == 1
    assert run_healthcheck(code, *argv, env={"CRYPTOML_HEALTH_MAX_AGE_S": "7200"}) == 0
    (tmp_path / "live.sqlite-wal").write_bytes(b"")  # WAL mode: a commit touches the -wal file first
    assert run_healthcheck(code, *argv) == 0


# --------------------------------------------------------------------------------------------- .dockerignore


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (moby/patternmatcher): ``*`` and ``?`` stay within a path segment, ``**``
    spans segments, ``[...]`` is a class."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            cls = pattern[i + 1 : j]
            out, i = out + "[" + ("^" + cls[1:] if cls.startswith(("!", "^")) else cls) + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip().lstrip("/"))
        rules.append((negated, _glob_regex(pattern)))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether a repo-relative file reaches the build context: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, rx in rules:
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negated
    return not excluded


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    return dockerignore_rules((ROOT / ".dockerignore").read_text())


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("pyproject.toml", True),
        ("uv.lock", True),
        ("README.md", True),
        ("params.yaml", True),
        ("cryptoml/edge/api.py", True),
        ("flows/cli.py", True),
        ("tasks/progress.py", True),
        (".git/config", False),
        (".venv/bin/python", False),
        ("data/raw/ohlcv.parquet", False),
        ("mlruns/mlflow.db", False),
        ("models/native/price_lgbm/model.onnx", False),
        ("reports/metrics.json", False),
        ("state/live.sqlite", False),
        (".env", False),
        ("deploy/env", False),
        ("secrets/exchange.key", False),
        ("cryptoml/__pycache__/config.cpython-311.pyc", False),
        ("cryptoml/edge/__pycache__/api.cpython-311.pyc", False),
        ("cryptoml.egg-info/PKG-INFO", False),
        ("tests/test_deploy.py", False),
    ],
)
def test_dockerignore_allowlist(path: str, expected: bool, ignore_rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    assert in_context(path, ignore_rules) is expected


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_else(
    dockerfile: list[Instruction], ignore_rules: list[tuple[bool, re.Pattern[str]]]
) -> None:
    sources = []
    for word, args in dockerfile:
        if word == "COPY" and not args.startswith("--from="):
            sources += args.split()[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert in_context(src, ignore_rules), f"COPY {src}: excluded by .dockerignore"
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: only the representative paths were checked")
    allowed = [s.rstrip("/") for s in sources]
    leaked = [
        p for p in tracked if in_context(p, ignore_rules) and not any(p == a or p.startswith(a + "/") for a in allowed)
    ]
    assert not leaked, leaked


# ---------------------------------------------------------------------------------- uv.lock: the edge closure

PI_GLIBC_MINOR = 36  # Raspberry Pi OS bookworm (Debian 12)


def linux_cp311(machine: str) -> dict[str, str]:
    return {
        "implementation_name": "cpython",
        "implementation_version": "3.11.2",
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": "3.11.2",
        "python_version": "3.11",
        "sys_platform": "linux",
        "extra": "",
    }


@pytest.fixture(scope="module")
def lock() -> dict[str, Any]:
    return tomllib.loads((ROOT / "uv.lock").read_text())


def lock_closure(lock: dict[str, Any], extra: str, env: dict[str, str] | None) -> dict[tuple[str, str], Any]:
    """``{(name, version): package}`` reachable from cryptoml's base dependencies + ``extra``. With ``env``
    None every marker counts as true (the union over all platforms)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for pkg in lock["package"]:
        by_name.setdefault(pkg["name"], []).append(pkg)
    (root,) = by_name["cryptoml"]
    todo = [*root.get("dependencies", []), *root["optional-dependencies"][extra]]
    seen: dict[tuple[str, str], Any] = {}
    seen_extras: set[tuple[str, str, str]] = set()
    while todo:
        dep = todo.pop()
        if env is not None and "marker" in dep and not Marker(dep["marker"]).evaluate(env):
            continue
        candidates = [p for p in by_name[dep["name"]] if dep.get("version", p["version"]) == p["version"]]
        assert len(candidates) == 1, dep
        pkg = candidates[0]
        key = (pkg["name"], pkg["version"])
        if key not in seen:
            seen[key] = pkg
            todo += pkg.get("dependencies", [])
        for e in dep.get("extra", []):
            if (*key, e) not in seen_extras:
                seen_extras.add((*key, e))
                todo += pkg.get("optional-dependencies", {}).get(e, [])
    return seen


def test_lock_is_in_step_with_pyproject(lock: dict[str, Any]) -> None:
    (root,) = [p for p in lock["package"] if p["name"] == "cryptoml"]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["edge"]
    declared_names = {canonicalize_name(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in declared}
    assert {d["name"] for d in root["optional-dependencies"]["edge"]} == declared_names


def test_edge_closure_holds_no_training_stack(lock: dict[str, Any]) -> None:
    edge = {name for name, _ in lock_closure(lock, "edge", env=None)}  # every platform at once
    assert {"numpy", "onnxruntime", "ccxt", "fastapi", "uvicorn", "pyyaml", "typer"} <= edge
    assert not edge & TRAINING_STACK, sorted(edge & TRAINING_STACK)
    # The same walk over the pipeline extra does find them (the check above can fail).
    pipeline = {name for name, _ in lock_closure(lock, "pipeline", env=None)}
    assert {"pandas", "mlflow", "prefect", "tensorflow-cpu"} <= pipeline


def _supported_tags(machine: str) -> set[Tag]:
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(PI_GLIBC_MINOR, 4, -1)]
    platforms += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
    return set(cpython_tags((3, 11), platforms=platforms)) | set(compatible_tags((3, 11), "cp311", platforms))


@pytest.mark.parametrize("machine", ["aarch64", "x86_64"])
def test_every_edge_package_has_a_wheel_for_linux(lock: dict[str, Any], machine: str) -> None:
    """The slim image and a Pi have no compiler: an sdist-only package would break the install."""
    tags = _supported_tags(machine)
    closure = lock_closure(lock, "edge", env=linux_cp311(machine))
    assert ("onnxruntime", "1.31.1") in closure
    missing = []
    for (name, version), pkg in sorted(closure.items()):
        if name == "cryptoml":
            continue
        wheels = [w["url"].rsplit("/", 1)[-1] for w in pkg.get("wheels", [])]
        if not any(parse_wheel_filename(w)[3] & tags for w in wheels):
            missing.append(f"{name}=={version}")
    assert not missing, f"no CPython 3.11 linux/{machine} wheel (glibc <= 2.{PI_GLIBC_MINOR}): {missing}"


# -------------------------------------------------------------------------------------------------- README


def test_readme_covers_the_paths_the_files_use() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "cryptoml-live.service",
        "cryptoml-serve.service",
        "/etc/cryptoml/env",
        "0600",
        "/opt/cryptoml",
        "/var/lib/cryptoml/models",
        "/var/lib/cryptoml/state/live.sqlite",
        'pip install ".[edge]"',
        "--registry-url",
        "journalctl -u cryptoml-live",
        "docker buildx build --platform linux/arm64",
        "kill switch",
    ):
        assert needle in text, needle
