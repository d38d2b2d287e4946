"""Atomic writes: the whole new file or the old one, with ordinary file permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cryptoml.atomic import FILE_MODE, atomic_path, atomic_write_text


def test_written_file_gets_the_umask_permissions_not_mkstemps_private_ones(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    out = atomic_write_text("report", tmp_path / "r.json")
    # mkstemp alone would leave 0o600: reports and models would be unreadable to the group (e.g. a service user).
    assert stat.S_IMODE(out.stat().st_mode) == FILE_MODE == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "data.txt"
    atomic_write_text("old", target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]
