"""Partition pooled research data into banks: by a column, by card hash, Zipf-sized, or at random."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from models.config import ConfigError

logger = logging.getLogger(__name__)
SCHEMES = ("column:<name>", "card-hash", "zipf", "random")


def partition_banks(
    frame: pd.DataFrame, spec: str, *, banks: int | None, seed: int = 0, zipf_exponent: float = 1.1
) -> np.ndarray:
    """Return each row's bank id (int64) under a partition spec such as `column:bank_id` or `zipf`."""
    if spec.startswith("column:"):
        return _by_column(frame, spec.split(":", 1)[1])
    if spec not in SCHEMES:
        raise ConfigError(f"--partition: {spec!r} is not one of {', '.join(SCHEMES)}")
    if banks is None or banks < 1:
        raise ConfigError(f"--banks: partition {spec!r} needs a positive number of banks, got {banks}")
    units, n_units = _units(frame)
    if spec == "card-hash":
        hashed = pd.util.hash_array(np.asarray(units), categorize=False)
        return (hashed % np.uint64(banks)).astype(np.int64)
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(units)
    if spec == "zipf":
        weights = 1.0 / np.arange(1, banks + 1) ** zipf_exponent
        bank_of_unit = rng.choice(banks, size=len(uniques), p=weights / weights.sum())
    else:
        bank_of_unit = rng.integers(0, banks, size=len(uniques))
    result = bank_of_unit[codes].astype(np.int64)
    logger.info(
        "partitioned %d %s into %d banks (%s)",
        n_units,
        "cards" if "card_id" in frame else "rows",
        banks,
        spec,
    )
    return result


def _units(frame: pd.DataFrame) -> tuple[pd.Series, int]:
    """Cards are the unit of partition when present (a card belongs to one bank), else rows."""
    if "card_id" in frame.columns:
        units = frame["card_id"]
    else:
        units = pd.Series(np.arange(len(frame)), index=frame.index)
    return units, int(units.nunique())


def _by_column(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        raise ConfigError(
            f"--partition: column {column!r} is not in the data (columns: "
            f"{', '.join(map(str, frame.columns))})"
        )
    values = frame[column]
    if values.isna().any():
        rows = np.flatnonzero(values.isna().to_numpy())[:5].tolist()
        raise ConfigError(f"--partition: column {column!r} has empty values (rows {rows})")
    if pd.api.types.is_integer_dtype(values):
        return values.to_numpy(dtype=np.int64)
    codes, _ = pd.factorize(values, sort=True)
    return codes.astype(np.int64)
