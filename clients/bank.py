"""A bank's own data for federated rounds: its file, read, featurized and split, cached per process."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.data import load_feature_table, load_transactions, warn_no_training_frauds
from clients.features import LOCAL_FEATURES, compute_local_features
from models.config import SplitConfig
from models.federation import STATS_CLIP
from models.metrics import fraud_metrics
from models.split import Split, time_split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankData:
    """One bank's train and test windows as raw (unstandardized) feature matrices."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_cards: np.ndarray | None
    test_days: np.ndarray | None
    feature_names: tuple[str, ...]
    frame: pd.DataFrame | None = None
    """The bank's canonical rows (transactions mode), for its entity statistics."""
    train_mask: np.ndarray | None = None
    test_mask: np.ndarray | None = None

    def stats_vector(self) -> np.ndarray:
        """Means of x and x^2 per feature (clipped) and the train-window fraud rate, for the stats round."""
        x = np.clip(self.x_train.astype(np.float64), -STATS_CLIP, STATS_CLIP)
        if len(x) == 0:
            return np.zeros(2 * x.shape[1] + 1)
        return np.concatenate([x.mean(axis=0), (x**2).mean(axis=0), [float(self.y_train.mean())]])

    def test_metrics(self, scores: np.ndarray) -> dict[str, float]:
        """Fraud metrics of scores on this bank's test window."""
        return fraud_metrics(self.y_test, scores, card_ids=self.test_cards, days=self.test_days)


def _frame(
    path: str, features: tuple[str, ...] | None, columns: tuple[tuple[str, str], ...]
) -> tuple[pd.DataFrame, list[str]]:
    if features is not None:
        return load_feature_table(
            path, features=list(features), label="is_fraud", time="timestamp", columns=dict(columns)
        )
    return load_transactions(path, columns=dict(columns)), list(LOCAL_FEATURES)


@functools.lru_cache(maxsize=64)
def _load_cached(
    path: str,
    mtime: float,
    split: SplitConfig,
    features: tuple[str, ...] | None,
    columns: tuple[tuple[str, str], ...],
) -> BankData:
    frame, names = _frame(path, features, columns)
    if features is None:
        x = compute_local_features(frame, delay_days=split.delay_days)[names].to_numpy(np.float32)
    else:
        x = frame[names].to_numpy(np.float32)
    windows = time_split(frame["timestamp"], split)
    y = frame["is_fraud"].to_numpy().astype(np.float32)
    warn_no_training_frauds(frame.loc[windows.train, "is_fraud"], source=path)
    return windowed_bank(frame, x, y, windows, tuple(names), keep_frame=features is None)


def windowed_bank(
    frame: pd.DataFrame,
    x: np.ndarray,
    y: np.ndarray,
    windows: Split,
    names: tuple[str, ...],
    *,
    keep_frame: bool,
) -> BankData:
    """A bank's rows cut into its train and test windows (test cards and days when the rows are dated)."""
    dated = pd.api.types.is_datetime64_any_dtype(frame["timestamp"]) and "card_id" in frame.columns
    test = frame.loc[windows.test]
    return BankData(
        x_train=x[windows.train],
        y_train=y[windows.train],
        x_test=x[windows.test],
        y_test=y[windows.test],
        test_cards=test["card_id"].to_numpy() if dated else None,
        test_days=test["timestamp"].dt.floor("D").to_numpy() if dated else None,
        feature_names=names,
        frame=frame if keep_frame else None,
        train_mask=windows.train,
        test_mask=windows.test,
    )


def load_bank(
    path: str | Path,
    *,
    split: SplitConfig,
    features: tuple[str, ...] | None = None,
    columns: dict[str, str] | None = None,
) -> BankData:
    """Read a bank's file, featurize it and cut its windows (cached while the file is unchanged)."""
    p = Path(path)
    mtime = p.stat().st_mtime if p.exists() else 0.0
    return _load_cached(str(p), mtime, split, features, tuple(sorted((columns or {}).items())))
