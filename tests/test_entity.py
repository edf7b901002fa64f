"""Tests of clients.entity: keyed bucketing, additive local tables, consortium features without look-ahead."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from clients.entity import (
    CONSORTIUM_FEATURES,
    EntityTableSpec,
    bucket_ids,
    collision_report,
    consortium_features,
    local_table,
)

KEY = b"consortium-key-1"
START = pd.Timestamp("2024-03-01")
COUNTS = [f"consortium_count_{w}d" for w in (1, 7, 30)]
RATES = [f"consortium_fraud_rate_{w}d" for w in (1, 7, 30)]


def tx(rows):
    """Frame from (day, hour, merchant, is_fraud) tuples."""
    day, hour, merchant, fraud = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "timestamp": START + pd.to_timedelta(np.array(day) * 24 + np.array(hour), unit="h"),
            "merchant_id": list(merchant),
            "is_fraud": np.array(fraud, dtype=np.int8),
        }
    )


def random_frame(*, rows=600, merchants=12, days=45, seed=0):
    rng = np.random.default_rng(seed)
    minutes = rng.integers(0, days * 24 * 60, rows)
    frame = pd.DataFrame(
        {
            "timestamp": START + pd.to_timedelta(minutes, unit="min"),
            "merchant_id": [f"m{m}" for m in rng.integers(0, merchants, rows)],
            "is_fraud": (rng.random(rows) < 0.2).astype(np.int8),
            "bank": rng.integers(0, 3, rows),
        }
    )
    frame.index = pd.Index(rng.permutation(rows) * 2 + 5)
    return frame


def bucket_of(merchant, buckets=256, key=KEY):
    return int(bucket_ids(pd.Series([merchant]), key=key, buckets=buckets)[0])


# --- spec and bucketing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"buckets": 100}, "buckets"),
        ({"buckets": 2**7}, "buckets"),
        ({"buckets": 2**23}, "buckets"),
        ({"days": 0}, "days"),
        ({"delay_days": 0}, "delay_days"),
        ({"start": "not a date"}, "start"),
    ],
)
def test_spec_validation(kwargs, field):
    args = {"start": "2024-03-01", "days": 10, **kwargs}
    with pytest.raises(ValueError, match=field):
        EntityTableSpec(**args)


def test_bucket_ids_keyed_and_deterministic():
    ids = pd.Series([f"merchant-{i}" for i in range(500)] * 2)
    a = bucket_ids(ids, key=KEY, buckets=2**10)
    assert a.dtype == np.int64 and a.shape == (1000,)
    assert ((a >= 0) & (a < 2**10)).all()
    np.testing.assert_array_equal(a, bucket_ids(ids, key=KEY, buckets=2**10))
    np.testing.assert_array_equal(a[:500], a[500:])  # same id -> same bucket
    other = bucket_ids(ids, key=b"another-key", buckets=2**10)
    assert (a != other).mean() > 0.9
    ints = bucket_ids(pd.Series([7, 8, 7, 123456789]), key=KEY, buckets=2**10)
    assert ints[0] == ints[2] and ((ints >= 0) & (ints < 2**10)).all()
    strs = bucket_ids(pd.Series(["7", "8"]), key=KEY, buckets=2**10)
    np.testing.assert_array_equal(ints[:2], strs)  # ids are stringified before hashing


def test_bucket_ids_rejects_bad_input():
    with pytest.raises(ValueError, match="key"):
        bucket_ids(pd.Series(["a"]), key=b"", buckets=256)
    with pytest.raises(ValueError, match="buckets"):
        bucket_ids(pd.Series(["a"]), key=KEY, buckets=3)
    with pytest.raises(ValueError, match="missing"):
        bucket_ids(pd.Series(["a", None]), key=KEY, buckets=256)


def test_collision_report_known_collisions():
    one = collision_report(pd.Series(["a", "b", "c", "a"]), key=KEY, buckets=1)
    assert one["entities"] == 3 and one["occupied_buckets"] == 1 and one["shared_share"] == 1.0
    values = pd.Series([f"e{i}" for i in range(20)])
    report = collision_report(values, key=KEY, buckets=8)  # 20 entities in 8 buckets: collisions certain
    per_bucket = Counter(bucket_ids(values, key=KEY, buckets=8).tolist())
    assert report["entities"] == 20
    assert report["occupied_buckets"] == len(per_bucket)
    assert report["shared_share"] == sum(n for n in per_bucket.values() if n > 1) / 20
    assert report["shared_share"] > 0
    big = collision_report(pd.Series(range(10)), key=KEY, buckets=2**22)
    assert big["occupied_buckets"] == 10 and big["shared_share"] == 0.0


# --- local tables --------------------------------------------------------------------------------------


def test_local_table_exact_counts():
    spec = EntityTableSpec(start="2024-03-01", days=10, buckets=256, delay_days=2)
    frame = tx(
        [
            (0, 1, "A", 1),
            (0, 23, "A", 0),
            (1, 5, "A", 1),
            (3, 2, "B", 1),
            (9, 4, "B", 1),  # label newer than as_of - delay: counted, fraud not
            (-1, 3, "A", 1),  # before the window
            (10, 0, "B", 1),  # after the window
        ]
    )
    table = local_table(frame, spec, key=KEY)
    a, b = bucket_of("A"), bucket_of("B")
    assert a != b
    assert table.shape == (2, 10, 256) and table.dtype == np.float64
    expected = np.zeros((2, 10, 256))
    expected[0, 0, a], expected[0, 1, a], expected[0, 3, b], expected[0, 9, b] = 2, 1, 1, 1
    expected[1, 0, a], expected[1, 1, a], expected[1, 3, b] = 1, 1, 1
    np.testing.assert_array_equal(table, expected)
    early = local_table(frame, spec, key=KEY, as_of=START + pd.Timedelta(days=3, hours=12))
    assert early[1].sum() == 2 and early[1, 1, a] == 1 and early[1, 3, b] == 0  # day 3 > 3 - 2
    np.testing.assert_array_equal(early[0], expected[0])
    unlabelled = local_table(frame.drop(columns="is_fraud"), spec, key=KEY)
    np.testing.assert_array_equal(unlabelled[0], expected[0])
    assert not unlabelled[1].any()


def test_local_tables_are_additive():
    frame = random_frame()
    spec = EntityTableSpec(start="2024-03-01", days=40, buckets=256)
    pooled = local_table(frame, spec, key=KEY)
    summed = sum(local_table(part, spec, key=KEY) for _, part in frame.groupby("bank"))
    np.testing.assert_array_equal(summed, pooled)
    assert pooled[0].sum() == ((frame["timestamp"] - START).dt.days < 40).sum()


# --- consortium features -------------------------------------------------------------------------------


def test_consortium_features_hand_example():
    spec = EntityTableSpec(start="2024-03-01", days=20, buckets=256, delay_days=2)
    table = np.zeros((2, 20, 256))
    a = bucket_of("A")
    table[0, 5, a], table[1, 5, a] = 4, 1
    table[0, 7, a], table[1, 7, a] = 2, 2
    table[0, 9, a] = 3
    rows = tx([(10, 3, "A", 0), (9, 0, "A", 0), (8, 0, "A", 0), (11, 0, "B", 0)])
    out = consortium_features(rows, table, spec, key=KEY)
    assert list(out.columns) == list(CONSORTIUM_FEATURES)
    assert (out.dtypes == np.float32).all() and out.index.equals(rows.index)
    log = math.log1p
    # day 10: counts over days 9 | 3..9 | 0..9; rates over days 8 | 2..8 | 0..8 (delay 2)
    np.testing.assert_allclose(out.iloc[0], [log(3), log(9), log(9), 0.0, 3 / 6, 3 / 6], rtol=1e-6)
    # day 9: counts over 8 | 2..8 | 0..8; rates over 7 | 1..7 | 0..7
    np.testing.assert_allclose(out.iloc[1], [0.0, log(6), log(6), 1.0, 0.5, 0.5], rtol=1e-6)
    # day 8: counts over 7 | 1..7; rates over 6 | 0..6
    np.testing.assert_allclose(out.iloc[2], [log(2), log(6), log(6), 0.0, 0.25, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(out.iloc[3], np.zeros(6))  # another merchant sees nothing


def test_no_look_ahead_for_labels():
    frame = random_frame(seed=1)
    spec = EntityTableSpec(start="2024-03-01", days=45, buckets=256, delay_days=7)
    base = consortium_features(frame, local_table(frame, spec, key=KEY), spec, key=KEY)
    day = (frame["timestamp"] - START).dt.days.to_numpy()
    flip_at = frame.index[(day == 20)][0]
    flipped = frame.copy()
    flipped.loc[flip_at, "is_fraud"] = 1 - flipped.loc[flip_at, "is_fraud"]
    after = consortium_features(flipped, local_table(flipped, spec, key=KEY), spec, key=KEY)
    before = day < 20 + 7
    pd.testing.assert_frame_equal(base[before], after[before])
    same_merchant = (frame["merchant_id"] == frame.loc[flip_at, "merchant_id"]).to_numpy()
    assert not np.allclose(
        base.loc[~before & same_merchant, RATES], after.loc[~before & same_merchant, RATES]
    )


def test_no_look_ahead_for_counts():
    frame = random_frame(seed=2)
    spec = EntityTableSpec(start="2024-03-01", days=45, buckets=256, delay_days=3)
    day = (frame["timestamp"] - START).dt.days.to_numpy()
    base = consortium_features(frame, local_table(frame, spec, key=KEY), spec, key=KEY)
    extra = tx([(15, h, m, 1) for h in range(5) for m in ("m1", "m2", "m3")])
    extra["bank"] = 0
    bigger = pd.concat([frame, extra.set_index(pd.RangeIndex(10**6, 10**6 + len(extra)))])
    table = local_table(bigger, spec, key=KEY)
    after = consortium_features(frame, table, spec, key=KEY)
    pd.testing.assert_frame_equal(base[day <= 15], after[day <= 15])
    assert not base[day == 16].equals(after[day == 16])


def reference_rates_and_counts(frame, delay_days):
    """Plain per-row day-granular reference on the pooled frame (slow)."""
    days = (frame["timestamp"] - START).dt.days.to_numpy()
    merchants = frame["merchant_id"].to_numpy()
    fraud = frame["is_fraud"].to_numpy()
    out = []
    for i in range(len(frame)):
        d, same = days[i], merchants == merchants[i]
        row = {}
        for w in (1, 7, 30):
            past = same & (days >= d - w) & (days <= d - 1)
            row[f"consortium_count_{w}d"] = math.log1p(past.sum())
            labelled = same & (days >= d - delay_days - w + 1) & (days <= d - delay_days)
            n = labelled.sum()
            row[f"consortium_fraud_rate_{w}d"] = fraud[labelled].sum() / n if n else 0.0
        out.append(row)
    return pd.DataFrame(out, index=frame.index)[list(CONSORTIUM_FEATURES)]


def test_matches_pooled_reference_without_collisions():
    frame = random_frame(rows=500, merchants=15, days=40, seed=3)
    spec = EntityTableSpec(start="2024-03-01", days=40, buckets=2**12, delay_days=7)
    assert collision_report(frame["merchant_id"], key=KEY, buckets=spec.buckets)["shared_share"] == 0.0
    table = sum(local_table(part, spec, key=KEY) for _, part in frame.groupby("bank"))
    banks_rows = frame[frame["bank"] == 1]
    out = consortium_features(banks_rows, table, spec, key=KEY)
    expected = reference_rates_and_counts(frame, 7).loc[banks_rows.index]
    np.testing.assert_allclose(out.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-6)
    assert out[RATES].to_numpy().max() > 0


def test_noisy_table_post_processing():
    spec = EntityTableSpec(start="2024-03-01", days=40, buckets=256, delay_days=7)
    frame = random_frame(days=40, seed=4)
    rng = np.random.default_rng(0)
    noisy = local_table(frame, spec, key=KEY) + rng.normal(0.0, 3.0, (2, 40, 256))
    assert (noisy < 0).any() and (noisy[1] > noisy[0]).any()
    out = consortium_features(frame, noisy, spec, key=KEY)
    values = out.to_numpy()
    assert np.isfinite(values).all()
    assert (out[COUNTS].to_numpy() >= 0).all()
    assert ((out[RATES].to_numpy() >= 0) & (out[RATES].to_numpy() <= 1)).all()
    all_negative = np.full((2, 40, 256), -5.0)
    np.testing.assert_array_equal(consortium_features(frame, all_negative, spec, key=KEY).to_numpy(), 0.0)
    with pytest.raises(ValueError, match="shape"):
        consortium_features(frame, noisy[:, :10], spec, key=KEY)
    noisy[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        consortium_features(frame, noisy, spec, key=KEY)


def test_missing_entity_column_named():
    spec = EntityTableSpec(start="2024-03-01", days=5, buckets=256, column="device_id")
    with pytest.raises(ValueError, match="device_id"):
        local_table(tx([(0, 0, "A", 0)]), spec, key=KEY)


def test_window_sums_of_unclipped_noise_keep_fraud_rates_nearly_unbiased():
    spec = EntityTableSpec(start="2024-03-01", days=40, buckets=256, delay_days=7)
    frame = random_frame(rows=20_000, days=40, seed=5)
    frame["is_fraud"] = (np.random.default_rng(2).random(len(frame)) < 0.01).astype(int)  # a realistic rate
    exact = local_table(frame, spec, key=KEY)
    noisy = exact + np.random.default_rng(1).normal(0.0, 2.0, exact.shape)
    per_cell = noisy.copy()  # what clipping every cell before summing windows would publish
    per_cell[0] = np.clip(per_cell[0], 0.0, None)
    per_cell[1] = np.clip(per_cell[1], 0.0, per_cell[0])
    rate = "consortium_fraud_rate_30d"
    truth = consortium_features(frame, exact, spec, key=KEY)[rate].mean()
    unbiased = consortium_features(frame, noisy, spec, key=KEY)[rate].mean()
    biased = consortium_features(frame, per_cell, spec, key=KEY)[rate].mean()
    assert abs(unbiased - truth) < (biased - truth) / 3
