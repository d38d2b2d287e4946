"""Where a model's data and code came from: data hashes from ``dvc.lock`` and the git commit.

Reads files only (no dvc or git library): the hash of a DVC output as recorded in ``dvc.lock`` when
the path is a tracked output, else an md5 computed here over the file or folder (sorted walk), so a
run outside DVC still records a stable fingerprint.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import yaml


def _md5_path(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(str(f.relative_to(path.parent)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def dvc_lock_hash(path: str | Path, lock_file: str | Path = "dvc.lock") -> str | None:
    """The md5 ``dvc.lock`` records for output ``path`` (relative to the lock's folder), or None."""
    lock = Path(lock_file)
    if not lock.is_file():
        return None
    data: dict[str, Any] = yaml.safe_load(lock.read_text()) or {}
    wanted = Path(path).as_posix().rstrip("/")
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs", []) or []:
            if str(out.get("path", "")).rstrip("/") == wanted:
                return str(out.get("md5") or out.get("hash") or "") or None
    return None


def data_hash(path: str | Path, lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """``{"path", "md5", "origin"}`` for a data input: from dvc.lock when tracked, else computed."""
    p = Path(path)
    recorded = dvc_lock_hash(p, lock_file)
    if recorded:
        return {"path": p.as_posix(), "md5": recorded, "origin": "dvc.lock"}
    if not p.exists():
        return {"path": p.as_posix(), "md5": "", "origin": "missing"}
    return {"path": p.as_posix(), "md5": _md5_path(p), "origin": "computed"}


def git_commit(cwd: str | Path = ".") -> str:
    """The current commit SHA (with ``-dirty`` when tracked files other than dvc.lock changed), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        # dvc.lock is rewritten by `dvc repro` itself while the stages run: it does not make the code dirty.
        # Pathspecs from the repository's top, so a run from a sub-folder (the retrain's) still sees every file.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)dvc.lock"],
            cwd=cwd, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
