"""Load research data (one pooled file or a directory of bank files), assign banks, build features, split."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from clients.data import DataError, load_feature_table, load_transactions, warn_no_training_frauds
from clients.features import FEATURE_VERSION, LOCAL_FEATURES, compute_local_features
from models.config import ConfigError, SplitConfig
from models.split import Split, time_split
from simulations.partition import partition_banks

logger = logging.getLogger(__name__)
SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
ROW_COLUMNS = ["transaction_id", "bank_id", "card_id", "timestamp", "is_fraud"]


@dataclass(frozen=True)
class DataSource:
    """Where the research data is and how to read and partition it (the simulate command's data flags)."""

    path: Path
    columns: dict[str, str] = field(default_factory=dict)
    features: str | None = None
    label: str | None = None
    time: str | None = None
    partition: str | None = None
    banks: int | None = None
    seed: int = 0

    @property
    def feature_table(self) -> bool:
        """Whether the data is a feature table (no feature engineering)."""
        return self.features is not None


@dataclass(frozen=True)
class Prepared:
    """All rows with their bank, pooled and siloed feature matrices, and the split."""

    rows: pd.DataFrame
    frame: pd.DataFrame
    feature_names: tuple[str, ...]
    pooled: np.ndarray
    siloed: np.ndarray
    split: Split
    feature_version: str

    @property
    def banks(self) -> list[int]:
        """Sorted bank ids."""
        return sorted(int(b) for b in self.rows["bank_id"].unique())

    def bank_mask(self, bank: int) -> np.ndarray:
        """Boolean mask of one bank's rows."""
        return np.asarray(self.rows["bank_id"].to_numpy() == bank)


def bank_files(directory: Path) -> list[tuple[int | None, Path]]:
    """List a directory's bank files: from manifest.json when present, else every CSV/Parquet file."""
    manifest = directory / "manifest.json"
    if manifest.exists():
        try:
            banks = json.loads(manifest.read_text())["banks"]
            return [(int(b["bank_id"]), directory / b["file"]) for b in banks]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{manifest}: not a fedfraud manifest ({exc})", path=str(manifest)) from exc
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(SUFFIXES))
    if not files:
        raise DataError(f"{directory}: no CSV or Parquet bank files in this directory", path=str(directory))
    return [(None, p) for p in files]


def _load_one(path: Path, source: DataSource) -> tuple[pd.DataFrame, list[str]]:
    if source.feature_table:
        spec = source.features or "auto"
        features: list[str] | str = (
            "auto" if spec == "auto" else [c.strip() for c in spec.split(",") if c.strip()]
        )
        frame, names = load_feature_table(
            path, features=features, label=source.label, time=source.time, columns=source.columns
        )
        return frame, names
    return load_transactions(path, columns=source.columns), list(LOCAL_FEATURES)


def load_source(source: DataSource) -> tuple[pd.DataFrame, list[str]]:
    """Read the data into one frame with a `bank_id` for every row, and the feature names."""
    if source.path.is_dir():
        frames: list[pd.DataFrame] = []
        names: list[str] = []
        offset = 0
        for index, (bank, path) in enumerate(bank_files(source.path)):
            frame, names = _load_one(path, source)
            frame["bank_id"] = index if bank is None else bank
            if source.feature_table and "transaction_id" not in source.columns:
                frame["transaction_id"] += offset  # row numbers: make them unique across files
                offset += len(frame)
            frames.append(frame)
        frame = pd.concat(frames, ignore_index=True)
        _check_unique_ids(frame, source.path)
    else:
        frame, names = _load_one(source.path, source)
    spec = source.partition or ("column:bank_id" if "bank_id" in frame.columns else None)
    if spec is None:
        raise ConfigError(
            f"--partition: {source.path} has no bank_id column; say how to split it into banks "
            "(--partition card-hash|zipf|random --banks K, or column:NAME)"
        )
    if not (source.path.is_dir() and source.partition is None):
        frame["bank_id"] = partition_banks(frame, spec, banks=source.banks, seed=source.seed)
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True), names


def _check_unique_ids(frame: pd.DataFrame, directory: Path) -> None:
    dup = frame["transaction_id"].duplicated(keep=False)
    if dup.any():
        sample = frame.loc[dup, ["bank_id", "transaction_id"]].head(5).to_dict("records")
        raise DataError(
            f"{directory}: transaction_id values repeat across bank files, e.g. {sample}",
            path=str(directory),
            column="transaction_id",
        )


def _features(
    frame: pd.DataFrame, names: list[str], source: DataSource, delay_days: int
) -> tuple[np.ndarray, np.ndarray]:
    if source.feature_table:
        x = frame[names].to_numpy(dtype=np.float32)
        return x, x
    card_key = pd.factorize(pd.MultiIndex.from_arrays([frame["bank_id"], frame["card_id"]]))[0]
    pooled = compute_local_features(
        frame.assign(card_key=card_key), delay_days=delay_days, card_key="card_key"
    )
    siloed = pd.concat(
        [
            compute_local_features(part, delay_days=delay_days)
            for _, part in frame.groupby("bank_id", sort=True)
        ]
    )
    siloed = siloed.loc[frame.index]
    return pooled[names].to_numpy(dtype=np.float32), siloed[names].to_numpy(dtype=np.float32)


def prepare(source: DataSource, split_config: SplitConfig) -> Prepared:
    """Load, partition, split and featurize: everything the baselines and federated runs share."""
    frame, names = load_source(source)
    split = time_split(frame["timestamp"], split_config)
    pooled, siloed = _features(frame, names, source, split_config.delay_days)
    rows = frame.reindex(columns=ROW_COLUMNS)
    for bank, part in rows.loc[split.train].groupby("bank_id"):
        warn_no_training_frauds(part["is_fraud"], source=f"bank {bank} ({source.path})")
    version = "table-v1" if source.feature_table else FEATURE_VERSION
    return Prepared(
        rows=rows,
        frame=frame,
        feature_names=tuple(names),
        pooled=pooled,
        siloed=siloed,
        split=split,
        feature_version=version,
    )
