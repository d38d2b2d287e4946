"""The one-way import rule (flows -> tasks -> cryptoml) and the pure library's independence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout


def test_cli_help_imports_no_heavy_stack() -> None:
    """`cryptoml --help` must not pay for prefect, pandas, mlflow or tensorflow."""
    code = (
        "import sys, runpy; sys.argv=['cryptoml','--help']\n"
        "try:\n    runpy.run_module('flows.cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy=[m for m in ('prefect','pandas','mlflow','tensorflow') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
