"""Tests of clients.features: a slow reference, no look-ahead, exact counts, invariances."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from clients.features import (
    FEATURE_VERSION,
    LOCAL_FEATURES,
    WINDOWS_DAYS,
    compute_local_features,
    window_stats,
)

DAY = pd.Timedelta(days=1)
FRAUD_RATES = [f"merchant_fraud_rate_{w}d" for w in WINDOWS_DAYS]


def random_transactions(*, rows=300, cards=15, merchants=8, days=40, seed=0, step_minutes=90):
    """Times on a coarse grid (many exact ties and exact window boundaries), some zero amounts."""
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, days * 24 * 60 // step_minutes, rows)
    amount = np.round(rng.lognormal(3.0, 1.0, rows), 2)
    amount[rng.random(rows) < 0.1] = 0.0
    frame = pd.DataFrame(
        {
            "transaction_id": np.arange(rows) + 1000,
            "timestamp": pd.Timestamp("2024-03-01") + pd.to_timedelta(slots * step_minutes, unit="min"),
            "card_id": [f"card-{c}" for c in rng.integers(0, cards, rows)],
            "merchant_id": rng.integers(0, merchants, rows),
            "amount": amount,
            "is_fraud": (rng.random(rows) < 0.2).astype(np.int8),
            "extra": rng.random(rows),
        }
    )
    frame.index = pd.Index(rng.permutation(rows) * 3 + 7, name="row")  # a non-default index
    return frame


def reference_features(frame, delay_days=7):
    """Plain per-row implementation of the feature definitions (slow, for comparison)."""
    ts = frame["timestamp"].to_numpy(dtype="datetime64[ns]")
    cards, merchants = frame["card_id"].to_numpy(), frame["merchant_id"].to_numpy()
    amounts = frame["amount"].to_numpy(dtype=float)
    fraud = frame["is_fraud"].to_numpy() if "is_fraud" in frame.columns else np.zeros(len(frame))
    pos = np.arange(len(frame))
    delay = np.timedelta64(delay_days, "D")
    out = []
    for i in range(len(frame)):
        t, stamp = ts[i], pd.Timestamp(ts[i])
        hour = stamp.hour + stamp.minute / 60 + stamp.second / 3600
        feats = {
            "log_amount": math.log1p(amounts[i]),
            "hour_sin": math.sin(2 * math.pi * hour / 24),
            "hour_cos": math.cos(2 * math.pi * hour / 24),
            "is_weekend": float(stamp.dayofweek >= 5),
            "is_night": float(hour < 6 or hour >= 22),
        }
        seen = (ts < t) | ((ts == t) & (pos <= i))  # earlier, or tied and not later in the input
        card = seen & (cards == cards[i])
        merchant = seen & (merchants == merchants[i])
        if delay_days > 0:
            labelled = (merchants == merchants[i]) & (ts <= t - delay)
        else:
            labelled = merchant & (pos != i)
        for w in WINDOWS_DAYS:
            in_window = ts > t - np.timedelta64(w, "D")
            window_amounts = amounts[card & in_window]
            mean = window_amounts.sum() / len(window_amounts)
            feats[f"card_count_{w}d"] = math.log1p(len(window_amounts))
            feats[f"card_mean_amount_{w}d"] = math.log1p(mean)
            feats[f"card_amount_ratio_{w}d"] = amounts[i] / mean if mean > 0 else 1.0
            feats[f"merchant_count_{w}d"] = math.log1p((merchant & in_window).sum())
            delayed = fraud[labelled & (ts > t - delay - np.timedelta64(w, "D"))]
            feats[f"merchant_fraud_rate_{w}d"] = delayed.sum() / len(delayed) if len(delayed) else 0.0
        out.append(feats)
    return pd.DataFrame(out, index=frame.index)[list(LOCAL_FEATURES)]


def assert_features_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert list(actual.columns) == list(expected.columns)
    for name in actual.columns:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def by_id(features, frame):
    return features.set_axis(frame["transaction_id"].to_numpy()).sort_index()


@pytest.mark.parametrize(("seed", "delay_days"), [(0, 7), (1, 2), (2, 0)])
def test_matches_reference(seed, delay_days):
    frame = random_transactions(seed=seed)
    assert frame["timestamp"].duplicated().sum() > 30  # ties are exercised
    actual = compute_local_features(frame, delay_days=delay_days)
    expected = reference_features(frame, delay_days=delay_days)
    assert_features_close(actual, expected)
    assert (actual[FRAUD_RATES] > 0).any().all()  # the fraud windows are not trivially empty


def test_output_names_dtype_and_index():
    frame = random_transactions(rows=50)
    features = compute_local_features(frame)
    assert FEATURE_VERSION == "local-v1"
    assert len(LOCAL_FEATURES) == 20 and len(set(LOCAL_FEATURES)) == 20
    assert tuple(features.columns) == LOCAL_FEATURES
    assert (features.dtypes == np.float32).all()
    assert features.index.equals(frame.index)
    assert np.isfinite(features.to_numpy()).all()


def hand_made():
    rows = [  # (timestamp, card, merchant, amount, fraud); 2024-01-01 is a Monday
        ("2024-01-01 00:00", "a", 1, 10.0, 1),
        ("2024-01-01 12:00", "a", 1, 20.0, 0),
        ("2024-01-02 00:00", "a", 2, 30.0, 0),
        ("2024-01-02 00:00", "a", 1, 60.0, 0),  # same time as the row above, later in the input
        ("2024-01-07 23:00", "b", 1, 5.0, 0),  # Sunday night
        ("2024-01-08 00:00", "b", 1, 0.0, 0),  # exactly 7 days after the fraud
        ("2024-01-09 00:00", "b", 1, 7.0, 0),
        ("2024-01-09 06:30", "c", 3, 0.0, 0),
    ]
    frame = pd.DataFrame(rows, columns=["timestamp", "card_id", "merchant_id", "amount", "is_fraud"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"]).astype("datetime64[ns]")
    frame.insert(0, "transaction_id", np.arange(len(frame)))
    return frame


def test_hand_made_exact_values():
    f = compute_local_features(hand_made(), delay_days=7)
    counts = np.expm1(f[[f"card_count_{w}d" for w in (1, 7)]].to_numpy()).round()
    np.testing.assert_array_equal(counts[:, 0], [1, 2, 2, 3, 1, 2, 1, 1])  # exactly-1-day-old rows drop out
    np.testing.assert_array_equal(counts[:, 1], [1, 2, 3, 4, 1, 2, 3, 1])
    mean_1d = np.expm1(f["card_mean_amount_1d"].to_numpy())
    np.testing.assert_allclose(mean_1d, [10, 15, 25, 110 / 3, 5, 2.5, 7, 0], rtol=1e-6)
    ratio = [1, 20 / 15, 30 / 25, 60 / (110 / 3), 1, 0, 1, 1]  # zero mean -> 1.0
    np.testing.assert_allclose(f["card_amount_ratio_1d"], ratio, rtol=1e-6)
    merchant_1d = np.expm1(f["merchant_count_1d"].to_numpy()).round()
    merchant_7d = np.expm1(f["merchant_count_7d"].to_numpy()).round()
    np.testing.assert_array_equal(merchant_1d, [1, 2, 1, 2, 1, 2, 1, 1])
    np.testing.assert_array_equal(merchant_7d, [1, 2, 1, 3, 4, 4, 3, 1])
    # labels become usable exactly 7 days later (inclusive boundary)
    np.testing.assert_allclose(f["merchant_fraud_rate_1d"], [0, 0, 0, 0, 0, 1, 0, 0])
    np.testing.assert_allclose(f["merchant_fraud_rate_7d"], [0, 0, 0, 0, 0, 1, 1 / 3, 0], rtol=1e-6)
    np.testing.assert_array_equal(f["is_weekend"], [0, 0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(f["is_night"], [1, 0, 1, 1, 1, 1, 1, 0])
    hour = np.array([0, 12, 0, 0, 23, 0, 0, 6.5])
    np.testing.assert_allclose(f["hour_sin"], np.sin(2 * np.pi * hour / 24), atol=1e-6)
    np.testing.assert_allclose(f["hour_cos"], np.cos(2 * np.pi * hour / 24), atol=1e-6)


def test_no_look_ahead_on_later_rows():
    frame = random_transactions(seed=3)
    cut = frame["timestamp"].quantile(0.6)
    before = compute_local_features(frame)
    later = frame["timestamp"] > cut
    changed = frame.copy()
    changed.loc[later, "amount"] = changed.loc[later, "amount"] * 7 + 1
    changed.loc[later, "is_fraud"] = 1 - changed.loc[later, "is_fraud"]
    changed.loc[later, "card_id"] = "card-0"
    extra = frame[later].assign(transaction_id=lambda d: d["transaction_id"] + 10_000)
    extra.index = extra.index + 100_000
    changed = pd.concat([changed, extra])
    after = compute_local_features(changed).loc[frame.index]
    early = ~later
    assert early.sum() > 100
    assert_features_close(after[early], before[early], rtol=1e-6, atol=0)
    assert not np.allclose(after[later], before[later])


def test_label_flip_visible_only_after_delay():
    delay = 7
    frame = random_transactions(seed=4)
    features = compute_local_features(frame, delay_days=delay)
    for idx in frame.index[frame["is_fraud"] == 1]:
        d, merchant = frame.at[idx, "timestamp"], frame.at[idx, "merchant_id"]
        seeing = (frame["merchant_id"] == merchant) & frame["timestamp"].between(
            d + delay * DAY, d + 37 * DAY
        )
        if seeing.any():
            break
    flipped = frame.copy()
    flipped.at[idx, "is_fraud"] = 0
    after = compute_local_features(flipped, delay_days=delay)
    before_ready = frame["timestamp"] < d + delay * DAY
    assert before_ready.sum() > 50
    pd.testing.assert_frame_equal(after[before_ready], features[before_ready])
    assert (after.loc[seeing, FRAUD_RATES] < features.loc[seeing, FRAUD_RATES]).any().any()
    others = [c for c in LOCAL_FEATURES if c not in FRAUD_RATES]
    pd.testing.assert_frame_equal(after[others], features[others])


def test_input_order_invariance():
    frame = random_transactions(seed=5)
    expected = by_id(compute_local_features(frame), frame)
    rng = np.random.default_rng(0)
    # Rows grouped by timestamp in random order, equal timestamps keeping their relative order.
    stamps = frame["timestamp"].unique()
    group_key = frame["timestamp"].map(dict(zip(stamps, rng.random(len(stamps)), strict=True)))
    regrouped = frame.iloc[np.lexsort((np.arange(len(frame)), group_key.to_numpy()))]
    assert_features_close(by_id(compute_local_features(regrouped), regrouped), expected, rtol=1e-6, atol=0)
    # Without ties any shuffle gives the same features.
    unique = frame.assign(timestamp=frame["timestamp"] + pd.to_timedelta(np.arange(len(frame)), unit="s"))
    shuffled = unique.sample(frac=1.0, random_state=1)
    assert_features_close(
        by_id(compute_local_features(shuffled), shuffled),
        by_id(compute_local_features(unique), unique),
        rtol=1e-6,
        atol=0,
    )


def test_missing_labels_give_zero_fraud_rates():
    frame = random_transactions(seed=6)
    with_labels = compute_local_features(frame)
    without = compute_local_features(frame.drop(columns="is_fraud"))
    assert (without[FRAUD_RATES] == 0).all().all()
    assert (with_labels[FRAUD_RATES] > 0).any().any()
    others = [c for c in LOCAL_FEATURES if c not in FRAUD_RATES]
    pd.testing.assert_frame_equal(without[others], with_labels[others])


def test_custom_keys_timezone_units_and_empty():
    frame = random_transactions(rows=80, seed=7)
    expected = compute_local_features(frame)
    renamed = frame.rename(columns={"card_id": "pan", "merchant_id": "mcc"})
    renamed["timestamp"] = renamed["timestamp"].astype("datetime64[us]")
    actual = compute_local_features(renamed, card_key="pan", merchant_key="mcc")
    pd.testing.assert_frame_equal(actual, expected)
    empty = compute_local_features(frame.iloc[:0])
    assert tuple(empty.columns) == LOCAL_FEATURES and len(empty) == 0
    with pytest.raises(KeyError):
        compute_local_features(frame.drop(columns="amount"))
    with pytest.raises(ValueError):
        compute_local_features(frame, delay_days=-1)


def test_window_stats_with_lag_and_ties():
    keys = np.array(["a", "a", "b", "a", "a", "a"])
    times = np.array([0, 1, 1, 2, 2, 5], dtype=np.int64)
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    count, total = window_stats(keys, times, values, window_ns=3)  # (t - 3, t], ties by row position
    np.testing.assert_array_equal(count, [1, 2, 1, 3, 4, 1])
    np.testing.assert_allclose(total, [1, 3, 3, 7, 12, 6])
    count, total = window_stats(keys, times, values, window_ns=3, lag_ns=1)  # (t - 4, t - 1]
    np.testing.assert_array_equal(count, [0, 1, 0, 2, 2, 2])
    np.testing.assert_allclose(total, [0, 1, 0, 3, 3, 9])
    stamps = np.datetime64("2024-01-01", "ns") + times.astype("timedelta64[s]")
    count_s, _ = window_stats(keys, stamps, values, window_ns=3 * 10**9, lag_ns=10**9)
    np.testing.assert_array_equal(count_s, count)
    count, total = window_stats(keys, times, values, window_ns=2**62, lag_ns=2**62)  # no overflow
    assert (count == 0).all() and (total == 0).all()
    with pytest.raises(ValueError):
        window_stats(keys, times, values, window_ns=0)


def test_window_sums_keep_precision_after_large_totals():
    keys = np.array([1, 1, 1, 2])
    times = np.array([0, 100, 101, 102])
    values = np.array([3e12, 0.01, 0.02, 1e-3])
    _, total = window_stats(keys, times, values, window_ns=50)
    np.testing.assert_allclose(total, [3e12, 0.01, 0.03, 1e-3], rtol=1e-12)
