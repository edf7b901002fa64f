"""The consortium entity features' settings (`EntityConfig`), parsed from the run config's `entity-*` keys."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.config_values import checked, is_date_or_empty

RELEASE_MECHANISMS = ("discrete-laplace", "laplace", "gaussian")
"""Noise of the entity release: distributed discrete or continuous Laplace (pure epsilon-DP), or Gaussian."""
PURE_RELEASE_MECHANISMS = ("discrete-laplace", "laplace")
"""The pure epsilon-DP ones (their epsilons add; the Gaussian composes by RDP)."""
DEFAULT_MIN_SHARE = 0.8
"""`entity-min-banks = 0`: the release's noise is calibrated for this share of the banks (rounded up)."""


@dataclass(frozen=True)
class EntityConfig:
    """Consortium entity features: which column, hash buckets, the release's privacy and its day range."""

    entity_features: str
    entity_epsilon: float
    entity_delta: float
    entity_buckets: int
    entity_start: str
    entity_days: int
    entity_key: str
    entity_bank_epsilon: float
    entity_mechanism: str
    entity_min_banks: int

    @property
    def enabled(self) -> bool:
        """Whether an entity statistics round runs before training."""
        return bool(self.entity_features)

    def min_banks(self, n_banks: int) -> int:
        """The shares the release's noise is split into: fewer banks' shares and the table is refused."""
        chosen = self.entity_min_banks or math.ceil(DEFAULT_MIN_SHARE * n_banks)
        if not 1 <= chosen <= n_banks:
            raise ValueError(
                f"config key 'entity-min-banks': {chosen} must be in [1, the {n_banks} banks] "
                "(0: 80% of them)"
            )
        return chosen


def parse_entity(raw: Mapping[str, Any]) -> EntityConfig:
    """The `entity-*` keys of a run config, checked (ConfigError naming the key)."""
    return EntityConfig(
        entity_features=checked(
            raw,
            "entity-features",
            str,
            lambda v: v in ("", "merchant_id") or v.isidentifier(),
            "empty (off) or an entity column such as merchant_id",
        ),
        entity_epsilon=checked(
            raw, "entity-epsilon", float, lambda v: v > 0, "a positive epsilon (or inf: no noise)"
        ),
        entity_delta=checked(raw, "entity-delta", float, lambda v: 0 < v < 1, "a delta in (0, 1)"),
        entity_buckets=checked(
            raw,
            "entity-buckets",
            int,
            lambda v: 2**8 <= v <= 2**22 and v & (v - 1) == 0,
            "a power of two in [256, 4194304]",
        ),
        entity_start=checked(raw, "entity-start", str, is_date_or_empty, "empty or a date YYYY-MM-DD"),
        entity_days=checked(
            raw, "entity-days", int, lambda v: v >= 0, "0 (from the data) or a number of days"
        ),
        entity_key=checked(
            raw,
            "entity-key",
            str,
            lambda v: all(c in "0123456789abcdef" for c in v.lower()),
            "empty (a fresh key per run) or a hex string",
        ),
        entity_bank_epsilon=checked(
            raw, "entity-bank-epsilon", float, lambda v: v > 0, "a positive epsilon (inf: no cap)"
        ),
        entity_mechanism=checked(
            raw, "entity-mechanism", str, lambda v: v in RELEASE_MECHANISMS, " or ".join(RELEASE_MECHANISMS)
        ),
        entity_min_banks=checked(
            raw, "entity-min-banks", int, lambda v: v >= 0, "0 (80% of the banks) or a number of banks"
        ),
    )
