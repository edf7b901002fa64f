import math

import numpy as np
import pandas as pd
import pytest

from models.metrics import (
    METRIC_KEYS,
    average_precision,
    card_precision_at_k,
    fraud_metrics,
    recall_at_fpr,
    roc_auc,
)

# Six transactions, already in decreasing score order: labels 1 0 1 0 0 1.
LABELS6 = np.array([1, 0, 1, 0, 0, 1])
SCORES6 = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])


def test_average_precision_by_hand():
    # Precision at each positive, walking down the ranking: 1/1 (rank 1), 2/3 (rank 3), 3/6 (rank 6).
    # AP = (1 + 2/3 + 1/2) / 3 = 13/18.
    assert average_precision(LABELS6, SCORES6) == pytest.approx(13 / 18)


def test_roc_auc_by_hand():
    # Positives 0.9, 0.7, 0.4 against negatives 0.8, 0.6, 0.5: 0.9 beats 3, 0.7 beats 2, 0.4 beats 0 -> 5/9.
    assert roc_auc(LABELS6, SCORES6) == pytest.approx(5 / 9)


def test_roc_auc_counts_ties_as_half():
    # One positive and one negative with equal scores: the single pair is a tie -> 0.5.
    assert roc_auc([0, 1], [0.3, 0.3]) == pytest.approx(0.5)


# Negatives 0.95, 0.5, 0.3, 0.1; positives 0.9, 0.8, 0.6, 0.2.
# Threshold >= 0.95: TPR 0, FPR 1/4 (the top-scored transaction is a false alarm)
#           >= 0.6 : TPR 3/4, FPR 1/4
#           >= 0.5 : TPR 3/4, FPR 2/4
#           >= 0.2 : TPR 4/4, FPR 3/4
RF_LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
RF_SCORES = np.array([0.95, 0.5, 0.3, 0.1, 0.9, 0.8, 0.6, 0.2])


@pytest.mark.parametrize(
    ("fpr", "expected"), [(0.2, 0.0), (0.25, 0.75), (0.5, 0.75), (0.75, 1.0), (1.0, 1.0)]
)
def test_recall_at_fpr_by_hand(fpr, expected):
    assert recall_at_fpr(RF_LABELS, RF_SCORES, fpr=fpr) == pytest.approx(expected)


def test_recall_at_default_one_percent_fpr():
    # 200 negatives, one of them ranked above every positive: FPR 1/200 = 0.5% <= 1% at every threshold
    # below it, so all 10 positives (ranked next) are recalled; a second top negative still fits (1%).
    labels = np.r_[np.zeros(200, dtype=int), np.ones(10, dtype=int)]
    scores = np.r_[np.linspace(0.0, 0.5, 200), np.linspace(0.6, 0.7, 10)]
    scores[0] = 0.99
    assert recall_at_fpr(labels, scores) == pytest.approx(1.0)
    scores[1], scores[2] = 0.98, 0.97  # three negatives on top: FPR 1.5% before any positive
    assert recall_at_fpr(labels, scores) == pytest.approx(0.0)


# Day 1: card A has transactions (0.9, legit) and (0.1, fraud) -> card score 0.9, fraudulent that day;
#        card B (0.8, legit) -> 0.8, legit; card C (0.3, fraud) -> 0.3, fraudulent.
# Day 2: only card D (0.6, fraud).
CP = pd.DataFrame(
    {
        "day": [1, 1, 1, 1, 2],
        "card": ["A", "A", "B", "C", "D"],
        "label": [0, 1, 0, 1, 1],
        "score": [0.9, 0.1, 0.8, 0.3, 0.6],
    }
)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (1, 1.0),  # day 1 top card A (fraud) -> 1; day 2 D -> 1
        (2, 0.75),  # day 1 top A, B -> 1/2; day 2 has one card, D -> 1/1; mean 3/4
        (3, 5 / 6),  # day 1 A, B, C -> 2/3; day 2 -> 1; mean 5/6
        (100, 5 / 6),  # fewer than k cards: precision over the cards each day has
    ],
)
def test_card_precision_at_k_by_hand(k, expected):
    got = card_precision_at_k(CP["label"], CP["score"], card_ids=CP["card"], days=CP["day"], k=k)
    assert got == pytest.approx(expected)


def test_card_precision_groups_cards_per_day():
    # Card A is fraudulent on day 1 only; on day 2 its (top) card score must not inherit day 1's fraud.
    labels = [1, 0, 1]
    scores = [0.5, 0.9, 0.1]
    got = card_precision_at_k(labels, scores, card_ids=["A", "A", "B"], days=[1, 2, 2], k=1)
    assert got == pytest.approx(0.5)  # day 1: A fraud -> 1; day 2: A (0.9) legit -> 0


def test_card_precision_no_days_is_nan_and_bad_inputs_refused():
    assert math.isnan(card_precision_at_k([], [], card_ids=[], days=[]))
    with pytest.raises(ValueError, match="k"):
        card_precision_at_k([1], [0.5], card_ids=["A"], days=[1], k=0)
    with pytest.raises(ValueError, match="days"):
        card_precision_at_k([1, 0], [0.5, 0.2], card_ids=["A", "B"], days=[1])
    with pytest.raises(ValueError, match="card_ids"):
        card_precision_at_k([1, 0], [0.5, 0.2], card_ids=["A", None], days=[1, 1])


def test_nan_when_a_class_is_missing():
    only_neg = np.zeros(5, dtype=int)
    only_pos = np.ones(5, dtype=int)
    scores = np.linspace(0, 1, 5)
    assert math.isnan(average_precision(only_neg, scores))
    assert average_precision(only_pos, scores) == pytest.approx(1.0)
    for labels in (only_neg, only_pos):
        assert math.isnan(roc_auc(labels, scores))
        assert math.isnan(recall_at_fpr(labels, scores))
    metrics = fraud_metrics(only_neg, scores)
    assert all(math.isnan(metrics[key]) for key in METRIC_KEYS)


def test_fraud_metrics_keys_and_values():
    metrics = fraud_metrics(CP["label"], CP["score"], card_ids=CP["card"], days=CP["day"])
    assert tuple(metrics) == METRIC_KEYS
    assert metrics["cp_at_100"] == pytest.approx(5 / 6)
    assert metrics["ap"] == pytest.approx(average_precision(CP["label"], CP["score"]))
    without_cards = fraud_metrics(LABELS6, SCORES6)
    assert math.isnan(without_cards["cp_at_100"])
    assert without_cards["ap"] == pytest.approx(13 / 18)
    with pytest.raises(ValueError, match="card_ids and days"):
        fraud_metrics(LABELS6, SCORES6, card_ids=np.arange(6))


def test_pandas_series_are_positional():
    # A shuffled index must not re-align anything: metrics use positions, as numpy does.
    idx = [5, 3, 1, 0, 2, 4]
    labels = pd.Series(LABELS6, index=idx)
    scores = pd.Series(SCORES6, index=idx)
    assert average_precision(labels, scores) == pytest.approx(13 / 18)
    assert roc_auc(labels, scores) == pytest.approx(5 / 9)
    assert recall_at_fpr(pd.Series(RF_LABELS), pd.Series(RF_SCORES), fpr=0.25) == pytest.approx(0.75)


def test_bad_inputs_refused():
    with pytest.raises(ValueError, match="labels"):
        average_precision([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores"):
        roc_auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="scores"):
        roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="fpr"):
        recall_at_fpr([0, 1], [0.1, 0.2], fpr=1.5)


def test_card_precision_is_vectorized_enough():
    rng = np.random.default_rng(0)
    n = 200_000
    labels = (rng.random(n) < 0.01).astype(int)
    got = card_precision_at_k(
        labels, rng.random(n), card_ids=rng.integers(0, 20_000, n), days=rng.integers(0, 7, n)
    )
    assert 0.0 <= got <= 0.1
