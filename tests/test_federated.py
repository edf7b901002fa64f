"""Real Flower simulations (Ray) of the ServerApp and ClientApp on a tiny consortium."""

import itertools
import json
import math

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from models.config import load_config
from server import strategy as strategy_module
from server.secagg import SecAggConfigError, choose_secagg
from simulations.dataset import DataSource, prepare
from simulations.federated import EngineOptions, run_federated
from simulations.generate import GeneratorConfig, generate_consortium, write_consortium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "banks"
    config = GeneratorConfig(banks=4, cards=500, merchants=200, days=45, seed=5)
    write_consortium(generate_consortium(config), out, config=config)
    return out


def _prepared(consortium, **overrides):
    config = load_config({"central-epochs": 1, "local-epochs": 1, **overrides})
    return prepare(DataSource(path=consortium), config.split), config


@pytest.fixture
def spy(monkeypatch):
    """Record the parameters the server-side aggregation step receives."""
    seen = []
    original = strategy_module.GuardedMixin.aggregate_fit

    def recording(self, server_round, results, failures):
        seen.append([parameters_to_ndarrays(res.parameters) for _, res in results])
        return original(self, server_round, results, failures)

    monkeypatch.setattr(strategy_module.GuardedMixin, "aggregate_fit", recording)
    return seen


def _final_weights(consortium, secagg, spy):
    data, config = _prepared(consortium, rounds=1, dp=False, secagg=secagg)
    result = run_federated(data, config)
    assert result.scores.shape == (int(data.split.test.sum()),)
    return result, list(spy[-1])


def test_secagg_server_sees_only_the_masked_mean_and_it_matches_plaintext(consortium, spy):
    plain, plain_inputs = _final_weights(consortium, False, spy)
    masked, masked_inputs = _final_weights(consortium, True, spy)
    # plaintext: the strategy receives each bank's own update
    assert len(plain_inputs) == 4
    assert not np.allclose(plain_inputs[0][0], plain_inputs[1][0])
    # SecAgg+: every result carries the same already-aggregated vector, never a bank's own update
    assert len(masked_inputs) == 4
    for other in masked_inputs[1:]:
        for a, b in zip(masked_inputs[0], other, strict=True):
            assert np.array_equal(a, b)
    for bank_update in plain_inputs:
        assert not np.allclose(bank_update[0], masked_inputs[0][0], atol=1e-6)
    # ... and equals plaintext FedAvg within the quantization error (stats round quantized too)
    diff = max(np.abs(p - m).max() for p, m in zip(plain.weights, masked.weights, strict=True))
    assert diff < 2e-3


def test_dp_ledger_matches_an_independent_accountant_then_resume_declines(consortium, tmp_path):
    data, config = _prepared(consortium, rounds=2, dp=True, secagg=True, **{"dp-epsilon": 2.0})
    ckpt = tmp_path / "ckpt"
    first = run_federated(data, config, engine=EngineOptions(checkpoint_dir=ckpt))
    rounds = first.details["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    ledger = rounds[-1]["ledger"]
    assert set(ledger) == {"0", "1", "2", "3"}
    for bank, eps in ledger.items():
        n = int((data.bank_mask(int(bank)) & data.split.train).sum())
        per_round = math.ceil(n / config.train.batch_size)
        rate = 1.0 / per_round
        sigma = get_noise_multiplier(
            target_epsilon=2.0,
            target_delta=config.privacy.dp_delta,
            sample_rate=rate,
            steps=2 * per_round,
            accountant="rdp",
        )
        accountant = RDPAccountant()
        accountant.history = [(sigma, rate, 2 * per_round)]
        assert eps == pytest.approx(accountant.get_epsilon(config.privacy.dp_delta), rel=1e-6)
        assert eps <= 2.0 + 1e-9
        assert rounds[0]["ledger"][bank] < eps  # epsilon accumulates across rounds
    saved = json.loads((ckpt / "checkpoint.json").read_text())
    assert saved["round"] == 2 and saved["ledger"] == pytest.approx(ledger)

    # Resume with a third round: the server continues at round 3; every bank's budget is spent, so each
    # declines, the (empty) aggregate is discarded, the global model and the ledger stay as they were.
    _, longer = _prepared(consortium, rounds=3, dp=True, secagg=True, **{"dp-epsilon": 2.0})
    second = run_federated(data, longer, engine=EngineOptions(checkpoint_dir=ckpt))
    last = second.details["rounds"][-1]
    assert last["round"] == 3
    assert "discarded" in last
    assert last["ledger"] == pytest.approx(ledger)
    assert np.allclose(second.scores, first.scores)
    bank_log = json.loads((ckpt / "bank-ledgers" / "bank_000.json").read_text())
    assert [r["declined"] for r in bank_log["rounds"]] == [False, False, True]


def test_an_overflowing_secagg_configuration_is_refused(consortium):
    config = load_config({"secagg-quantization-range": 2**31})
    with pytest.raises(SecAggConfigError, match="secagg-quantization-range"):
        choose_secagg(4, config.federation)
    data, _ = _prepared(consortium)
    with pytest.raises(SecAggConfigError, match="overflow"):
        run_federated(data, config)


def test_fedadam_keeps_its_moments_in_the_checkpoint(consortium, tmp_path):
    data, config = _prepared(consortium, rounds=2, dp=False, secagg=False, strategy="fedadam")
    result = run_federated(data, config, engine=EngineOptions(checkpoint_dir=tmp_path))
    assert [r["round"] for r in result.details["rounds"]] == [1, 2]
    saved = json.loads((tmp_path / "checkpoint.json").read_text())
    assert saved["strategy_state"] == {"m_t": 6, "v_t": 6}  # MLP 20-64-64-1: three weights, three biases
    assert np.isfinite(result.scores).all()


def test_fedprox_sends_its_proximal_term_to_the_banks(consortium, monkeypatch):
    sent = []
    original = strategy_module.GuardedMixin.configure_fit

    def recording(self, server_round, parameters, client_manager):
        pairs = original(self, server_round, parameters, client_manager)
        sent.extend(fit_ins.config for _, fit_ins in pairs)
        return pairs

    monkeypatch.setattr(strategy_module.GuardedMixin, "configure_fit", recording)
    data, config = _prepared(
        consortium, rounds=1, dp=False, secagg=False, strategy="fedprox", **{"proximal-mu": 0.5}
    )
    result = run_federated(data, config)
    assert len(sent) == 4 and all(c["proximal_mu"] == 0.5 and c["server-round"] == 1 for c in sent)
    assert result.details["rounds"][0]["results"] == 4
    assert np.isfinite(result.scores).all()


def test_client_level_dp_warns_with_few_banks_and_completes(consortium, caplog):
    data, config = _prepared(consortium, rounds=1, dp=False, secagg=True, **{"central-dp": True})
    with caplog.at_level("WARNING", logger="server.server_app"):
        result = run_federated(data, config)
    assert any("usually ruins the model" in r.getMessage() for r in caplog.records)
    assert result.details["rounds"][0]["round"] == 1


def test_banks_score_each_model_with_the_next_fit_as_an_evaluation_round_would(consortium, monkeypatch):
    evaluated = []  # per round: how many banks the server asked for an evaluation round
    original = strategy_module.GuardedMixin.configure_evaluate

    def recording(self, server_round, parameters, client_manager):
        pairs = original(self, server_round, parameters, client_manager)
        evaluated.append(len(pairs))
        return pairs

    monkeypatch.setattr(strategy_module.GuardedMixin, "configure_evaluate", recording)
    records = {}  # without DP noise both runs train the very same models
    for in_fit in (True, False):
        data, config = _prepared(consortium, rounds=3, dp=False, secagg=True, **{"evaluate-in-fit": in_fit})
        records[in_fit] = run_federated(data, config).details["rounds"]
    assert evaluated == [0, 0, 4, 4, 4, 4]  # in the fit: only the last round has its own evaluation
    for piggybacked, separate in zip(records[True], records[False], strict=True):
        assert set(piggybacked["banks"]) == set(separate["banks"]) == {"0", "1", "2", "3"}
        for bank, metrics in separate["banks"].items():
            assert set(metrics) == set(piggybacked["banks"][bank])  # ap, loss, ..., epsilon, entity-epsilon
            ours = piggybacked["banks"][bank]  # the same model up to SecAgg+'s stochastic rounding:
            assert ours["examples"] == metrics["examples"]  # ~1e-8 in the loss, a near-tie in a ranking
            assert ours["loss"] == pytest.approx(metrics["loss"], rel=1e-3)
            for key in {"ap", "roc_auc"} & set(metrics):
                assert ours[key] == pytest.approx(metrics[key], abs=2e-3)
        assert piggybacked["ledger"] == separate["ledger"] == {b: 0.0 for b in ("0", "1", "2", "3")}
    losses = [r["banks"]["0"]["loss"] for r in records[True]]
    assert min(abs(a - b) / b for a, b in itertools.pairwise(losses)) > 1e-3  # each round: its own model
