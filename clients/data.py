"""The bank data contract: read a bank's transactions file (CSV or Parquet) into canonical columns.

Pure readers: nothing here writes anywhere. Every problem with the input raises DataError, whose message
names the file, the column and up to five offending rows (`row N: value`, data rows counted from 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from clients.validation import (
    DataError,
    check_amount,
    check_features,
    check_ids,
    check_labels,
    check_numbers,
    parse_timestamps,
    read_csv_file,
    read_parquet_file,
)

__all__ = [
    "CANONICAL",
    "DataError",
    "load_feature_table",
    "load_transactions",
    "parse_columns",
    "read_table",
    "warn_no_training_frauds",
]

logger = logging.getLogger(__name__)

CANONICAL: tuple[str, ...] = ("transaction_id", "timestamp", "card_id", "merchant_id", "amount", "is_fraud")
_KNOWN: tuple[str, ...] = (*CANONICAL, "bank_id")
_ID_COLUMNS: tuple[str, ...] = ("transaction_id", "card_id", "merchant_id")
_CSV_SUFFIXES: tuple[str, ...] = (".csv", ".csv.gz")
_PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")


def _columns_text(frame: pd.DataFrame, limit: int = 30) -> str:
    """The file's column names for an error message (repr, so stray spaces show)."""
    names = [repr(str(c)) for c in frame.columns]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def parse_columns(spec: str | None) -> dict[str, str]:
    """Parse `canon=SOURCE,canon=SOURCE` (the --columns flag) into {canonical: source}."""
    mapping: dict[str, str] = {}
    for raw in (spec or "").split(","):
        part = raw.strip()
        if not part:
            continue
        canon, eq, source = (p.strip() for p in part.partition("="))
        if not (eq and canon and source):
            message = f"--columns: malformed part {part!r}; expected canonical=SOURCE, e.g. timestamp=TX_DATETIME"
            raise DataError(message, path="--columns", column=canon or None)
        if canon not in _KNOWN:
            message = f"--columns: unknown column {canon!r} in {part!r}; known columns: {', '.join(_KNOWN)}"
            raise DataError(message, path="--columns", column=canon)
        if canon in mapping:
            message = f"--columns: {canon!r} is mapped twice ({mapping[canon]!r} and {source!r})"
            raise DataError(message, path="--columns", column=canon)
        mapping[canon] = source
    return mapping


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one CSV or Parquet file (by suffix: .csv, .csv.gz, .parquet, .pq) with clear errors."""
    file = Path(path)
    name = file.name.lower()
    if not file.exists():
        raise DataError(f"{file}: no such file", path=file)
    if not file.is_file():
        raise DataError(f"{file}: not a file", path=file)
    try:
        if name.endswith(_CSV_SUFFIXES):
            frame = read_csv_file(file)
        elif name.endswith(_PARQUET_SUFFIXES):
            frame = read_parquet_file(file)
        else:
            supported = ", ".join((*_CSV_SUFFIXES, *_PARQUET_SUFFIXES))
            raise DataError(f"{file}: unsupported file type; expected one of {supported}", path=file)
    except PermissionError as exc:
        raise DataError(f"{file}: cannot open: {exc}", path=file) from exc
    if frame.empty:
        raise DataError(f"{file}: no rows (columns: {_columns_text(frame) or 'none'})", path=file)
    logger.debug("read %s: %d rows, %d columns", file, len(frame), frame.shape[1])
    return frame


def _check_mapping(frame: pd.DataFrame, mapping: Mapping[str, str], path: Path) -> None:
    """Every mapped name is a known canonical column and every source column exists in the file."""
    for canon, source in mapping.items():
        if canon not in _KNOWN:
            message = f"{path}: cannot map onto unknown column {canon!r}; known columns: {', '.join(_KNOWN)}"
            raise DataError(message, path=path, column=canon)
        if source not in frame.columns:
            message = (
                f"{path}: column {source!r} (mapped to {canon!r} by --columns) is not in the file; "
                f"the file has columns {_columns_text(frame)}"
            )
            raise DataError(message, path=path, column=source)


def _apply_mapping(frame: pd.DataFrame, mapping: Mapping[str, str], path: Path) -> pd.DataFrame:
    """Rename source columns to canonical names; a file's own column of a mapped-to name is dropped."""
    _check_mapping(frame, mapping, path)
    sources = list(mapping.values())
    repeated = sorted({s for s in sources if sources.count(s) > 1})
    if repeated:
        message = f"{path}: --columns maps column {repeated[0]!r} to more than one canonical name"
        raise DataError(message, path=path, column=repeated[0])
    shadowed = [c for c in mapping if c in frame.columns and c not in sources]
    if shadowed:
        logger.warning("%s: --columns replaces the file's own column(s) %s", path, ", ".join(shadowed))
    renamed = frame.drop(columns=shadowed).rename(columns={s: c for c, s in mapping.items()})
    return renamed


def _require(frame: pd.DataFrame, names: Sequence[str], path: Path) -> None:
    """Raise DataError for the first required column the (mapped) frame lacks."""
    for name in names:
        if name not in frame.columns:
            message = (
                f"{path}: missing required column '{name}'; the file has columns {_columns_text(frame)}; "
                f"if it is named differently, map it with --columns {name}=<SOURCE>"
            )
            raise DataError(message, path=path, column=name)


def load_transactions(
    path: str | Path, *, columns: Mapping[str, str] | None = None, require_label: bool = True
) -> pd.DataFrame:
    """Read a bank's transactions file into the canonical columns, validated."""
    file = Path(path)
    mapping = dict(columns or {})
    frame = _apply_mapping(read_table(file), mapping, file)
    _require(frame, [c for c in CANONICAL if c != "is_fraud" or require_label], file)
    shown = {c: f"{c}' (from '{mapping[c]}" if c in mapping else c for c in _KNOWN}
    out = frame.copy()
    for name in (*_ID_COLUMNS, "bank_id"):
        if name in out.columns:
            check_ids(out[name], path=file, column=shown[name], unique=name == "transaction_id")
    out["timestamp"] = parse_timestamps(out["timestamp"], path=file, column=shown["timestamp"])
    out["amount"] = check_amount(out["amount"], path=file, column=shown["amount"])
    if "is_fraud" in out.columns:
        out["is_fraud"] = check_labels(out["is_fraud"], path=file, column=shown["is_fraud"])
    first = [c for c in _KNOWN if c in out.columns]
    out = out[first + [c for c in out.columns if c not in first]]
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True)
