"""Follow an MLflow registry alias over plain HTTP: which version `champion` points at, and its bundle files.

The edge must not import mlflow, so this speaks the tracking server's REST API with urllib:
``GET /api/2.0/mlflow/registered-models/alias?name=N&alias=A`` gives the model version (its ``run_id`` and
tags; cryptoml's registry tags each version with ``bundle_run_id``), and ``GET /get-artifact?run_uuid=R&
path=bundle/model.onnx`` (served by ``mlflow server`` for proxied and local artifact stores) downloads the
bundle files. Downloads go to a fresh folder that is renamed into place only once both files are there;
the caller then verifies the bundle (checksum, features, parity sample) before using it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptoml.errors import ConfigError, ModelContractError, TemporaryError

BUNDLE_FILES = ("model.onnx", "model_meta.json")


@dataclass(frozen=True)
class AliasTarget:
    name: str
    alias: str
    version: str
    run_id: str  # the run holding the bundle artifacts
    tags: dict[str, str]


class RegistryClient:
    """A read-only client of one MLflow tracking server (``http://host:port``)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"registry url must look like http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, query: dict[str, str]) -> bytes:
        full = f"{self.url}{path}?{urllib.parse.urlencode(query)}"
        try:
            with urllib.request.urlopen(full, timeout=self.timeout_s) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace")[:300]
            if e.code == 404 or "RESOURCE_DOES_NOT_EXIST" in body or "INVALID_PARAMETER_VALUE" in body:
                raise LookupError(body) from e
            raise TemporaryError(f"registry {self.url}: HTTP {e.code} for {path}: {body}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise TemporaryError(f"registry {self.url} unreachable ({e})") from e

    def alias(self, name: str, alias: str) -> AliasTarget | None:
        """The version ``alias`` points at, or None when the model or the alias does not exist."""
        try:
            raw = self._get("/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": alias})
        except LookupError:
            return None
        try:
            mv: dict[str, Any] = json.loads(raw)["model_version"]
            tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
            run_id = tags.get("bundle_run_id") or mv["run_id"]
            return AliasTarget(name, alias, str(mv["version"]), str(run_id), tags)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelContractError(f"registry {self.url}: unexpected answer for {name}@{alias} ({e!r})") from e

    def download_bundle(self, target: AliasTarget, dest_root: Path) -> Path:
        """Download the version's ``bundle/`` files to ``dest_root/<name>-v<version>/`` (atomic); returns it."""
        final = Path(dest_root) / f"{target.name}-v{target.version}"
        if all((final / f).is_file() for f in BUNDLE_FILES):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            for filename in BUNDLE_FILES:
                try:
                    data = self._get("/get-artifact", {"run_uuid": target.run_id, "path": f"bundle/{filename}"})
                except LookupError as e:
                    raise ModelContractError(
                        f"{target.name} v{target.version}: run {target.run_id} has no bundle/{filename}"
                    ) from e
                (tmp / filename).write_bytes(data)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
