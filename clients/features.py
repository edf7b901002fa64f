"""Local fraud feature engineering: time-of-day, per-card and per-merchant rolling windows.

Every feature of a row is computed from the given rows only, without look-ahead:

* Rows are ordered by ``(key, time, input position)``.  A row's window ending "now" covers the rows
  of its key at or before it in that order, so among rows with an identical timestamp a row sees
  those earlier in the input but never a later one (the tie-break is the original row position).
* A lagged window ``(t - lag - window, t - lag]`` with ``lag > 0`` includes every row whose time is
  ``<= t - lag`` (inclusive boundary); such rows are all strictly older than the current row.
* Merchant fraud rates only use labels at least ``delay_days`` old (labels arrive late).  With
  ``delay_days == 0`` the current row's own label is still never used: the window then ends just
  before the current row in the order above.

The implementation is vectorized: one sort per key, ``searchsorted`` for the window starts/ends and
prefix sums for counts and sums (split into an exact high part and a small low part so that window
sums do not lose precision to large running totals).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import numpy.typing as npt
import pandas as pd

from models.feature_names import FEATURE_VERSION, LOCAL_FEATURES, WINDOWS_DAYS

__all__ = ["FEATURE_VERSION", "LOCAL_FEATURES", "WINDOWS_DAYS", "compute_local_features", "window_stats"]
logger = logging.getLogger(__name__)


NS_PER_SECOND = 1_000_000_000
NS_PER_HOUR = 3600 * NS_PER_SECOND
NS_PER_DAY = 24 * NS_PER_HOUR
_MAX_RANGE_NS = 2**62
_INT64_SAFE = 2**62
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday == 0)
_NIGHT_END_HOUR = 6
_NIGHT_START_HOUR = 22


def _times_to_ns(times: np.ndarray) -> np.ndarray:
    """Return `times` (datetime64 of any unit, or integer nanoseconds) as int64 nanoseconds."""
    arr = np.asarray(times)
    if np.issubdtype(arr.dtype, np.datetime64):
        arr = arr.astype("datetime64[ns]")
        if np.isnat(arr).any():
            raise ValueError("times contain NaT")
        return arr.view(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"times must be datetime64 or integer nanoseconds, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class _TimeAxis:
    """Times rebased to their minimum and dense-ranked, shared by every key index on the same rows."""

    def __init__(self, times_ns: np.ndarray) -> None:
        self.n = len(times_ns)
        self._cache: dict[int, np.ndarray] = {}
        if self.n == 0:
            self.unique = np.zeros(0, dtype=np.int64)
            self.rank = np.zeros(0, dtype=np.int64)
            self.range_ns = 0
            return
        t_min, t_max = int(times_ns.min()), int(times_ns.max())
        self.range_ns = t_max - t_min
        if self.range_ns >= _MAX_RANGE_NS:
            raise ValueError(f"time range of {self.range_ns} ns is too large")
        rel = times_ns - np.int64(t_min)
        order = np.argsort(rel)
        rel_sorted = rel[order]
        is_new = np.empty(self.n, dtype=bool)
        is_new[0] = True
        np.not_equal(rel_sorted[1:], rel_sorted[:-1], out=is_new[1:])
        self.unique = rel_sorted[is_new]
        self.rank = np.empty(self.n, dtype=np.int64)
        self.rank[order] = np.cumsum(is_new) - 1

    def first_rank_after(self, offset_ns: int) -> np.ndarray:
        """For each unique time u, the rank of the first unique time strictly greater than u - offset."""
        offset = min(int(offset_ns), self.range_ns + 1)  # a longer offset is equivalent and cannot overflow
        if offset not in self._cache:
            self._cache[offset] = np.searchsorted(self.unique, self.unique - np.int64(offset), side="right")
        return self._cache[offset]


class _WindowIndex:
    """Rows of one key column sorted by (key, time, position), answering window bounds and sums."""

    def __init__(self, keys: np.ndarray | pd.Series | pd.Index, axis: _TimeAxis) -> None:
        codes, uniques = pd.factorize(keys, use_na_sentinel=False)
        self.axis = axis
        self.span = len(axis.unique) + 1
        if len(uniques) * self.span >= _INT64_SAFE:
            raise ValueError("too many distinct keys and times for an int64 sort key")
        combined = codes.astype(np.int64) * np.int64(self.span) + axis.rank
        self.order = np.argsort(combined, kind="stable")  # stable: ties keep input-row order
        self.combined = combined[self.order]
        self.code_base = self.combined - axis.rank[self.order]
        self.rank_sorted = axis.rank[self.order]
        self._cache: dict[int, np.ndarray] = {}

    def _first_row_after(self, offset_ns: int) -> np.ndarray:
        """Sorted position of the first row of the same key with time > t - offset, for each sorted row."""
        if offset_ns not in self._cache:
            threshold = self.axis.first_rank_after(offset_ns)[self.rank_sorted]
            self._cache[offset_ns] = np.searchsorted(self.combined, self.code_base + threshold, side="left")
        return self._cache[offset_ns]

    def bounds(
        self, window_ns: int, lag_ns: int = 0, *, include_self: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sorted-order [start, end) of each row's window (t - lag - window, t - lag]."""
        if window_ns <= 0 or lag_ns < 0:
            raise ValueError(f"need window_ns > 0 and lag_ns >= 0, got {window_ns} and {lag_ns}")
        start = self._first_row_after(lag_ns + window_ns)
        if lag_ns > 0:
            end = self._first_row_after(lag_ns)
        else:
            end = np.arange(self.axis.n, dtype=np.int64) + int(include_self)
        return start, np.maximum(end, start)

    def scatter(self, sorted_values: np.ndarray, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """Return values given in sorted order back in input-row order."""
        out: np.ndarray = np.empty(len(sorted_values), dtype=dtype)
        out[self.order] = sorted_values
        return out


def _exact_prefix_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums (leading 0) of a high part that sums exactly and a tiny low part; their sum is values."""
    total = float(np.abs(values).sum())
    exponent = int(np.frexp(total)[1]) if total > 0 else 0
    quantum = np.ldexp(1.0, exponent - 50)  # partial sums of `high` stay below 2**53 quanta: exact
    high = np.round(values / quantum) * quantum
    low = values - high
    prefix_high = np.zeros(len(values) + 1)
    prefix_low = np.zeros(len(values) + 1)
    np.cumsum(high, out=prefix_high[1:])
    np.cumsum(low, out=prefix_low[1:])
    return prefix_high, prefix_low


def _window_sums(prefix: tuple[np.ndarray, np.ndarray], start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Sum over sorted positions [start, end) from the split prefix sums."""
    high, low = prefix
    return (high[end] - high[start]) + (low[end] - low[start])


def window_stats(
    keys: np.ndarray, times: np.ndarray, values: np.ndarray, *, window_ns: int, lag_ns: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, count and sum of `values` over rows of the same key with time in (t - lag - window, t - lag], in input-row terms."""  # noqa: E501
    times_ns = _times_to_ns(times)
    vals = np.asarray(values, dtype=np.float64)
    if not len(keys) == len(times_ns) == len(vals):
        raise ValueError("keys, times and values must have the same length")
    if not np.isfinite(vals).all():
        raise ValueError("values must be finite")
    # Rows are ordered by (key, time, input position): with lag_ns == 0 a row counts the rows of its key
    # with an equal timestamp only up to itself in input order; with lag_ns > 0 all rows at t - lag count.
    key_values = keys if isinstance(keys, pd.Series | pd.Index) else np.asarray(keys)
    index = _WindowIndex(key_values, _TimeAxis(times_ns))
    start, end = index.bounds(int(window_ns), int(lag_ns))
    sums = _window_sums(_exact_prefix_sums(vals[index.order]), start, end)
    return index.scatter(end - start, np.int64), index.scatter(sums, np.float64)


def _time_features(times_ns: np.ndarray, amount: np.ndarray) -> dict[str, np.ndarray]:
    """Amount and calendar features: log amount, cyclic hour of day, weekend and night flags."""
    ns_of_day = np.mod(times_ns, NS_PER_DAY)
    hour = ns_of_day / NS_PER_HOUR  # fractional hour, minutes and seconds included
    angle = 2.0 * np.pi * hour / 24.0
    weekday = np.mod(np.floor_divide(times_ns, NS_PER_DAY) + _EPOCH_WEEKDAY, 7)
    night = (hour < _NIGHT_END_HOUR) | (hour >= _NIGHT_START_HOUR)
    return {
        "log_amount": np.log1p(amount),
        "hour_sin": np.sin(angle),
        "hour_cos": np.cos(angle),
        "is_weekend": (weekday >= 5).astype(np.float64),
        "is_night": night.astype(np.float64),
    }


def _card_features(index: _WindowIndex, amount: np.ndarray) -> dict[str, np.ndarray]:
    """Per-card log count, log mean amount and amount-to-mean ratio over each window, current row included."""
    amount_sorted = amount[index.order]
    prefix = _exact_prefix_sums(amount_sorted)
    out: dict[str, np.ndarray] = {}
    for w in WINDOWS_DAYS:
        start, end = index.bounds(w * NS_PER_DAY)
        count = end - start
        mean = _window_sums(prefix, start, end) / count
        safe_mean = np.where(mean > 0, mean, 1.0)
        ratio = np.where(mean > 0, amount_sorted / safe_mean, 1.0)
        out[f"card_count_{w}d"] = index.scatter(np.log1p(count))
        out[f"card_mean_amount_{w}d"] = index.scatter(np.log1p(mean))
        out[f"card_amount_ratio_{w}d"] = index.scatter(ratio)
    return out


def _merchant_features(
    index: _WindowIndex, fraud: np.ndarray | None, delay_days: int
) -> dict[str, np.ndarray]:
    """Per-merchant log count over each window and fraud rate over that window delayed by the label delay."""
    prefix = _exact_prefix_sums(fraud[index.order]) if fraud is not None else None
    out: dict[str, np.ndarray] = {}
    for w in WINDOWS_DAYS:
        start, end = index.bounds(w * NS_PER_DAY)
        out[f"merchant_count_{w}d"] = index.scatter(np.log1p(end - start))
        if prefix is None:
            out[f"merchant_fraud_rate_{w}d"] = np.zeros(index.axis.n, dtype=np.float32)
            continue
        d_start, d_end = index.bounds(w * NS_PER_DAY, int(delay_days * NS_PER_DAY), include_self=False)
        d_count = d_end - d_start
        frauds = _window_sums(prefix, d_start, d_end)
        rate = np.divide(frauds, d_count, out=np.zeros(len(d_count)), where=d_count > 0)
        out[f"merchant_fraud_rate_{w}d"] = index.scatter(rate)
    return out


def _frame_times_ns(column: pd.Series) -> np.ndarray:
    """Timestamps of a frame column as int64 nanoseconds (timezone-aware values are taken in UTC)."""
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        column = column.dt.tz_convert(None)
    return _times_to_ns(column.to_numpy())


def compute_local_features(
    frame: pd.DataFrame, *, delay_days: int = 7, card_key: str = "card_id", merchant_key: str = "merchant_id"
) -> pd.DataFrame:
    """Compute the local features of every row from the given rows only (no look-ahead); float32, index aligned with the input."""  # noqa: E501
    missing = [c for c in ("timestamp", "amount", card_key, merchant_key) if c not in frame.columns]
    if missing:
        raise KeyError(f"missing columns for feature engineering: {missing}")
    if delay_days < 0:
        raise ValueError(f"delay_days must be >= 0, got {delay_days}")
    started = time.perf_counter()
    times_ns = _frame_times_ns(frame["timestamp"])
    amount = frame["amount"].to_numpy(dtype=np.float64)
    fraud = frame["is_fraud"].to_numpy(dtype=np.float64) if "is_fraud" in frame.columns else None
    axis = _TimeAxis(times_ns)
    features = _time_features(times_ns, amount)
    features.update(_card_features(_WindowIndex(frame[card_key], axis), amount))
    features.update(_merchant_features(_WindowIndex(frame[merchant_key], axis), fraud, delay_days))
    matrix = np.empty((len(LOCAL_FEATURES), len(frame)), dtype=np.float32)
    for row, name in enumerate(LOCAL_FEATURES):
        matrix[row] = features[name]
    # The transpose is a column-major view: pandas keeps it as one float32 block without copying.
    result = pd.DataFrame(matrix.T, columns=list(LOCAL_FEATURES), index=frame.index, copy=False)
    logger.debug(
        "computed %d local features for %d rows in %.2fs",
        len(LOCAL_FEATURES),
        len(frame),
        time.perf_counter() - started,
    )
    return result
