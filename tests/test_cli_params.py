"""``--params``: a params file named on the command line must exist (the default may be absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app


@pytest.mark.parametrize("command", ["backtest", "drift-check", "retrain", "summary", "train"])
def test_a_missing_params_file_is_refused_before_anything_runs(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = CliRunner().invoke(app, [command, "--params", str(missing)], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert "no such params file" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written
