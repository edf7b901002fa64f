"""Explanations: integrated gradients are complete, name real features, and read as plain words."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clients.scoring import Scorer
from models.explain import contributions, describe, explanation_text, integrated_gradients
from models.feature_names import CONSORTIUM_FEATURES, LOCAL_FEATURES
from tests._helpers_scoring import bank_file, train_package


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_package(bank_file(tmp_path_factory.mktemp("bank"), seed=4), entity=True)


def test_attributions_sum_to_the_logit_difference_from_the_average_transaction(trained):
    model, spec = trained.package.build_model(), trained.package.spec
    x_std = spec.transform(trained.x[trained.test][:500])
    attributions, gaps = integrated_gradients(model, x_std)
    with torch.no_grad():
        logits = model(torch.from_numpy(x_std)).double().numpy()
        baseline = float(model(torch.zeros(1, x_std.shape[1])).double())
    np.testing.assert_allclose(attributions.sum(axis=1) - (logits - baseline), gaps, atol=1e-6)
    # completeness up to the quadrature error at the ReLU kinks, which shrinks with more steps
    assert np.abs(gaps).max() < 0.02 * max(1.0, np.abs(logits - baseline).max())
    _, finer = integrated_gradients(model, x_std, steps=256)
    assert np.abs(finer).mean() < np.abs(gaps).mean() / 2
    # a feature at its consortium mean (standardized 0) gets no attribution
    x_std[:, 0] = 0.0
    zeroed, _ = integrated_gradients(model, x_std[:50])
    assert np.abs(zeroed[:, 0]).max() == 0.0


def test_attributions_equal_captums_integrated_gradients(trained):
    captum_attr = pytest.importorskip("captum.attr")
    model, spec = trained.package.build_model(), trained.package.spec
    x_std = spec.transform(trained.x[trained.test][:300])
    ours, _ = integrated_gradients(model, x_std, steps=50, rows_per_pass=128)
    reference = captum_attr.IntegratedGradients(model).attribute(
        torch.from_numpy(x_std), baselines=torch.zeros(1, x_std.shape[1]), n_steps=50, method="gausslegendre"
    )
    np.testing.assert_allclose(ours, reference.double().numpy(), rtol=1e-4, atol=1e-6)


def test_linear_model_attributions_are_weight_times_input():
    model = torch.nn.Linear(4, 1)
    net = torch.nn.Sequential(model, torch.nn.Flatten(0))
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    attributions, _ = integrated_gradients(net, x)
    expected = x * model.weight.detach().numpy()
    np.testing.assert_allclose(attributions, expected, rtol=1e-4, atol=1e-5)


def test_top_contributions_name_real_features_in_order(trained):
    spec = trained.package.spec
    rows = trained.x[trained.test][:200]
    explained = Scorer(trained.package).explain(rows, top=4)
    for items in explained:
        assert len(items) == 4
        assert all(set(c.features) <= set(spec.names) for c in items)
        sizes = [abs(c.attribution) for c in items]
        assert sizes == sorted(sizes, reverse=True)
    # all contributions of one row: the hour pair is one item, and together they keep the total
    attr, _ = integrated_gradients(trained.package.build_model(), spec.transform(rows[:1]))
    everything = contributions(spec.names, rows[0], attr[0], top=100)
    assert len(everything) == len(spec.names) - 1
    assert ("hour_sin", "hour_cos") in [c.features for c in everything]
    assert math.isclose(sum(c.attribution for c in everything), float(attr[0].sum()), abs_tol=1e-9)
    assert [c.text for c in everything[:4]] == [c.text for c in explained[0]]


def test_plain_words_for_every_feature():
    row = {name: 0.0 for name in LOCAL_FEATURES + CONSORTIUM_FEATURES}
    row.update(
        log_amount=math.log1p(250.0),
        hour_sin=math.sin(2 * math.pi * 3.5 / 24),
        hour_cos=math.cos(2 * math.pi * 3.5 / 24),
        is_night=1.0,
        card_amount_ratio_30d=6.2,
        card_count_1d=math.log1p(7),
        merchant_fraud_rate_7d=0.25,
        consortium_fraud_rate_30d=0.041,
        consortium_count_7d=math.log1p(1200),
    )
    assert describe("log_amount", row) == "amount 250.00"
    assert describe("hour_cos", row) == describe("hour_sin", row) == "time of day 03:30"
    assert describe("is_night", row) == "at night (22:00-06:00)"
    assert describe("is_weekend", row) == "on a weekday"
    assert describe("card_amount_ratio_30d", row) == "amount 6.2x this card's 30-day mean"
    assert describe("card_count_1d", row) == "7 transactions on this card in the last day"
    assert describe("merchant_fraud_rate_7d", row) == "merchant fraud rate 25.0% at this bank (7-day window)"
    assert (
        describe("consortium_fraud_rate_30d", row)
        == "merchant fraud rate 4.1% across the consortium (30-day window)"
    )
    assert describe("consortium_count_7d", row) == (
        "1,200 transactions at this merchant across the consortium in the 7 days before"
    )
    one = {"merchant_count_1d": math.log1p(1), "consortium_count_1d": 0.0}
    assert describe("merchant_count_1d", one) == "1 transaction at this merchant in the last day (this bank)"
    assert (
        describe("consortium_count_1d", one)
        == "0 transactions at this merchant across the consortium in the day before"
    )
    assert describe("V17", {"V17": -2.5}) == "V17 = -2.5"
    names = ["card_amount_ratio_30d", "log_amount"]
    items = contributions(names, np.array([6.2, math.log1p(250.0)]), np.array([1.234, -0.5]), top=2)
    assert explanation_text(items) == "amount 6.2x this card's 30-day mean (+1.23); amount 250.00 (-0.50)"
