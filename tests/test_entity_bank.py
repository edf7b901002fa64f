"""A bank's part in the entity release from its own file: no frauds and missing days still work."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from clients.bank import load_bank
from clients.entity import local_table
from clients.entity_round import EntityReleaseError, release_spec, table_share, with_consortium
from models.config import load_config
from models.feature_names import CONSORTIUM_FEATURES
from models.release_noise import calibrate_release
from models.release_shares import share_bound
from server.exact_sum import plan_exact_sum
from simulations.generate import GeneratorConfig, generate_consortium


def _release(frame: pd.DataFrame, *, epsilon: float, banks: int = 3, mechanism: str = "gaussian") -> dict:
    start = frame["timestamp"].min().normalize()
    days = int((frame["timestamp"].max().normalize() - start).days) + 1
    noise = calibrate_release(epsilon=epsilon, delta=1e-6, mechanism=mechanism)
    plan = plan_exact_sum(n_banks=banks, max_value=1_000 + share_bound(noise, n_banks=banks))
    return {
        "id": "r1",
        "column": "merchant_id",
        "buckets": 1024,
        "start": str(start.date()),
        "days": days,
        "delay": 7,
        "key": "ab" * 16,
        "epsilon": epsilon,
        "delta": 1e-6,
        "banks": banks,
        "scale": plan.scale,
        "max_value": plan.max_value,
        "sigma": noise.sigma,
        "sensitivity": noise.sensitivity,
        "layout": "disjoint",
        "mechanism": mechanism,
    }, plan


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory):
    frame = generate_consortium(GeneratorConfig(banks=3, cards=300, merchants=80, days=40, seed=3))
    frame = frame[frame["bank_id"] == 0].drop(columns="bank_id").copy()
    frame["is_fraud"] = 0  # a bank that saw no fraud at all
    day = (frame["timestamp"] - frame["timestamp"].min().normalize()).dt.days
    frame = frame[(day < 10) | (day >= 20)]  # and sent nothing for ten days
    path = tmp_path_factory.mktemp("bank") / "bank.parquet"
    frame.to_parquet(path)
    return path, frame


def test_a_bank_without_frauds_and_with_missing_days_sends_its_exact_table(bank_file):
    path, frame = bank_file
    data = load_bank(path, split=load_config({}).split)
    release, plan = _release(frame, epsilon=math.inf)
    share = table_share(data, json.dumps(release))
    spec = release_spec(release)
    expected = local_table(data.frame, spec, key=bytes.fromhex(release["key"]))
    assert expected[1].sum() == 0 and expected[0, 10:20].sum() == 0 and expected[0].sum() == len(frame)
    np.testing.assert_allclose(share * plan.scale, expected.ravel(), atol=1e-9)
    assert np.abs(share).max() <= plan.clipping_range


def test_a_discrete_laplace_share_is_whole_counts_within_the_agreed_bound(bank_file):
    path, frame = bank_file
    data = load_bank(path, split=load_config({}).split)
    release, plan = _release(frame, epsilon=1.0, mechanism="discrete-laplace")
    decoded = table_share(data, json.dumps(release)) * plan.scale
    spec = release_spec(release)
    exact = local_table(data.frame, spec, key=bytes.fromhex(release["key"])).ravel()
    noise = decoded - exact  # the wire's row 0 is "not fraud", which equals the table here (no frauds)
    np.testing.assert_allclose(noise, np.rint(noise), atol=1e-6)  # integer noise on integer counts
    assert 0 < np.abs(noise).max() <= 40 and 0.2 < (np.rint(noise) == 0).mean() < 0.9


def test_its_consortium_features_are_finite_and_appended(bank_file):
    path, frame = bank_file
    data = load_bank(path, split=load_config({}).split)
    release, _ = _release(frame, epsilon=3.0)
    spec = release_spec(release)
    table = np.zeros((2, spec.days, spec.buckets))  # a published table with nothing in it
    table[0, :, :] = 5.0
    enriched = with_consortium(data, table.ravel(), json.dumps(release))
    assert enriched.feature_names[-len(CONSORTIUM_FEATURES) :] == CONSORTIUM_FEATURES
    assert enriched.x_train.shape[1] == data.x_train.shape[1] + len(CONSORTIUM_FEATURES)
    assert np.isfinite(enriched.x_train).all() and np.isfinite(enriched.x_test).all()
    rates = enriched.x_train[:, -3:]
    assert (rates == 0).all()  # no frauds anywhere: every consortium fraud rate is 0


def test_a_share_beyond_the_agreed_bound_is_refused(bank_file):
    path, frame = bank_file
    data = load_bank(path, split=load_config({}).split)
    release, _ = _release(frame, epsilon=math.inf)
    release["scale"] = 1e-3  # a bound far below the bank's real counts
    with pytest.raises(EntityReleaseError, match="SecAgg"):
        table_share(data, json.dumps(release))
