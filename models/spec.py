"""The versioned feature spec that ships with a model, and the summable statistics behind it.

Standardization uses consortium-wide statistics: each bank computes `FeatureStats.of(its rows)`, the
vectors are summed (inside SecAgg+ in deployment), and `FeatureSpec.from_stats` turns the sum into
means and standard deviations. No per-bank scaler is ever fitted.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

SPEC_FORMAT = "fedfraud.feature-spec/1"
STD_FLOOR = 1e-6


def _frozen_vector(value: Any, name: str) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Sufficient statistics of a feature matrix (row count, column sums, sums of squares); summable."""

    count: float
    total: np.ndarray
    total_sq: np.ndarray

    def __post_init__(self) -> None:
        count = float(self.count)
        if not (math.isfinite(count) and count >= 0):
            raise ValueError(f"count must be a non-negative number, got {self.count!r}")
        total = _frozen_vector(self.total, "total")
        total_sq = _frozen_vector(self.total_sq, "total_sq")
        if total.shape != total_sq.shape:
            raise ValueError(f"total has {total.size} features but total_sq has {total_sq.size}")
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "total_sq", total_sq)

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return int(self.total.size)

    @classmethod
    def of(cls, x: np.ndarray) -> FeatureStats:
        """Statistics of the rows of a 2-D feature matrix (float64 sums)."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"x must be 2-D (rows, features), got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("x must be finite (no NaN or inf): it would poison the consortium sums")
        return cls(count=float(arr.shape[0]), total=arr.sum(axis=0), total_sq=np.square(arr).sum(axis=0))

    def __add__(self, other: FeatureStats) -> FeatureStats:
        """Pool two banks' statistics."""
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if other.n_features != self.n_features:
            raise ValueError(f"other has {other.n_features} features, expected {self.n_features}")
        return FeatureStats(
            count=self.count + other.count,
            total=self.total + other.total,
            total_sq=self.total_sq + other.total_sq,
        )

    def __radd__(self, other: object) -> FeatureStats:
        """Support `sum(stats_list)` (which starts from 0)."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def to_vector(self) -> np.ndarray:
        """Flatten to [count, total..., total_sq...] (float64) for secure summation."""
        return np.concatenate([[self.count], self.total, self.total_sq]).astype(np.float64)

    @classmethod
    def from_vector(cls, v: np.ndarray) -> FeatureStats:
        """Inverse of `to_vector` (also for a sum of such vectors)."""
        arr = np.asarray(v, dtype=np.float64)
        if arr.ndim != 1 or arr.size < 3 or arr.size % 2 == 0:
            raise ValueError(f"v must be a 1-D vector of length 1 + 2*n_features, got shape {arr.shape}")
        n = (arr.size - 1) // 2
        return cls(count=float(arr[0]), total=arr[1 : 1 + n], total_sq=arr[1 + n :])


def _check_spec(spec: FeatureSpec) -> None:
    n = len(spec.names)
    if n == 0 or not all(isinstance(s, str) and s for s in spec.names):
        raise ValueError("names must be a non-empty list of non-empty strings")
    if len(set(spec.names)) != n:
        raise ValueError("names must be unique")
    if not isinstance(spec.version, str) or not spec.version:
        raise ValueError(f"version must be a non-empty string, got {spec.version!r}")
    for name in ("mean", "std"):
        values = getattr(spec, name)
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} values for {n} names")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be finite")
    if not all(v > 0 for v in spec.std):
        raise ValueError("std must be positive")
    if isinstance(spec.delay_days, bool) or not isinstance(spec.delay_days, int) or spec.delay_days < 0:
        raise ValueError(f"delay_days must be a non-negative integer, got {spec.delay_days!r}")
    if not isinstance(spec.extra, dict):
        raise ValueError(f"extra must be a dict, got {type(spec.extra).__name__}")
    try:
        json.dumps(spec.extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serializable: {exc}") from None


def _floats(values: Any, name: str) -> tuple[float, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"{name} must be a list of numbers")
    if any(isinstance(v, bool | str) for v in values):
        raise ValueError(f"{name} must be a list of numbers")
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers") from None


@dataclass(frozen=True)
class FeatureSpec:
    """Feature names, their version, consortium-wide standardization and the label delay they assume."""

    names: tuple[str, ...]
    version: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    delay_days: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.names, str) or not isinstance(self.names, Sequence | np.ndarray):
            raise ValueError("names must be a list of strings")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "mean", _floats(self.mean, "mean"))
        object.__setattr__(self, "std", _floats(self.std, "std"))
        _check_spec(self)

    @classmethod
    def from_stats(
        cls, names: Sequence[str], stats: FeatureStats, *, version: str, delay_days: int
    ) -> FeatureSpec:
        """Means and population stds from pooled statistics; a std below 1e-6 (constant feature) becomes 1."""
        if len(names) != stats.n_features:
            raise ValueError(f"names has {len(names)} entries but stats has {stats.n_features} features")
        if stats.count <= 0:
            raise ValueError("stats has no rows (count 0): cannot standardize")
        mean = stats.total / stats.count
        var = np.maximum(stats.total_sq / stats.count - np.square(mean), 0.0)
        std = np.sqrt(var)
        constant = std < STD_FLOOR
        if constant.any():
            flat = [n for n, c in zip(names, constant, strict=True) if c]
            logger.info("constant features (std 1 used): %s", flat)
        std = np.where(constant, 1.0, std)
        return cls(
            names=tuple(names),
            version=version,
            mean=tuple(mean.tolist()),
            std=tuple(std.tolist()),
            delay_days=delay_days,
        )

    def transform(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        """Standardize to float32; a DataFrame is selected by name, an array must be in `names` order."""
        if isinstance(x, pd.DataFrame):
            missing = [n for n in self.names if n not in x.columns]
            if missing:
                raise ValueError(f"x lacks feature columns {missing} (spec version {self.version})")
            x = x[list(self.names)].to_numpy()
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != len(self.names):
            raise ValueError(
                f"x must be 2-D with {len(self.names)} columns ({', '.join(self.names)}), "
                f"got shape {arr.shape}"
            )
        return ((arr - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def to_json(self) -> str:
        """Serialize (with a format tag) to a JSON string."""
        doc = {"format": SPEC_FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}
        doc["names"], doc["mean"], doc["std"] = list(self.names), list(self.mean), list(self.std)
        return json.dumps(doc, indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, s: str) -> FeatureSpec:
        """Parse `to_json` output; refuse a bad document, an unknown format, unknown or missing fields."""
        try:
            doc = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"feature spec is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError("feature spec must be a JSON object")
        if doc.get("format") != SPEC_FORMAT:
            raise ValueError(f"feature spec format is {doc.get('format')!r}, expected {SPEC_FORMAT!r}")
        expected = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - expected - {"format"})
        missing = sorted(expected - set(doc))
        if unknown:
            raise ValueError(f"feature spec has unknown fields: {', '.join(unknown)}")
        if missing:
            raise ValueError(f"feature spec lacks fields: {', '.join(missing)}")
        return cls(**{name: doc[name] for name in expected})
