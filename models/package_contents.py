"""What a model package holds, in memory: model shape and weights, feature spec, threshold, entity table.

The feature contract (`check_feature_contract`) says which feature versions this code computes: a package
with another version is refused, never scored with features that silently differ from training's.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from models.feature_names import CONSORTIUM_FEATURES, CONSORTIUM_VERSION, FEATURE_VERSION, LOCAL_FEATURES
from models.nets import build_model, set_weights
from models.onnx_export import to_onnx
from models.spec import FeatureSpec
from models.threshold import Threshold

logger = logging.getLogger(__name__)

TABLE_VERSION = "table-v1"


class PackageError(ValueError):
    """A model package that cannot be used: missing file, checksum or version mismatch; names the path."""

    def __init__(self, message: str, *, path: str | Path) -> None:
        super().__init__(message)
        self.path = str(path)


def key_fingerprint(key: bytes) -> str:
    """A short public fingerprint of the consortium key (checks that a bank supplies the right key)."""
    return hashlib.sha256(b"fedfraud-entity-key/1:" + bytes(key)).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class EntityTable:
    """The published consortium entity table (2, days, buckets) and its public release (no key)."""

    table: np.ndarray
    release: dict[str, Any]

    @property
    def version(self) -> str:
        """The table's version: SHA-256 (16 hex) of its float64 bytes."""
        data = np.ascontiguousarray(self.table, dtype=np.float64).tobytes()
        return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class ModelPackage:
    """Everything a bank needs to score: model shape and weights, feature spec, threshold, provenance."""

    model_kind: str
    hidden_sizes: tuple[int, ...]
    weights: list[np.ndarray]
    spec: FeatureSpec
    threshold: Threshold
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    entity: EntityTable | None = None
    method: str = ""
    onnx_model: bytes = b""
    """The exported ONNX graph (read from a loaded package; built from the weights when empty)."""

    def build_model(self) -> nn.Module:
        """The torch module with the package's weights, in eval mode."""
        model = build_model(self.model_kind, len(self.spec.names), hidden_sizes=self.hidden_sizes)
        set_weights(model, self.weights)
        return model.eval()

    def onnx_bytes(self) -> bytes:
        """The ONNX graph: the package's file, or exported now from the weights."""
        return self.onnx_model or to_onnx(self.build_model(), self.spec, metadata=self._onnx_metadata())

    def _onnx_metadata(self) -> dict[str, str]:
        return {"method": self.method, "threshold": repr(self.threshold.value)}


def check_feature_contract(spec: FeatureSpec, *, has_entity: bool, path: str | Path = "") -> None:
    """Refuse a spec whose version or names this code does not compute (PackageError)."""
    base, *extra = spec.version.split("+")
    supported = f"{FEATURE_VERSION}, {FEATURE_VERSION}+{CONSORTIUM_VERSION} and {TABLE_VERSION}"
    if base not in (FEATURE_VERSION, TABLE_VERSION) or extra not in ([], [CONSORTIUM_VERSION]):
        raise PackageError(
            f"{path}: feature version {spec.version!r} is not supported by this fedfraud ({supported})",
            path=path,
        )
    consortium = bool(extra)
    expected: tuple[str, ...] | None = LOCAL_FEATURES if base == FEATURE_VERSION else None
    if expected is not None:
        expected += CONSORTIUM_FEATURES if consortium else ()
        if spec.names != expected:
            diff = next(
                (i for i, (a, b) in enumerate(zip(spec.names, expected, strict=False)) if a != b), None
            )
            where = f"position {diff}: {spec.names[diff]!r} != {expected[diff]!r}" if diff is not None else ""
            raise PackageError(
                f"{path}: feature names do not match version {spec.version!r} "
                f"({len(spec.names)} names, expected {len(expected)}) {where}",
                path=path,
            )
    if consortium != has_entity:
        state = "has no entity table" if consortium else f"has an entity table but no {CONSORTIUM_VERSION}"
        raise PackageError(f"{path}: feature version {spec.version!r} but the package {state}", path=path)
