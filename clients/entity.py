"""Cross-bank entity (merchant) statistics: keyed bucketing, per-bank day tables and consortium features.

A bank maps its entity ids (``merchant_id`` by default) to a fixed number of buckets with HMAC-SHA256 under
the consortium key, so raw ids never leave the bank.  Its *local table* holds, per day and bucket, its
transaction count and its count of confirmed frauds (labels it already has).  Local tables are additive:
the consortium's secure sum of them is the table of the pooled data.  From the global (summed, possibly
noised) table each bank computes, for its own rows, consortium counts and fraud rates over 1/7/30 days.

No look-ahead, at day granularity: a row on day ``d`` sees counts of the whole past days ``d-w .. d-1``
(day ``d`` itself is incomplete) and frauds of days ``d-delay-w+1 .. d-delay`` (labels arrive
``delay_days`` late), so a fraud on day ``f`` only shows in rows on day ``f + delay_days`` or later.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.feature_names import CONSORTIUM_FEATURES, WINDOWS_DAYS

__all__ = [
    "CONSORTIUM_FEATURES",
    "EntityTableSpec",
    "bucket_ids",
    "collision_report",
    "consortium_features",
    "local_table",
]
logger = logging.getLogger(__name__)

NS_PER_DAY = 24 * 3600 * 1_000_000_000
_MIN_BUCKETS = 2**8
_MAX_BUCKETS = 2**22


def _is_power_of_two(value: int) -> bool:
    """Whether `value` is a positive power of two."""
    return value > 0 and (value & (value - 1)) == 0


@dataclass(frozen=True)
class EntityTableSpec:
    """Shape of an entity table: entity column, hash buckets, first day, number of days, label delay."""

    start: str
    days: int
    column: str = "merchant_id"
    buckets: int = 2**14
    delay_days: int = 7

    def __post_init__(self) -> None:
        """Validate the fields (ValueError naming the field)."""
        if not isinstance(self.buckets, int) or not _is_power_of_two(self.buckets):
            raise ValueError(f"buckets must be a power of two, got {self.buckets!r}")
        if not _MIN_BUCKETS <= self.buckets <= _MAX_BUCKETS:
            raise ValueError(f"buckets must be in [2**8, 2**22], got {self.buckets}")
        if not isinstance(self.days, int) or self.days < 1:
            raise ValueError(f"days must be an integer >= 1, got {self.days!r}")
        if not isinstance(self.delay_days, int) or self.delay_days < 1:
            # day d's table is incomplete and its labels unknown: a fraud window must end before d
            raise ValueError(f"delay_days must be an integer >= 1, got {self.delay_days!r}")
        if not self.column:
            raise ValueError("column must be a non-empty column name")
        try:
            stamp = pd.Timestamp(self.start)
        except (ValueError, TypeError) as err:
            raise ValueError(f"start must be a date YYYY-MM-DD, got {self.start!r}") from err
        if stamp is pd.NaT or stamp != stamp.normalize() or stamp.tzinfo is not None:
            raise ValueError(f"start must be a date YYYY-MM-DD, got {self.start!r}")

    @property
    def start_ns(self) -> int:
        """First day (midnight, UTC-naive) as int64 nanoseconds since the epoch."""
        return int(pd.Timestamp(self.start).as_unit("ns").value)


def _check_key(key: bytes) -> None:
    """Reject a consortium key that is not non-empty bytes."""
    if not isinstance(key, bytes | bytearray) or len(key) == 0:
        raise ValueError("key must be non-empty bytes (the consortium's hashing key)")


def bucket_ids(values: pd.Series, *, key: bytes, buckets: int) -> np.ndarray:
    """Map entity ids to buckets with HMAC-SHA256 under the consortium key (raw ids never leave the bank)."""
    _check_key(key)
    if not isinstance(buckets, int) or not _is_power_of_two(buckets):
        raise ValueError(f"buckets must be a positive power of two, got {buckets!r}")
    codes, uniques = pd.factorize(pd.Series(values), use_na_sentinel=True)
    if (codes < 0).any():
        raise ValueError("values contain missing entity ids")
    # One HMAC per distinct id (the only per-item work that cannot be vectorized), then a gather.
    digests = b"".join(hmac.new(key, str(u).encode("utf-8"), hashlib.sha256).digest()[:8] for u in uniques)
    hashed = np.frombuffer(digests, dtype=">u8").astype(np.uint64)
    unique_buckets = (hashed & np.uint64(buckets - 1)).astype(np.int64)
    return unique_buckets[codes]


def collision_report(values: pd.Series, *, key: bytes, buckets: int) -> dict[str, float]:
    """Entities, occupied buckets, share of entities sharing a bucket (what a bank can report about collisions)."""  # noqa: E501
    uniques = pd.Series(pd.unique(pd.Series(values).dropna()))
    ids = bucket_ids(uniques, key=key, buckets=buckets)
    per_bucket = np.bincount(ids, minlength=buckets)
    entities = len(uniques)
    shared = float(per_bucket[per_bucket > 1].sum())
    expected = 1.0 - (1.0 - 1.0 / buckets) ** max(entities - 1, 0) if entities else 0.0
    report = {
        "entities": float(entities),
        "buckets": float(buckets),
        "occupied_buckets": float(np.count_nonzero(per_bucket)),
        "shared_share": shared / entities if entities else 0.0,
        "expected_shared_share": float(expected),
    }
    logger.info("entity collisions: %s", report)
    return report


def _day_index(frame: pd.DataFrame, spec: EntityTableSpec) -> np.ndarray:
    """Day of each row counted from spec.start (floor; timezone-aware stamps are taken in UTC)."""
    if "timestamp" not in frame.columns:
        raise ValueError("frame must have a 'timestamp' column")
    column = frame["timestamp"]
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        column = column.dt.tz_convert(None)
    stamps = column.to_numpy(dtype="datetime64[ns]")
    if np.isnat(stamps).any():
        raise ValueError("frame['timestamp'] contains missing values")
    return np.floor_divide(stamps.view(np.int64) - np.int64(spec.start_ns), np.int64(NS_PER_DAY))


def _entity_column(frame: pd.DataFrame, spec: EntityTableSpec) -> pd.Series:
    """The entity column named by the spec."""
    if spec.column not in frame.columns:
        raise ValueError(f"frame has no entity column {spec.column!r} (spec.column)")
    return frame[spec.column]


def _fraud_labels(frame: pd.DataFrame) -> np.ndarray:
    """Fraud labels as float 0/1 (missing labels count as not fraud); zeros when there is no is_fraud."""
    if "is_fraud" not in frame.columns:
        return np.zeros(len(frame))
    labels = pd.to_numeric(frame["is_fraud"]).to_numpy(dtype=np.float64, na_value=np.nan)
    labels = np.nan_to_num(labels, nan=0.0)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("frame['is_fraud'] must hold 0/1 labels")
    return labels


def local_table(
    frame: pd.DataFrame, spec: EntityTableSpec, *, key: bytes, as_of: pd.Timestamp | None = None
) -> np.ndarray:
    """The bank's own table: float64 array shape (2, days, buckets): [0] transaction counts, [1] confirmed frauds per day and bucket."""  # noqa: E501
    day = _day_index(frame, spec)
    entity = _entity_column(frame, spec)
    if as_of is None:
        as_of_day = spec.days - 1
    else:
        stamp = pd.Timestamp(as_of)
        stamp = stamp.tz_convert(None) if stamp.tzinfo is not None else stamp
        as_of_ns = stamp.as_unit("ns").value
        as_of_day = (int(as_of_ns) - spec.start_ns) // NS_PER_DAY
    inside = (day >= 0) & (day < spec.days)
    buckets = bucket_ids(entity[inside], key=key, buckets=spec.buckets)
    cells = day[inside] * spec.buckets + buckets
    labelled = day[inside] <= as_of_day - spec.delay_days  # labels the bank already has
    frauds = _fraud_labels(frame)[inside] * labelled
    size = spec.days * spec.buckets
    table = np.empty((2, spec.days, spec.buckets), dtype=np.float64)
    table[0] = np.bincount(cells, minlength=size).reshape(spec.days, spec.buckets)
    table[1] = np.bincount(cells, weights=frauds, minlength=size).reshape(spec.days, spec.buckets)
    logger.debug(
        "local entity table: %d of %d rows inside %d days, %d frauds labelled by day %d",
        int(inside.sum()),
        len(frame),
        spec.days,
        int(table[1].sum()),
        as_of_day,
    )
    return table


def window_prefixes(table: np.ndarray, spec: EntityTableSpec) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums over days of a (noisy) table's counts and frauds; cells are NOT clipped one by one.

    Clipping each noisy cell at 0 before summing a window adds a positive bias per cell that the window then
    accumulates: at epsilon 3 it raised the mean 30-day consortium fraud rate from 0.5% to 8%. Window sums
    of the unclipped cells are unbiased; the features clip those (counts at 0, rates to [0, 1]).
    """
    arr = np.asarray(table, dtype=np.float64)
    if arr.shape != (2, spec.days, spec.buckets):
        raise ValueError(f"table must have shape {(2, spec.days, spec.buckets)}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("table must be finite")
    counts, frauds = arr[0], arr[1]
    prefix_counts = np.zeros((spec.days + 1, spec.buckets))
    prefix_frauds = np.zeros((spec.days + 1, spec.buckets))
    np.cumsum(counts, axis=0, out=prefix_counts[1:])
    np.cumsum(frauds, axis=0, out=prefix_frauds[1:])
    return prefix_counts, prefix_frauds


def consortium_features(
    frame: pd.DataFrame, table: np.ndarray, spec: EntityTableSpec, *, key: bytes
) -> pd.DataFrame:
    """For each of this bank's rows, consortium merchant count and fraud rate over 1/7/30 days from the global table."""  # noqa: E501
    prefix_counts, prefix_frauds = window_prefixes(table, spec)
    day = _day_index(frame, spec)
    bucket = bucket_ids(_entity_column(frame, spec), key=key, buckets=spec.buckets)
    outside = int(((day < 0) | (day > spec.days)).sum())
    if outside:
        logger.warning("%d rows lie outside the table's days; their windows are cut to the table", outside)

    def window(prefix: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Sum of days first .. last (inclusive) per row, cut to the table's days."""
        lo = np.clip(first, 0, spec.days)
        hi = np.clip(last + 1, 0, spec.days)
        return prefix[np.maximum(hi, lo), bucket] - prefix[lo, bucket]

    matrix = np.empty((len(frame), len(CONSORTIUM_FEATURES)), dtype=np.float32)
    for j, w in enumerate(WINDOWS_DAYS):
        matrix[:, j] = np.log1p(np.maximum(window(prefix_counts, day - w, day - 1), 0.0))
        first, last = day - spec.delay_days - w + 1, day - spec.delay_days
        counts = window(prefix_counts, first, last)
        frauds = window(prefix_frauds, first, last)
        rate = np.divide(frauds, counts, out=np.zeros(len(frame)), where=counts > 0)
        matrix[:, len(WINDOWS_DAYS) + j] = np.clip(rate, 0.0, 1.0)
    return pd.DataFrame(matrix, columns=list(CONSORTIUM_FEATURES), index=frame.index)
