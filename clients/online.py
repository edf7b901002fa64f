"""Incremental features for the online path: per-card and per-merchant state, kept as transactions arrive.

`OnlineFeatures` computes, for one new transaction, exactly the features that `compute_local_features`
computes for the same row over the whole history (and `consortium_features` from the published table),
without recomputing from history. Transactions must arrive in time order (ties in arrival order); each key
keeps its recent times in an append-only list with running sums, so a window is two binary searches:
scoring is O(log window entries), and entries older than every window are dropped.

The label-delay rule is the batch rule: a merchant's fraud rate over ``(t - delay - w, t - delay]`` counts
the frauds among the merchant's transactions in that window. A fraud label can come with the transaction
(history) or later through `record_fraud` (labels arrive late); it counts once its transaction is older
than the delay, as in batch.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from clients.entity import EntityTableSpec, bucket_ids, window_prefixes
from models.feature_names import CONSORTIUM_FEATURES, LOCAL_FEATURES, WINDOWS_DAYS

logger = logging.getLogger(__name__)

NS_PER_HOUR = 3600 * 1_000_000_000
NS_PER_DAY = 24 * NS_PER_HOUR
_LONGEST = max(WINDOWS_DAYS) * NS_PER_DAY
_COMPACT_AT = 256
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday


def timestamp_ns(value: Any) -> int:
    """Nanoseconds since the epoch (UTC) of an int, a datetime, a numpy datetime64 or a timestamp string."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    stamp = pd.Timestamp(value)
    if stamp is pd.NaT:
        raise ValueError(f"timestamp {value!r} is missing")
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert(None)
    return int(stamp.as_unit("ns").value)


@dataclass(frozen=True, slots=True)
class Transaction:
    """One transaction as the online path sees it (the canonical columns; no label)."""

    transaction_id: Hashable
    timestamp: int | str | datetime | pd.Timestamp | np.datetime64
    card_id: Hashable
    merchant_id: Hashable
    amount: float

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Transaction:
        """From a mapping with the canonical column names (KeyError names a missing one)."""
        missing = [
            c for c in ("transaction_id", "timestamp", "card_id", "merchant_id", "amount") if c not in row
        ]
        if missing:
            raise KeyError(f"transaction lacks {', '.join(missing)}")
        return cls(row["transaction_id"], row["timestamp"], row["card_id"], row["merchant_id"], row["amount"])


class _Times:
    """One key's transaction times in arrival order with running sums of a value; old entries dropped."""

    __slots__ = ("head", "sums", "times")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.sums: list[float] = [0.0]
        self.head = 0

    def last(self) -> int | None:
        """The latest time, if any."""
        return self.times[-1] if len(self.times) > self.head else None

    def count_after(self, t: int) -> int:
        """Number of kept entries with time > t."""
        return len(self.times) - bisect.bisect_right(self.times, t, self.head)

    def window(self, after: int) -> tuple[int, float]:
        """Count and value sum of the entries with time > after."""
        start = bisect.bisect_right(self.times, after, self.head)
        return len(self.times) - start, self.sums[-1] - self.sums[start]

    def between(self, after: int, upto: int) -> int:
        """Number of entries with after < time <= upto."""
        lo = bisect.bisect_right(self.times, after, self.head)
        return bisect.bisect_right(self.times, upto, lo) - lo

    def append(self, t: int, value: float = 0.0) -> None:
        """Add an entry (the caller keeps time order)."""
        self.times.append(t)
        self.sums.append(self.sums[-1] + value)

    def insert(self, t: int) -> None:
        """Insert a count-only entry at its time (late labels)."""
        bisect.insort_right(self.times, t, self.head)
        self.sums.append(0.0)

    def drop_until(self, t: int) -> None:
        """Forget entries with time <= t; compact the lists once half of them is forgotten."""
        self.head = bisect.bisect_right(self.times, t, self.head)
        if self.head >= _COMPACT_AT and self.head * 2 >= len(self.times):
            base = self.sums[self.head]
            self.times = self.times[self.head :]
            self.sums = [s - base for s in self.sums[self.head :]]
            self.head = 0


class _ConsortiumLookup:
    """Consortium merchant features from the published table: prefix sums over days, buckets cached."""

    def __init__(self, table: np.ndarray, spec: EntityTableSpec, key: bytes) -> None:
        counts, frauds = window_prefixes(table, spec)
        self.counts, self.frauds, self.spec, self.key = counts, frauds, spec, key
        self.buckets: dict[Hashable, int] = {}

    def _window(self, prefix: np.ndarray, bucket: int, first: int, last: int) -> float:
        days = self.spec.days
        lo = min(max(first, 0), days)
        hi = min(max(last + 1, 0), days)
        return float(prefix[max(hi, lo), bucket] - prefix[lo, bucket])

    def features(self, merchant: Hashable, t: int) -> list[float]:
        """consortium_count_{w}d then consortium_fraud_rate_{w}d for a transaction at time t."""
        bucket = self.buckets.get(merchant)
        if bucket is None:
            ids = bucket_ids(pd.Series([merchant]), key=self.key, buckets=self.spec.buckets)
            bucket = self.buckets[merchant] = int(ids[0])
        day = (t - self.spec.start_ns) // NS_PER_DAY
        delay = self.spec.delay_days
        counts = [
            math.log1p(max(self._window(self.counts, bucket, day - w, day - 1), 0.0)) for w in WINDOWS_DAYS
        ]
        rates = []
        for w in WINDOWS_DAYS:
            first, last = day - delay - w + 1, day - delay
            n = self._window(self.counts, bucket, first, last)
            f = self._window(self.frauds, bucket, first, last)
            rates.append(min(max(f / n, 0.0), 1.0) if n > 0 else 0.0)
        return counts + rates


def _time_features(t: int, amount: float) -> list[float]:
    """log_amount, hour_sin, hour_cos, is_weekend, is_night (as clients.features computes them)."""
    hour = (t % NS_PER_DAY) / NS_PER_HOUR
    angle = 2.0 * math.pi * hour / 24.0
    weekday = (t // NS_PER_DAY + _EPOCH_WEEKDAY) % 7
    night = hour < 6 or hour >= 22
    return [math.log1p(amount), math.sin(angle), math.cos(angle), float(weekday >= 5), float(night)]


class OnlineFeatures:
    """Per-card and per-merchant state that yields one transaction's features in the batch order."""

    def __init__(
        self,
        *,
        delay_days: int,
        consortium: tuple[np.ndarray, EntityTableSpec, bytes] | None = None,
    ) -> None:
        if delay_days < 0:
            raise ValueError(f"delay_days must be >= 0, got {delay_days}")
        self.delay_ns = int(delay_days) * NS_PER_DAY
        self.cards: dict[Hashable, _Times] = {}
        self.merchants: dict[Hashable, _Times] = {}
        self.frauds: dict[Hashable, _Times] = {}
        self.consortium = _ConsortiumLookup(*consortium) if consortium is not None else None
        self.names = LOCAL_FEATURES + (CONSORTIUM_FEATURES if consortium is not None else ())

    def _card(self, card: _Times, t: int, amount: float) -> list[float]:
        counts, means, ratios = [], [], []
        for w in WINDOWS_DAYS:
            n, total = card.window(t - w * NS_PER_DAY)
            n, total = n + 1, total + amount  # the current transaction is in its own window
            mean = total / n
            counts.append(math.log1p(n))
            means.append(math.log1p(mean))
            ratios.append(amount / mean if mean > 0 else 1.0)
        return counts + means + ratios

    def _merchant(self, merchant: _Times, frauds: _Times, t: int) -> list[float]:
        counts = [math.log1p(merchant.count_after(t - w * NS_PER_DAY) + 1) for w in WINDOWS_DAYS]
        rates = []
        for w in WINDOWS_DAYS:
            start = t - self.delay_ns - w * NS_PER_DAY
            if self.delay_ns:
                n, f = merchant.between(start, t - self.delay_ns), frauds.between(start, t - self.delay_ns)
            else:  # no delay: the window ends just before the current transaction
                n, f = merchant.count_after(start), frauds.count_after(start)
            rates.append(f / n if n > 0 else 0.0)
        return counts + rates

    def features(self, tx: Transaction) -> np.ndarray:
        """The transaction's features (float32, in `names` order) from the state; the state is unchanged."""
        t, amount = timestamp_ns(tx.timestamp), float(tx.amount)
        card = self.cards.get(tx.card_id) or _Times()
        merchant = self.merchants.get(tx.merchant_id) or _Times()
        for kind, times in (("card", card), ("merchant", merchant)):
            last = times.last()
            if last is not None and t < last:
                raise ValueError(
                    f"transaction {tx.transaction_id!r} at {pd.Timestamp(t)} is older than its {kind}'s "
                    f"latest ({pd.Timestamp(last)}): feed transactions in time order"
                )
        row = _time_features(t, amount)
        row += self._card(card, t, amount)
        row += self._merchant(merchant, self.frauds.get(tx.merchant_id) or _Times(), t)
        if self.consortium is not None:
            row += self.consortium.features(tx.merchant_id, t)
        return np.asarray(row, dtype=np.float32)

    def observe(self, tx: Transaction, *, is_fraud: bool = False) -> None:
        """Add a scored (or historical) transaction to the state, with its fraud label when known."""
        t = timestamp_ns(tx.timestamp)
        card = self.cards.setdefault(tx.card_id, _Times())
        merchant = self.merchants.setdefault(tx.merchant_id, _Times())
        card.append(t, float(tx.amount))
        merchant.append(t)
        card.drop_until(t - _LONGEST)
        merchant.drop_until(t - self.delay_ns - _LONGEST)
        if is_fraud:
            self.record_fraud(tx.merchant_id, t)

    def record_fraud(self, merchant_id: Hashable, timestamp: Any) -> None:
        """A fraud label arrived for a transaction at this merchant and time (counted as batch counts it)."""
        t = timestamp_ns(timestamp)
        frauds = self.frauds.setdefault(merchant_id, _Times())
        frauds.insert(t)
        frauds.drop_until(t - self.delay_ns - _LONGEST)

    def warm_up(self, frame: pd.DataFrame) -> int:
        """Observe a history frame (canonical columns, labels in is_fraud when present) in time order."""
        ordered = frame.sort_values("timestamp", kind="stable")
        labels = ordered["is_fraud"].to_numpy() if "is_fraud" in ordered.columns else np.zeros(len(ordered))
        times = ordered["timestamp"]
        if isinstance(times.dtype, pd.DatetimeTZDtype):
            times = times.dt.tz_convert(None)
        stamps = times.to_numpy(dtype="datetime64[ns]").view(np.int64)
        columns = zip(
            ordered["transaction_id"],
            stamps,
            ordered["card_id"],
            ordered["merchant_id"],
            ordered["amount"],
            labels,
            strict=True,
        )
        for tx_id, t, card, merchant, amount, label in columns:
            self.observe(Transaction(tx_id, int(t), card, merchant, float(amount)), is_fraud=bool(label == 1))
        return len(ordered)
