"""The consortium entity release on Flower's simulation engine: exact secure sum, calibrated noise."""

import json

import numpy as np
import pytest

from clients.entity import local_table
from clients.entity_round import release_spec
from models.config import load_config
from models.release_noise import calibrate_release
from server import strategy as strategy_module
from simulations.dataset import DataSource, prepare
from simulations.federated import run_federated
from simulations.generate import GeneratorConfig, generate_consortium, write_consortium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("entity") / "banks"
    config = GeneratorConfig(banks=4, cards=500, merchants=200, days=45, seed=7)
    write_consortium(generate_consortium(config), out, config=config)
    return out


def _run(consortium, epsilon, mechanism="laplace"):
    config = load_config(
        {
            "rounds": 1,
            "dp": False,
            "entity-features": "merchant_id",
            "entity-epsilon": epsilon,
            "entity-buckets": 1024,
            "entity-mechanism": mechanism,
        }
    )
    data = prepare(DataSource(path=consortium), config.split)
    return data, run_federated(data, config)


def _exact_sum(data, release):
    key = bytes.fromhex(release["key"])
    spec = release_spec(release)
    return sum(local_table(data.frame.loc[data.bank_mask(b)], spec, key=key) for b in data.banks)


def test_secure_sum_is_exact_and_the_server_never_holds_a_bank_table(consortium, monkeypatch):
    received = []
    original = strategy_module.SecureMeanStrategy.aggregate_fit

    def recording(self, server_round, results, failures):
        if self.key == "entity_mean":
            received.extend(strategy_module.parameters_to_ndarrays(r.parameters)[0] for _, r in results)
        return original(self, server_round, results, failures)

    monkeypatch.setattr(strategy_module.SecureMeanStrategy, "aggregate_fit", recording)
    data, result = _run(consortium, "inf")
    release = json.loads(result.artifacts["entity_release"])
    exact = _exact_sum(data, release)
    assert exact[0].sum() == len(data.frame)  # every row lands in the table
    assert np.array_equal(result.artifacts["entity_table"], exact)  # exact integers through SecAgg+
    assert len(received) == 4 and all(
        np.array_equal(received[0], r) for r in received
    )  # only the masked mean
    assert not any(
        np.allclose(received[0] * release["scale"], exact.ravel() * share) for share in (0.25, 1.0)
    )
    assert result.scores.shape == (int(data.split.test.sum()),) and np.isfinite(result.scores).all()
    names = result.details["feature_spec"]["names"]
    assert names[-1] == "consortium_fraud_rate_30d" and len(names) == 26


# the total noise's std at epsilon 1 and its mean |x| / std: sqrt(2 alpha) / (1 + alpha) with alpha = 1/e for
# the discrete Laplace, 1/sqrt 2 for the Laplace, sqrt(2 / pi) for the Gaussian
NOISE_SHAPE = {
    "discrete-laplace": (np.sqrt(2 / np.e) / (1 - 1 / np.e), np.sqrt(2 / np.e) / (1 + 1 / np.e)),
    "laplace": (np.sqrt(2.0), 2**-0.5),
    "gaussian": (4.53, np.sqrt(2 / np.pi)),
}


@pytest.mark.parametrize("mechanism", list(NOISE_SHAPE))
def test_release_noise_has_the_calibrated_scale(consortium, mechanism):
    data, result = _run(consortium, 1.0, mechanism)
    release = json.loads(result.artifacts["entity_release"])
    sigma = calibrate_release(epsilon=1.0, delta=release["delta"], mechanism=mechanism).sigma
    residual = result.artifacts["entity_raw"] - _exact_sum(data, release)
    assert release["sigma"] == pytest.approx(sigma) and release["layout"] == "disjoint"
    assert release["mechanism"] == mechanism and release["noise-banks"] == 4  # 4 banks: 80% rounds up to 4
    # each wire cell (legitimate, fraud) carried the noise of the calibrated distribution
    expected_sigma, shape = NOISE_SHAPE[mechanism]
    assert sigma == pytest.approx(expected_sigma, rel=1e-3)
    legit, frauds = (residual[0] - residual[1]).ravel(), residual[1].ravel()
    if mechanism == "discrete-laplace":  # integer noise: the published counts are whole numbers
        assert np.array_equal(residual, np.rint(residual)) and (residual == 0).mean() > 0.2
    for noise in (legit, frauds):  # ~45k cells each: sampling error under 1%
        assert noise.std() == pytest.approx(sigma, rel=0.03)
        assert abs(noise.mean()) < 5 * sigma / np.sqrt(noise.size)
        assert np.abs(noise).mean() / noise.std() == pytest.approx(shape, abs=0.02)
    assert abs(np.corrcoef(legit, frauds)[0, 1]) < 0.03  # independent noise per wire cell
    table = result.artifacts["entity_table"]
    np.testing.assert_array_equal(table, result.artifacts["entity_raw"])  # published unclipped (unbiased)
    assert result.details["entity_release"]["epsilon_achieved"] == pytest.approx(1.0)
    assert "key" not in result.details["entity_release"]  # the consortium key never reaches metrics.json
    assert result.details["entity_release"]["contributing"] == 4
    assert result.details["entity_release"]["version"].startswith("consortium-v1:")
    banks = result.details["rounds"][-1]["banks"]
    assert len(banks) == 4  # every bank's own ledger records the release's epsilon
    assert all(m["entity-epsilon"] == pytest.approx(1.0, abs=0.02) for m in banks.values())
