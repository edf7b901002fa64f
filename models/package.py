"""The model package a bank scores with: weights, ONNX graph, feature spec, threshold, checksummed.

A package is a directory::

    manifest.json         format, versions (package, features, consortium, entity table), model shape,
                          and the SHA-256 and size of every other file
    weights.npz           state_dict arrays by name (no pickle)
    model.onnx            raw features -> standardization -> network -> logit (models.onnx_export)
    feature_spec.json     names, order, consortium standardization, label delay (models.spec)
    threshold.json        decision threshold for the target false-positive rate (models.threshold)
    training_config.json  the resolved training settings (the consortium key redacted)
    metrics.json          what the model reached on the test window
    entity_table.npy      the published consortium entity table (consortium features only)
    entity_release.json   its public release: shape, days, delay, noise, the key's fingerprint (not the key)

`export_package` writes into a temporary sibling directory and renames it into place. `load_package`
refuses a missing or unlisted-as-required file, a checksum mismatch, an unknown package format, and a
feature or consortium version this code does not compute, with a `PackageError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.feature_names import CONSORTIUM_VERSION
from models.nets import build_model, set_weights
from models.onnx_export import onnx_input_width, to_onnx
from models.package_contents import (
    TABLE_VERSION,
    EntityTable,
    ModelPackage,
    PackageError,
    check_feature_contract,
    key_fingerprint,
)
from models.spec import FeatureSpec
from models.threshold import Threshold

__all__ = [
    "PACKAGE_FORMAT",
    "TABLE_VERSION",
    "EntityTable",
    "ModelPackage",
    "PackageError",
    "check_feature_contract",
    "export_package",
    "key_fingerprint",
    "load_package",
    "verify_package",
]

logger = logging.getLogger(__name__)

PACKAGE_FORMAT = "fedfraud.model-package/1"
MANIFEST = "manifest.json"
WEIGHTS, ONNX, SPEC, THRESHOLD = "weights.npz", "model.onnx", "feature_spec.json", "threshold.json"
CONFIG, METRICS = "training_config.json", "metrics.json"
ENTITY_TABLE, ENTITY_RELEASE = "entity_table.npy", "entity_release.json"
REQUIRED = (WEIGHTS, ONNX, SPEC, THRESHOLD, CONFIG, METRICS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null, numpy scalars and arrays plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(_jsonable(payload), indent=2, allow_nan=False, sort_keys=True) + "\n").encode()


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    """The training config without the consortium key."""
    return {k: ("<redacted>" if k == "entity-key" and v else v) for k, v in config.items()}


def _payload(package: ModelPackage) -> dict[str, bytes]:
    """Every file of the package (but the manifest) as bytes."""
    model = package.build_model()
    weights = io.BytesIO()
    np.savez(weights, **{name: t.detach().numpy() for name, t in model.state_dict().items()})
    files = {
        WEIGHTS: weights.getvalue(),
        ONNX: to_onnx(model, package.spec, metadata=package._onnx_metadata()),
        SPEC: (package.spec.to_json() + "\n").encode(),
        THRESHOLD: _json_bytes(package.threshold.to_dict()),
        CONFIG: _json_bytes(_redacted(package.config)),
        METRICS: _json_bytes(package.metrics),
    }
    if package.entity is not None:
        table = io.BytesIO()
        np.save(table, np.ascontiguousarray(package.entity.table, dtype=np.float64), allow_pickle=False)
        files[ENTITY_TABLE] = table.getvalue()
        files[ENTITY_RELEASE] = _json_bytes(
            {**package.entity.release, "table_version": package.entity.version}
        )
    return files


def _manifest(package: ModelPackage, files: dict[str, bytes]) -> dict[str, Any]:
    return {
        "format": PACKAGE_FORMAT,
        "method": package.method,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "kind": package.model_kind,
            "hidden_sizes": list(package.hidden_sizes),
            "n_features": len(package.spec.names),
        },
        "versions": {
            "package": PACKAGE_FORMAT,
            "features": package.spec.version,
            "consortium": CONSORTIUM_VERSION if package.entity is not None else None,
            "entity_table": package.entity.version if package.entity is not None else None,
        },
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in sorted(files.items())
        },
    }


def export_package(package: ModelPackage, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the package directory atomically (temporary sibling, then rename); return its path."""
    target = Path(out).resolve()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target}: already exists and is not empty (pass overwrite to replace it)")
    check_feature_contract(package.spec, has_entity=package.entity is not None, path=target)
    files = _payload(package)
    files[MANIFEST] = _json_bytes(_manifest(package, files))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("model package (%s, %d files) written to %s", package.method or "model", len(files), target)
    return target


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not readable JSON ({exc})", path=path) from None


def verify_package(directory: str | Path) -> dict[str, Any]:
    """Check the manifest's format and every listed file's presence and SHA-256; return the manifest."""
    root = Path(directory)
    if not (root / MANIFEST).is_file():
        raise PackageError(f"{root}: not a model package (no {MANIFEST})", path=root)
    manifest = _read_json(root / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise PackageError(
            f"{root / MANIFEST}: package format {found!r} is not {PACKAGE_FORMAT!r} (export it again "
            "with this fedfraud version)",
            path=root / MANIFEST,
        )
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise PackageError(f"{root / MANIFEST}: has no 'files' table", path=root / MANIFEST)
    for name in (
        *REQUIRED,
        *(ENTITY_TABLE, ENTITY_RELEASE)[: 2 if ENTITY_TABLE in listed or ENTITY_RELEASE in listed else 0],
    ):
        if name not in listed:
            raise PackageError(f"{root / MANIFEST}: does not list required file {name}", path=root / MANIFEST)
        file = root / name
        if not file.is_file():
            raise PackageError(f"{file}: missing from the model package", path=file)
        expected = str(listed[name].get("sha256", "")) if isinstance(listed[name], dict) else ""
        actual = _sha256(file)
        if actual != expected:
            raise PackageError(
                f"{file}: checksum mismatch (SHA-256 {actual[:16]}..., manifest says {expected[:16]}...): "
                "the package was modified or damaged",
                path=file,
            )
    return manifest


def _load_entity(root: Path, manifest: dict[str, Any]) -> EntityTable | None:
    if ENTITY_TABLE not in manifest["files"]:
        return None
    try:
        table = np.load(root / ENTITY_TABLE, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PackageError(f"{root / ENTITY_TABLE}: not a numpy table ({exc})", path=root) from None
    entity = EntityTable(table=table, release=_read_json(root / ENTITY_RELEASE))
    versions = manifest.get("versions", {})
    if versions.get("consortium") != CONSORTIUM_VERSION:
        raise PackageError(
            f"{root / MANIFEST}: consortium version {versions.get('consortium')!r} is not supported "
            f"(this fedfraud computes {CONSORTIUM_VERSION})",
            path=root / MANIFEST,
        )
    recorded = (versions.get("entity_table"), entity.release.get("table_version"))
    if recorded != (entity.version, entity.version):
        raise PackageError(f"{root / ENTITY_TABLE}: entity table version mismatch", path=root / ENTITY_TABLE)
    return entity


def _load_weights(
    root: Path, manifest: dict[str, Any], spec: FeatureSpec
) -> tuple[str, tuple[int, ...], list[np.ndarray]]:
    """The model kind, hidden sizes and weights, checked against the model they must fit."""
    model = manifest.get("model", {})
    kind, hidden = str(model.get("kind")), tuple(int(h) for h in model.get("hidden_sizes", ()))
    try:
        template = build_model(kind, len(spec.names), hidden_sizes=hidden)
        with np.load(root / WEIGHTS, allow_pickle=False) as npz:
            weights = [npz[name] for name in template.state_dict()]
        set_weights(template, weights)
    except (KeyError, ValueError, OSError) as exc:
        message = f"{root / WEIGHTS}: does not fit the manifest's model {model}: {exc}"
        raise PackageError(message, path=root / WEIGHTS) from None
    return kind, hidden, weights


def load_package(directory: str | Path) -> ModelPackage:
    """Verify and read a package; PackageError names a missing, modified or wrong-version file."""
    root = Path(directory)
    manifest = verify_package(root)
    try:
        spec = FeatureSpec.from_json((root / SPEC).read_text())
        threshold = Threshold.from_dict(_read_json(root / THRESHOLD))
    except ValueError as exc:
        raise PackageError(f"{root}: bad {SPEC} or {THRESHOLD}: {exc}", path=root) from None
    if manifest.get("versions", {}).get("features") != spec.version:
        raise PackageError(
            f"{root / MANIFEST}: feature version {manifest.get('versions', {}).get('features')!r} "
            f"does not match {SPEC} ({spec.version!r})",
            path=root / MANIFEST,
        )
    entity = _load_entity(root, manifest)
    check_feature_contract(spec, has_entity=entity is not None, path=root / SPEC)
    if entity is not None and int(entity.release.get("delay", -1)) != spec.delay_days:
        raise PackageError(f"{root / ENTITY_RELEASE}: label delay differs from {SPEC}", path=root)
    kind, hidden, weights = _load_weights(root, manifest, spec)
    onnx_model = (root / ONNX).read_bytes()
    if onnx_input_width(onnx_model) != len(spec.names):
        raise PackageError(f"{root / ONNX}: input width differs from {SPEC}", path=root / ONNX)
    logger.info("loaded model package %s (%s, %s)", root, manifest.get("method"), spec.version)
    return ModelPackage(
        model_kind=kind,
        hidden_sizes=hidden,
        weights=weights,
        spec=spec,
        threshold=threshold,
        config=_read_json(root / CONFIG),
        metrics=_read_json(root / METRICS),
        entity=entity,
        method=str(manifest.get("method", "")),
        onnx_model=onnx_model,
    )
