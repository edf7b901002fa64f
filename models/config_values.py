"""Checked parsing of single configuration values: each failure names its key."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import date
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


def checked(
    raw: Mapping[str, Any], key: str, kind: Callable[[Any], T], check: Callable[[T], bool], expect: str
) -> T:
    """Read `key` from `raw`, convert it with `kind` and check it; ConfigError naming the key otherwise."""
    if key not in raw:
        raise ConfigError(f"config key '{key}' is missing")
    value = raw[key]
    try:
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise ValueError
            value = value.lower() == "true"
        parsed = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': {value!r} is not {expect}") from None
    if isinstance(parsed, float) and math.isnan(parsed):
        raise ConfigError(f"config key '{key}': NaN is not {expect}")
    if not check(parsed):
        raise ConfigError(f"config key '{key}': {value!r} is not {expect}")
    return parsed


def layer_sizes(value: Any) -> tuple[int, ...]:
    """Hidden layer sizes from "64,64" or a list."""
    items = value if isinstance(value, list | tuple) else [p for p in str(value).split(",") if p.strip()]
    return tuple(int(p) for p in items)


def pos_weight_value(value: Any) -> float | None:
    """The positive-class weight: a number, or None for 'auto'."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return float(value)


def is_date_or_empty(value: str) -> bool:
    """Whether a value is empty or an ISO date (YYYY-MM-DD)."""
    if not value:
        return True
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def bank_epsilons(value: Any) -> dict[int, float]:
    """Per-bank budgets from "BANK:EPSILON,BANK:EPSILON"."""
    out = {}
    for part in (p.strip() for p in str(value).split(",") if p.strip()):
        bank, _, eps = part.partition(":")
        out[int(bank)] = float(eps)
    return out
