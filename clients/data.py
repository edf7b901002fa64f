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
    """List the file's column names for an error message (repr, so stray spaces show)."""
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
            message = f"--columns: malformed part {part!r}; expected canonical=SOURCE (timestamp=TX_DATETIME)"
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
    shown = {c: mapping.get(c, c) for c in _KNOWN}  # errors name the column as the file spells it
    for name in (*_ID_COLUMNS, "bank_id"):
        if name in frame.columns:
            check_ids(frame[name], path=file, column=shown[name], unique=name == "transaction_id")
    frame["timestamp"] = parse_timestamps(frame["timestamp"], path=file, column=shown["timestamp"])
    frame["amount"] = check_amount(frame["amount"], path=file, column=shown["amount"])
    if "is_fraud" in frame.columns:
        frame["is_fraud"] = check_labels(frame["is_fraud"], path=file, column=shown["is_fraud"])
    first = [c for c in _KNOWN if c in frame.columns]
    out = frame[first + [c for c in frame.columns if c not in first]]
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True)


_RESERVED: tuple[str, ...] = ("transaction_id", "timestamp", "is_fraud", "bank_id")
_TABLE_KEYS: tuple[str, ...] = ("transaction_id", "timestamp", "bank_id")


def _resolve_features(
    frame: pd.DataFrame, features: Sequence[str] | str, skip: set[str], path: Path
) -> list[str]:
    """Feature names: an explicit list (or comma-separated string), or "auto" for every numeric column."""
    if isinstance(features, str) and features.strip().lower() == "auto":
        names = [
            str(c)
            for c in frame.columns
            if c not in skip and c not in _RESERVED and ptypes.is_numeric_dtype(frame[c].dtype)
        ]
        if not names:
            message = f"{path}: no numeric feature columns found; the file has {_columns_text(frame)}"
            raise DataError(message, path=path)
        return names
    names = [f.strip() for f in features.split(",")] if isinstance(features, str) else list(features)
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: no feature columns given", path=path)
    _require_named(frame, names, path)
    clash = [n for n in names if n in skip or n in _RESERVED]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if clash or repeated:
        bad = (clash or repeated)[0]
        why = "is also the label, time or an id column" if clash else "is listed twice"
        raise DataError(f"{path}: feature column {bad!r} {why}", path=path, column=bad)
    return names


def _require_named(frame: pd.DataFrame, names: Sequence[str], path: Path) -> None:
    """Raise DataError for the first named column the file lacks, listing the columns it has."""
    for name in names:
        if name not in frame.columns:
            message = f"{path}: no column {name!r}; the file has columns {_columns_text(frame)}"
            raise DataError(message, path=path, column=name)


def _table_time(frame: pd.DataFrame, time: str | None, path: Path) -> pd.Series:
    """Return the ordering column: numeric time as float64, datetimes parsed, else the row number."""
    if time is None:
        return pd.Series(np.arange(len(frame), dtype="float64"), index=frame.index)
    values = frame[time]
    if ptypes.is_numeric_dtype(values.dtype) and not ptypes.is_bool_dtype(values.dtype):
        return pd.Series(check_numbers(values, path=path, column=time), index=frame.index, dtype="float64")
    return parse_timestamps(values, path=path, column=time)


def load_feature_table(
    path: str | Path,
    *,
    features: Sequence[str] | str,
    label: str | None,
    time: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Read a feature table (numeric features, no feature engineering) and its feature names."""
    file = Path(path)
    frame = read_table(file)
    mapping = dict(columns or {})
    extra = sorted(set(mapping) - set(_TABLE_KEYS))
    if extra:
        message = f"{file}: feature tables map only {', '.join(_TABLE_KEYS)} via --columns, not {extra[0]!r}"
        raise DataError(message, path=file, column=extra[0])
    _check_mapping(frame, mapping, file)
    time = time or mapping.get("timestamp")
    tx_source = mapping.get("transaction_id")
    bank_source = mapping.get("bank_id", "bank_id" if "bank_id" in frame.columns else None)
    _require_named(frame, [n for n in (label, time) if n is not None], file)
    skip = {n for n in (label, time, tx_source, bank_source) if n is not None}
    names = _resolve_features(frame, features, skip, file)
    out = pd.DataFrame(index=frame.index)
    if tx_source is None:
        out["transaction_id"] = np.arange(len(frame), dtype="int64")
    else:
        out["transaction_id"] = check_ids(frame[tx_source], path=file, column=tx_source, unique=True)
    out["timestamp"] = _table_time(frame, time, file)
    if label is not None:
        out["is_fraud"] = check_labels(frame[label], path=file, column=label)
    if bank_source is not None:
        out["bank_id"] = check_ids(frame[bank_source], path=file, column=bank_source, unique=False)
    out = pd.concat([out, check_features(frame, names, path=file)], axis=1)
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True), names


def warn_no_training_frauds(labels: pd.Series, *, source: str) -> bool:
    """Log a warning (not an error) if a bank's training window holds no fraud; return True if it warned."""
    if len(labels) and int(labels.sum()) > 0:
        return False
    logger.warning(
        "%s: the training window holds no fraud (%d transactions, 0 labelled 1); "
        "the local model learns only from genuine transactions this round",
        source,
        len(labels),
    )
    return True
