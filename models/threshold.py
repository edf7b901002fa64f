"""The decision threshold stored with a model: the lowest score that keeps a target false-positive rate."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TARGET_FPR = 0.01


@dataclass(frozen=True)
class Threshold:
    """Flag a transaction when score >= value; chosen so that at most target_fpr of known genuine rows are."""

    value: float
    target_fpr: float
    achieved_fpr: float
    negatives: int
    positives: int
    recall: float | None
    """Share of fraud rows flagged (None without fraud rows)."""
    source: str

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise ValueError(f"threshold value must be finite, got {self.value!r}")
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (what threshold.json holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Threshold:
        """Inverse of `to_dict`; ValueError names a missing or bad field."""
        try:
            return cls(
                value=float(doc["value"]),
                target_fpr=float(doc["target_fpr"]),
                achieved_fpr=float(doc["achieved_fpr"]),
                negatives=int(doc["negatives"]),
                positives=int(doc["positives"]),
                recall=None if doc["recall"] is None else float(doc["recall"]),
                source=str(doc["source"]),
            )
        except KeyError as exc:
            raise ValueError(f"threshold lacks field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"threshold has a bad field: {exc}") from None


def threshold_for_fpr(
    scores: np.ndarray, labels: np.ndarray, *, target_fpr: float = DEFAULT_TARGET_FPR, source: str
) -> Threshold:
    """The smallest threshold at which the share of genuine rows (label 0) scoring >= it is <= target_fpr."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-D of the same length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr!r}")
    negatives = np.sort(s[y == 0])
    if negatives.size == 0:
        raise ValueError(f"no genuine (label 0) rows in {source}: cannot choose a threshold")
    allowed = math.floor(target_fpr * negatives.size)  # false positives we may flag
    # Strictly above the (allowed+1)-th highest negative: ties at that score are all left unflagged.
    value = float(np.nextafter(negatives[negatives.size - allowed - 1], np.inf))
    positives = s[y == 1]
    recall = float((positives >= value).mean()) if positives.size else None
    achieved = float((negatives >= value).mean())
    logger.info(
        "threshold %.6g for FPR <= %.3g on %s: FPR %.4f, recall %s",
        value,
        target_fpr,
        source,
        achieved,
        recall,
    )
    return Threshold(
        value=value,
        target_fpr=float(target_fpr),
        achieved_fpr=achieved,
        negatives=int(negatives.size),
        positives=int(positives.size),
        recall=recall,
        source=source,
    )
