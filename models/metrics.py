"""Fraud-detection metrics: AP, ROC AUC, recall at a fixed FPR, card precision@k (scikit-learn + pandas).

Every function accepts numpy arrays or pandas Series and returns NaN, never raises, when the metric is
undefined on the data (a class missing, no days).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

logger = logging.getLogger(__name__)

# Card ids and days may be strings, integers or dates (numpy arrays, pandas Series or lists).
Column = ArrayLike | Sequence[Any]

METRIC_KEYS = ("ap", "roc_auc", "cp_at_100", "recall_at_1pct_fpr")


def _checked(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return (int labels, float scores) as 1-D arrays of equal length; ValueError otherwise."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"labels has {len(y)} entries but scores has {len(s)}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must contain only 0/1 values")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    return y.astype(np.int64), s


def _both_classes(y: np.ndarray) -> bool:
    n_pos = int(y.sum())
    return 0 < n_pos < len(y)


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision (scikit-learn); NaN if there are no positives."""
    y, s = _checked(labels, scores)
    if not y.any():
        return math.nan
    return float(average_precision_score(y, s))


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC (scikit-learn); NaN if only one class is present."""
    y, s = _checked(labels, scores)
    if not _both_classes(y):
        return math.nan
    return float(roc_auc_score(y, s))


def recall_at_fpr(labels: ArrayLike, scores: ArrayLike, *, fpr: float = 0.01) -> float:
    """Highest recall (TPR) among thresholds whose FPR is <= fpr; NaN if a class is missing."""
    if not (0.0 <= fpr <= 1.0):
        raise ValueError(f"fpr must be in [0, 1], got {fpr!r}")
    y, s = _checked(labels, scores)
    if not _both_classes(y):
        return math.nan
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    return float(tprs[fprs <= fpr].max())


def card_precision_at_k(
    labels: ArrayLike, scores: ArrayLike, *, card_ids: Column, days: Column, k: int = 100
) -> float:
    """Card precision@k: per day, each card's max score and whether it had any fraud that day; precision among the top k cards; mean over days."""  # noqa: E501
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    y, s = _checked(labels, scores)
    cards = np.asarray(card_ids)
    day = np.asarray(days)
    for name, arr in (("card_ids", cards), ("days", day)):
        if arr.ndim != 1 or len(arr) != len(y):
            raise ValueError(f"{name} must be 1-D with {len(y)} entries, got shape {arr.shape}")
        if pd.isna(arr).any():
            raise ValueError(f"{name} must not contain missing values")
    if len(y) == 0:
        return math.nan
    frame = pd.DataFrame({"day": day, "card": cards, "label": y, "score": s})
    per_card = frame.groupby(["day", "card"], sort=True).agg(score=("score", "max"), label=("label", "max"))
    # Stable sort: ties in score keep the (day, card) order, so the result is deterministic.
    ranked = per_card.reset_index().sort_values(["day", "score"], ascending=[True, False], kind="stable")
    top = ranked.groupby("day", sort=False).head(k)
    per_day = top.groupby("day", sort=False)["label"].mean()
    return float(per_day.mean())


def fraud_metrics(
    labels: ArrayLike, scores: ArrayLike, *, card_ids: Column | None = None, days: Column | None = None
) -> dict[str, float]:
    """All METRIC_KEYS (cp_at_100 NaN when card_ids/days are None)."""
    if (card_ids is None) != (days is None):
        raise ValueError("pass both card_ids and days (for cp_at_100), or neither")
    y, s = _checked(labels, scores)
    cp = math.nan
    if card_ids is not None and days is not None:
        cp = card_precision_at_k(y, s, card_ids=card_ids, days=days, k=100)
    out = {
        "ap": average_precision(y, s),
        "roc_auc": roc_auc(y, s),
        "cp_at_100": cp,
        "recall_at_1pct_fpr": recall_at_fpr(y, s, fpr=0.01),
    }
    return {key: out[key] for key in METRIC_KEYS}
