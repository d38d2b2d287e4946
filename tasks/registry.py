"""MLflow model registry: register ONNX bundles as `challenger`, promote to `champion` on the same holdout.

One registered model per model (``opportunity_profit``, ``price_lgbm``...: the bundle's ``meta["name"]``).
Each version's run holds ``bundle/model.onnx`` + ``bundle/model_meta.json`` (exactly the files the edge
runner downloads), ``holdout/holdout.npz`` (the rows the model was tested on) and the ONNX model logged
through ``mlflow.onnx`` for the MLflow UI. Version tags record the holdout metric and value, the bundle's
sha256, its feature list, run id, data hash and training window.

A promotion scores the candidate and the current champion on the candidate's holdout with its metric
(the direction comes from :data:`cryptoml.models.holdout.HOLDOUT_METRICS`) and moves ``champion`` only
when the candidate is better by more than the margin. Consumers follow the aliases, never version
numbers: moving ``champion`` in the MLflow UI is an equally valid promotion, and nothing here assumes
the champion was set by :func:`promote`. With :mod:`tasks.tracking`, the only module importing mlflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cryptoml.errors import ConfigError, CryptoMLError, ModelContractError, TemporaryError
from cryptoml.export.bundle import META_FILE, MODEL_FILE, Bundle, load_bundle
from cryptoml.models.holdout import (
    HOLDOUT_FILE,
    HOLDOUT_METRICS,
    Holdout,
    applicable_metrics,
    load_holdout,
    score_bundle,
)
from tasks import tracking

CHAMPION = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "registry"
BUNDLE_ARTIFACT = "bundle"
HOLDOUT_ARTIFACT = f"holdout/{HOLDOUT_FILE}"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RegisterResult:
    """Outcome of :func:`register_bundle`: the version holding the bundle, and whether this call made it."""

    name: str
    version: str
    created: bool  # False: the newest version already held this exact model.onnx
    promoted_first: bool  # the model had no champion, so this version became it
    holdout_value: float  # the bundle's metric on its own holdout
    metric: str


@dataclass(frozen=True)
class Decision:
    """Outcome of :func:`promote`. ``status``: promoted | forced | first | refused | already_champion."""

    name: str
    version: str
    status: str
    reason: str
    metric: str
    higher_is_better: bool
    challenger_value: float
    champion_value: float | None
    champion_version: str | None  # the champion before the decision
    margin: float
    holdout_rows: int

    @property
    def promoted(self) -> bool:
        return self.status in ("promoted", "forced", "first")


@dataclass(frozen=True)
class CompareRow:
    """One line of :func:`compare`: a field and its value for each version; ``better`` is 1, 2, 0 (tie) or None."""

    field: str
    first: Any
    second: Any
    better: int | None = None


# --- MLflow access --------------------------------------------------------------------------------


def _client() -> Any:
    return tracking._mlflow().MlflowClient()


@contextlib.contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    """Translate MlflowException: unknown model / version -> ConfigError, unreachable server -> TemporaryError."""
    try:
        yield
    except CryptoMLError:
        raise
    except Exception as e:
        from mlflow.exceptions import MlflowException

        if not isinstance(e, MlflowException):
            raise
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"{what}: {e.message}") from e
        text = str(e)
        if any(s in text for s in ("Max retries exceeded", "Connection refused", "ConnectionError", "timed out")):
            raise TemporaryError(f"{what}: the MLflow tracking server {tracking.tracking_uri()} is unreachable") from e
        raise


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def _versions(client: Any, name: str) -> list[Any]:
    """Every version of ``name``, newest first (none for an unknown name)."""
    with _mlflow_errors(f"versions of {name}"):
        found = list(client.search_model_versions(f"name = '{name}'"))
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


def _aliases(client: Any, name: str) -> dict[str, str]:
    """alias -> version of the registered model ``name``; ConfigError when it is not registered."""
    with _mlflow_errors(f"registered model {name}"):
        return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def aliases(name: str) -> dict[str, str]:
    """alias -> version of the registered model ``name`` (ConfigError when it is not registered)."""
    return _aliases(_client(), name)


def _version(client: Any, name: str, version: str) -> Any:
    with _mlflow_errors(f"{name} version {version}"):
        return client.get_model_version(name, str(version))


def _set_tags(client: Any, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _iso(ms: int | float | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- registering --------------------------------------------------------------------------------


def _version_tags(bundle: Bundle, holdout: Holdout, value: float, run_id: str) -> dict[str, str]:
    meta = bundle.meta
    data_hash = meta["data_hash"]
    window = meta["training_window"]
    return {
        "holdout_metric": holdout.metric,
        "holdout_value": repr(float(value)),
        "higher_is_better": str(holdout.higher_is_better).lower(),
        "holdout_label": holdout.label,
        "holdout_rows": str(len(holdout.y)),
        "bundle_sha256": meta["onnx_sha256"],
        "bundle_run_id": run_id,
        "model_kind": bundle.kind,
        "feature_names": json.dumps(list(bundle.feature_names)),
        "data_md5": str(data_hash.get("md5", "")),
        "data_hash": json.dumps(data_hash, sort_keys=True),
        "training_start_ms": str(window["start_ms"]),
        "training_end_ms": str(window["end_ms"]),
        "git_commit": str(meta["git_commit"]),
    }


def _log_version(bundle: Bundle, holdout: Holdout, holdout_path: Path, value: float) -> str:
    """Log one run with the bundle, the holdout and the ONNX model, and register it as a new version of
    the bundle's name with its tags; returns the version."""
    import onnx
    import onnxruntime as ort
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    mlflow = tracking._mlflow()
    tracking.set_experiment(EXPERIMENT)
    name, meta = bundle.name, bundle.meta
    shape = (-1, *(d if d is not None else -1 for d in meta["input_shape"][1:]))
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), shape, meta["input_name"])]))
    run_tags = {"model_name": name, "git_commit": str(meta["git_commit"]), "bundle_sha256": meta["onnx_sha256"]}
    with mlflow.start_run(run_name=f"register-{name}", tags=run_tags) as run, tempfile.TemporaryDirectory() as tmp:
        info = mlflow.onnx.log_model(
            onnx.load_from_string((bundle.path / MODEL_FILE).read_bytes()),
            name="model",
            signature=signature,
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,  # one self-contained file, like the bundle's
            # Stated, not inferred: inference runs `uv export` / pip in this project and costs seconds.
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"],
        )
        # Only the two bundle files: a folder may hold other things (plots, the holdout itself).
        for file in (MODEL_FILE, META_FILE):
            mlflow.log_artifact(str(bundle.path / file), artifact_path=BUNDLE_ARTIFACT)
        holdout_copy = Path(tmp) / HOLDOUT_FILE  # the artifact name is fixed whatever the local file's name
        shutil.copyfile(holdout_path, holdout_copy)
        mlflow.log_artifact(str(holdout_copy), artifact_path=HOLDOUT_ARTIFACT.rsplit("/", 1)[0])
        mlflow.log_metric(f"holdout.{holdout.metric}", float(value))
        train_metrics = {f"train.{k}": v for k, v in tracking.numeric_metrics(meta["metrics"]).items()}
        if train_metrics:
            mlflow.log_metrics(train_metrics)
        tags = _version_tags(bundle, holdout, value, str(run.info.run_id))
        # Tags go with the version's creation (one request) rather than one request each afterwards.
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    return str(mv.version)


def register_bundle(bundle_dir: Path, holdout_path: Path, *, promote_first: bool) -> RegisterResult:
    """Register the bundle folder ``bundle_dir`` as a new version of ``meta["name"]``, alias it `challenger`.

    The bundle is loaded and verified first (a corrupt one raises ModelContractError and nothing is
    registered), then scored on ``holdout_path`` (see :func:`cryptoml.models.holdout.save_holdout`) with
    the holdout's metric. Idempotent: when the newest version already carries this ``model.onnx``'s
    sha256, that version is returned with ``created=False`` and nothing is logged. ``promote_first``:
    a model without a `champion` gets this version as champion (tag ``promotion=first``).
    """
    bundle = load_bundle(Path(bundle_dir))
    holdout = load_holdout(Path(holdout_path))
    name = _check_name(bundle.name)
    value = score_bundle(bundle, holdout)
    client = _client()
    versions = _versions(client, name)
    if versions and versions[0].tags.get("bundle_sha256") == bundle.meta["onnx_sha256"]:
        version, created = str(versions[0].version), False
    else:
        version = _log_version(bundle, holdout, Path(holdout_path), value)
        client.set_registered_model_alias(name, CHALLENGER, version)
        created = True
    promoted_first = False
    if promote_first and CHAMPION not in _aliases(client, name):
        client.set_registered_model_alias(name, CHAMPION, version)
        _set_tags(client, name, version, {"promotion": "first", "promotion_detail": "first version of the model"})
        promoted_first = True
    return RegisterResult(name, version, created, promoted_first, value, holdout.metric)


# --- reading versions back -----------------------------------------------------------------------


def _run_id(mv: Any, name: str) -> str:
    run_id = mv.tags.get("bundle_run_id") or mv.run_id
    if not run_id:
        raise ModelContractError(
            f"{name} v{mv.version} has no bundle_run_id tag nor run: it was not registered by cryptoml"
        )
    return str(run_id)


def _download(run_id: str, artifact: str, dst: Path, what: str) -> Path:
    mlflow = tracking._mlflow()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with _mlflow_errors(what):
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst)))
    except ConfigError as e:
        raise ModelContractError(f"{what}: artifact {artifact} not found in run {run_id}") from e
    except OSError as e:
        raise ModelContractError(f"{what}: cannot download {artifact} of run {run_id}: {e}") from e
    except Exception as e:
        from mlflow.exceptions import MlflowException

        # A missing file answers 404 through the artifact proxy (an HTTPError, or an MlflowException).
        if isinstance(e, MlflowException) or type(e).__name__ == "HTTPError":
            raise ModelContractError(f"{what}: artifact {artifact} not found in run {run_id} ({e})") from e
        raise


def verified_bundle(client: Any, name: str, version: str, dst: Path) -> Bundle:
    """Download version ``version`` of ``name``'s bundle into ``dst`` and verify it.

    ModelContractError when the files are missing or corrupt (checksum vs meta), when ``model.onnx``
    differs from the one registered (tag ``bundle_sha256``), or when its feature list differs from the
    version's ``feature_names`` tag.
    """
    mv = _version(client, name, version)
    where = f"{name} v{version}"
    tags = mv.tags
    if "bundle_sha256" not in tags or "feature_names" not in tags:
        raise ModelContractError(
            f"{where} has no bundle_sha256 / feature_names tags: it was not registered by cryptoml "
            "(register it with register_bundle)"
        )
    local = _download(_run_id(mv, name), BUNDLE_ARTIFACT, dst, where)
    try:
        expected = json.loads(tags["feature_names"])
    except json.JSONDecodeError as e:
        raise ModelContractError(f"{where}: its feature_names tag is not JSON ({e})") from e
    try:
        bundle = load_bundle(local, expected_features=expected)
    except ModelContractError as e:
        raise ModelContractError(f"{where}: the registered bundle is unusable: {e}") from e
    if bundle.meta["onnx_sha256"] != tags["bundle_sha256"]:
        raise ModelContractError(
            f"{where}: the bundle was replaced after registration (model.onnx sha256 "
            f"{bundle.meta['onnx_sha256'][:12]}... but the version records {tags['bundle_sha256'][:12]}...)"
        )
    if bundle.name != name:
        raise ModelContractError(f"{where}: the bundle is named {bundle.name!r}, not {name!r}")
    return bundle


def version_holdout(client: Any, name: str, version: str, dst: Path) -> Holdout:
    """The holdout registered with version ``version`` of ``name`` (downloaded into ``dst``)."""
    mv = _version(client, name, version)
    local = _download(_run_id(mv, name), HOLDOUT_ARTIFACT, dst, f"{name} v{version} holdout")
    return load_holdout(local)


def fetch_bundle(name: str, alias_or_version: str, dst: Path) -> Bundle:
    """Download and verify the bundle of ``name`` at an alias (``champion``) or a version number into ``dst``."""
    client = _client()
    _check_name(name)
    version = alias_or_version
    if not alias_or_version.isdigit():
        aliases = _aliases(client, name)
        if alias_or_version not in aliases:
            raise ConfigError(f"{name} has no alias {alias_or_version!r} (aliases: {aliases})")
        version = aliases[alias_or_version]
    return verified_bundle(client, name, version, Path(dst))


# --- promotion -------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _against_champion(
    client: Any, name: str, version: str, champion_version: str, holdout: Holdout, value: float, tmp: Path, force: bool
) -> tuple[float | None, float, str]:
    """(champion's score, candidate's gain over it, explanation), both scored on the candidate's holdout.

    A champion that cannot be verified or scored there is a ModelContractError, unless ``force``: then
    its score is None and the gain NaN.
    """
    try:
        champion = verified_bundle(client, name, champion_version, tmp / "champion")
        champion_value = score_bundle(champion, holdout)
    except ModelContractError as e:
        if not force:
            raise ModelContractError(
                f"{name}: the champion v{champion_version} cannot be scored on v{version}'s holdout: {e} "
                "(fix it, or promote with --force --reason)"
            ) from e
        return None, math.nan, f"champion v{champion_version} not scorable: {e}"
    higher = holdout.higher_is_better
    gain = (value - champion_value) if higher else (champion_value - value)
    why = (
        f"{holdout.metric} ({'higher' if higher else 'lower'} is better) on v{version}'s holdout "
        f"({len(holdout.y)} rows): v{version} {_fmt(value)} vs champion v{champion_version} {_fmt(champion_value)}, "
        f"gain {_fmt(gain)}"
    )
    return champion_value, gain, why


def promote(
    name: str,
    version: str | None = None,
    *,
    margin: float,
    force: bool = False,
    reason: str | None = None,
) -> Decision:
    """Move `champion` of ``name`` to ``version`` (default: the `challenger`) if it beats the champion.

    Both bundles are downloaded and verified, then scored on the candidate's holdout with the holdout's
    metric; the candidate is promoted when better by more than ``margin`` (in the metric's units; lower
    is better for errors). With no champion yet the candidate is promoted (``status="first"``). ``force``
    promotes anyway and needs a ``reason`` (ConfigError otherwise), recorded in tags ``promotion=forced``
    and ``promotion_reason``. A refusal records tag ``promotion_refused`` with the numbers and returns
    ``status="refused"`` (not an error). ModelContractError: the candidate's bundle is corrupt, replaced
    or feature-mismatched, or the champion cannot be scored on the candidate's holdout (without ``force``).
    """
    if force and not (reason and reason.strip()):
        raise ConfigError("--force needs --reason saying why the holdout comparison is overridden")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ConfigError(f"margin must be a finite number >= 0, got {margin}")
    _check_name(name)
    client = _client()
    aliases = _aliases(client, name)  # read now: whoever moved them (UI, API, this code) is obeyed
    if version is None:
        if CHALLENGER not in aliases:
            raise ConfigError(f"{name} has no {CHALLENGER!r} alias: pass --version")
        version = aliases[CHALLENGER]
    version = str(version)
    champion_version = aliases.get(CHAMPION)
    with tempfile.TemporaryDirectory(prefix="cryptoml-promote-") as tmp:
        candidate = verified_bundle(client, name, version, Path(tmp) / "candidate")
        holdout = version_holdout(client, name, version, Path(tmp) / "holdout")
        value = score_bundle(candidate, holdout)
        if champion_version == version:
            status, why, champion_value = "already_champion", f"v{version} is already the champion", value
        elif champion_version is None:
            status, why, champion_value = "first", f"no champion yet; {holdout.metric} {_fmt(value)}", None
        else:
            champion_value, gain, why = _against_champion(
                client, name, version, champion_version, holdout, value, Path(tmp), force
            )
            better = math.isfinite(gain) and gain > margin
            why += f" {'>' if better else '<='} margin {margin:g}" if math.isfinite(gain) else " (cannot win)"
            status = "promoted" if better else "forced" if force else "refused"
    if status == "refused":
        _set_tags(client, name, version, {"promotion_refused": why})
    elif status != "already_champion":
        client.set_registered_model_alias(name, CHAMPION, version)
        tags = {"promotion": "metric" if status == "promoted" else status, "promotion_detail": why}
        if status == "forced":
            tags["promotion_reason"] = str(reason)
        _set_tags(client, name, version, tags)
        if "promotion_refused" in _version(client, name, version).tags:  # a stale refusal would read as current
            client.delete_model_version_tag(name, version, "promotion_refused")
    return Decision(
        name=name,
        version=version,
        status=status,
        reason=why,
        metric=holdout.metric,
        higher_is_better=holdout.higher_is_better,
        challenger_value=value,
        champion_value=champion_value,
        champion_version=champion_version,
        margin=margin,
        holdout_rows=len(holdout.y),
    )


# --- decisions taken on other evidence (the shadow review of tasks/retrain.py) ----------------------


def version_tags(name: str, version: str) -> dict[str, str]:
    """The tags of version ``version`` of ``name`` (ConfigError when either is unknown)."""
    _check_name(name)
    return dict(_version(_client(), name, str(version)).tags)


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    """Set (overwrite) tags on version ``version`` of ``name``: how decisions are recorded for the MLflow UI."""
    _check_name(name)
    client = _client()
    _version(client, name, str(version))  # an unknown version is a ConfigError, not a half-written record
    with _mlflow_errors(f"tagging {name} v{version}"):
        _set_tags(client, name, str(version), tags)


def move_champion(name: str, version: str, *, expected_champion: str | None, tags: dict[str, str]) -> bool:
    """Point `champion` of ``name`` at ``version`` and record ``tags`` there, unless the alias moved meanwhile.

    For promotions decided outside :func:`promote` (e.g. on shadow predictions): the caller compared
    ``version`` with ``expected_champion``; when `champion` no longer points there (a person moved it in the
    UI during the comparison), nothing changes and False is returned, since the comparison is stale. A stale
    ``promotion_refused`` tag on ``version`` is removed, as :func:`promote` does.
    """
    _check_name(name)
    version = str(version)
    client = _client()
    _version(client, name, version)
    if _aliases(client, name).get(CHAMPION) != expected_champion:
        return False
    with _mlflow_errors(f"moving {CHAMPION} of {name} to v{version}"):
        client.set_registered_model_alias(name, CHAMPION, version)
        _set_tags(client, name, version, tags)
        if "promotion_refused" in _version(client, name, version).tags:
            client.delete_model_version_tag(name, version, "promotion_refused")
    return True


# --- comparison ------------------------------------------------------------------------------------


def _better(a: Any, b: Any, higher: bool) -> int | None:
    if not (isinstance(a, float) and isinstance(b, float)) or not (math.isfinite(a) and math.isfinite(b)):
        return None
    if a == b:
        return 0
    return 1 if (a > b) == higher else 2


def _promotion_state(mv: Any) -> str:
    if "promotion" in mv.tags:
        return str(mv.tags["promotion"])
    return "refused" if "promotion_refused" in mv.tags else ""


def compare(name: str, v1: str, v2: str, on: str | None = None) -> list[CompareRow]:
    """Versions ``v1`` and ``v2`` of ``name`` side by side, both scored on one holdout (default: the newer
    version's): every metric applicable to the prediction type, then aliases, creation time, training
    window, data hash, git commit and promotion tags."""
    _check_name(name)
    v1, v2 = str(v1), str(v2)
    on = str(on) if on is not None else str(max(int(v1), int(v2)) if v1.isdigit() and v2.isdigit() else v2)
    client = _client()
    aliases = _aliases(client, name)
    mvs = [_version(client, name, v) for v in (v1, v2)]
    with tempfile.TemporaryDirectory(prefix="cryptoml-compare-") as tmp:
        bundles = [verified_bundle(client, name, v, Path(tmp) / f"v{v}") for v in (v1, v2)]
        holdout = version_holdout(client, name, on, Path(tmp) / "holdout")
        pred_type = bundles[0].meta["prediction"]["type"]
        rows = [
            CompareRow("version", v1, v2),
            CompareRow(
                "aliases",
                ", ".join(sorted(a for a, v in aliases.items() if v == v1)) or "-",
                ", ".join(sorted(a for a, v in aliases.items() if v == v2)) or "-",
            ),
            CompareRow("holdout", f"v{on}: {holdout.label}, {len(holdout.y)} rows", ""),
        ]
        for metric in applicable_metrics(pred_type, holdout.metric):
            higher = HOLDOUT_METRICS[metric][1]
            a, b = (score_bundle(bundle, holdout, metric) for bundle in bundles)
            label = f"{metric} ({'higher' if higher else 'lower'} is better)"
            rows.append(CompareRow(label, a, b, _better(a, b, higher)))
    for field, get in (
        (
            "registered holdout value",
            lambda mv: f"{mv.tags.get('holdout_metric', '?')} {mv.tags.get('holdout_value', '')}",
        ),
        ("created", lambda mv: _iso(mv.creation_timestamp)),
        ("kind", lambda mv: mv.tags.get("model_kind", "")),
        ("features", lambda mv: str(len(json.loads(mv.tags.get("feature_names", "[]"))))),
        (
            "training window",
            lambda mv: (
                f"{_iso(int(mv.tags['training_start_ms']))} -> {_iso(int(mv.tags['training_end_ms']))}"
                if "training_start_ms" in mv.tags
                else ""
            ),
        ),
        ("data md5", lambda mv: mv.tags.get("data_md5", "")),
        ("git commit", lambda mv: mv.tags.get("git_commit", "")[:12]),
        ("bundle sha256", lambda mv: mv.tags.get("bundle_sha256", "")[:12]),
        ("promotion", _promotion_state),
    ):
        rows.append(CompareRow(field, get(mvs[0]), get(mvs[1])))
    return rows
