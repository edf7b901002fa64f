"""Online (incremental) features equal the batch features on the same history, delayed labels included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clients.entity import EntityTableSpec, consortium_features, local_table
from clients.features import compute_local_features
from clients.online import OnlineFeatures, Transaction, timestamp_ns
from models.feature_names import CONSORTIUM_FEATURES, LOCAL_FEATURES

KEY = b"online-test-key"


def history(*, rows=1500, cards=25, merchants=10, days=50, seed=0, step_minutes=60):
    """Time-ordered rows on a coarse grid: many exact ties and rows exactly on window and delay boundaries."""
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.integers(0, days * 24 * 60 // step_minutes, rows))
    amount = np.round(rng.lognormal(3.0, 1.0, rows), 2)
    amount[rng.random(rows) < 0.05] = 0.0
    return pd.DataFrame(
        {
            "transaction_id": np.arange(rows) + 10,
            "timestamp": pd.Timestamp("2024-03-01") + pd.to_timedelta(slots * step_minutes, unit="min"),
            "card_id": [f"c{c}" for c in rng.integers(0, cards, rows)],
            "merchant_id": rng.integers(0, merchants, rows),
            "amount": amount,
            "is_fraud": (rng.random(rows) < 0.15).astype(np.int8),
        }
    )


def online_matrix(frame, state):
    """Score every row from the state, then observe it with its label (what a bank's online path does)."""
    out = np.empty((len(frame), len(state.names)), dtype=np.float32)
    for i, row in enumerate(frame.itertuples(index=False)):
        tx = Transaction(row.transaction_id, row.timestamp, row.card_id, row.merchant_id, row.amount)
        out[i] = state.features(tx)
        state.observe(tx, is_fraud=bool(row.is_fraud))
    return out


@pytest.mark.parametrize("delay_days", [0, 1, 7])
def test_online_features_equal_batch_features(delay_days):
    frame = history(seed=delay_days)
    batch = compute_local_features(frame, delay_days=delay_days)[list(LOCAL_FEATURES)].to_numpy()
    online = online_matrix(frame, OnlineFeatures(delay_days=delay_days))
    np.testing.assert_allclose(online, batch, rtol=2e-6, atol=1e-6)
    # the label-delay rule is exercised: many fraud rates are non-zero
    rates = [LOCAL_FEATURES.index(f"merchant_fraud_rate_{w}d") for w in (1, 7, 30)]
    assert (online[:, rates] > 0).mean() > 0.3


def test_state_stays_bounded_and_equal_after_pruning():
    # 120 days of a few busy keys: entries older than the 30-day (+ delay) windows are dropped and compacted
    frame = history(rows=6000, cards=3, merchants=2, days=120, seed=4, step_minutes=20)
    state = OnlineFeatures(delay_days=7)
    online = online_matrix(frame, state)
    batch = compute_local_features(frame, delay_days=7)[list(LOCAL_FEATURES)].to_numpy()
    np.testing.assert_allclose(online, batch, rtol=2e-6, atol=1e-6)
    kept = max(len(t.times) - t.head for t in state.merchants.values())
    assert kept < 6000 / 2 * (37 / 120) * 1.5  # about 37 of 120 days of the busiest merchant
    assert all(len(t.times) < 3000 for t in state.cards.values())


def test_late_fraud_label_counts_like_a_label_in_the_history():
    frame = history(seed=9)
    labelled = online_matrix(frame, OnlineFeatures(delay_days=3))
    late = OnlineFeatures(delay_days=3)
    out = np.empty_like(labelled)
    pending = []
    for i, row in enumerate(frame.itertuples(index=False)):
        t = timestamp_ns(row.timestamp)
        while pending and pending[0][1] <= t - 3 * 86_400 * 10**9:  # labels arrive exactly at the delay
            late.record_fraud(*pending.pop(0))
        tx = Transaction(row.transaction_id, row.timestamp, row.card_id, row.merchant_id, row.amount)
        out[i] = late.features(tx)
        late.observe(tx)  # label unknown when the transaction happens
        if row.is_fraud:
            pending.append((row.merchant_id, t))
    np.testing.assert_array_equal(out, labelled)


def test_consortium_features_online_equal_the_published_table_features():
    frame = history(seed=3, days=40)
    spec = EntityTableSpec(start="2024-03-01", days=41, buckets=256, delay_days=7)
    table = local_table(frame, spec, key=KEY) + np.random.default_rng(0).normal(0, 0.5, (2, 41, 256))
    batch = np.hstack(
        [
            compute_local_features(frame, delay_days=7)[list(LOCAL_FEATURES)].to_numpy(),
            consortium_features(frame, table, spec, key=KEY).to_numpy(),
        ]
    )
    state = OnlineFeatures(delay_days=7, consortium=(table, spec, KEY))
    assert state.names == LOCAL_FEATURES + CONSORTIUM_FEATURES
    np.testing.assert_allclose(online_matrix(frame, state), batch, rtol=2e-6, atol=1e-6)


def test_warm_up_then_score_equals_batch_on_the_last_rows():
    frame = history(seed=5)
    batch = compute_local_features(frame, delay_days=7)[list(LOCAL_FEATURES)].to_numpy()
    state = OnlineFeatures(delay_days=7)
    assert state.warm_up(frame.iloc[:1200]) == 1200
    np.testing.assert_allclose(online_matrix(frame.iloc[1200:], state), batch[1200:], rtol=2e-6, atol=1e-6)


def test_out_of_order_transaction_is_refused_and_state_unchanged():
    state = OnlineFeatures(delay_days=7)
    state.observe(Transaction("a", "2024-03-02 10:00", "card", "m", 10.0))
    with pytest.raises(ValueError, match=r"'b' .* older than its card's latest"):
        state.features(Transaction("b", "2024-03-02 09:00", "card", "other", 5.0))
    assert len(state.cards["card"].times) == 1


def test_timestamps_in_any_form_mean_the_same_instant():
    ns = timestamp_ns("2024-03-02 10:00:00+01:00")
    assert (
        ns
        == timestamp_ns(pd.Timestamp("2024-03-02 09:00"))
        == timestamp_ns(np.datetime64("2024-03-02T09:00"))
    )
    assert timestamp_ns(ns) == ns
    with pytest.raises(ValueError, match="missing"):
        timestamp_ns(None)
    with pytest.raises(KeyError, match="amount"):
        Transaction.of({"transaction_id": 1, "timestamp": ns, "card_id": 1, "merchant_id": 2})
