"""The vectorized engine's runs: bank data, epsilon ledgers and records as the Flower path's, the CLI."""

import json
import math

import numpy as np
import pytest

from clients.bank import load_bank
from clients.local import train_round
from models.config import ConfigError, load_config
from models.metrics import fraud_metrics
from models.nets import build_model, get_weights
from models.spec import FeatureSpec
from simulations.cli import _methods
from simulations.dataset import DataSource, prepare
from simulations.federated import EngineOptions, write_bank_files
from simulations.generate import GeneratorConfig, generate_consortium, write_consortium
from simulations.vectorized import bank_datasets, run_vectorized


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("vec") / "banks"
    config = GeneratorConfig(banks=3, cards=600, merchants=200, days=45, seed=2)
    write_consortium(generate_consortium(config), out, config=config)
    return out


def _prepared(consortium, **overrides):
    config = load_config({"central-epochs": 1, "local-epochs": 1, "rounds": 3, **overrides})
    return prepare(DataSource(path=consortium), config.split), config


def test_bank_data_equals_what_each_bank_reads_from_its_own_file(consortium, tmp_path):
    data, config = _prepared(consortium)
    files = write_bank_files(data, tmp_path)
    for (_, path), mine in zip(files.values(), bank_datasets(data, config), strict=True):
        theirs = load_bank(path, split=config.split)
        np.testing.assert_array_equal(mine.x_train, theirs.x_train)
        np.testing.assert_array_equal(mine.y_train, theirs.y_train)
        np.testing.assert_array_equal(mine.x_test, theirs.x_test)
        np.testing.assert_array_equal(mine.y_test, theirs.y_test)


def test_epsilon_ledgers_equal_the_flower_clients_train_round(consortium, tmp_path):
    data, config = _prepared(consortium, **{"dp-bank-epsilon": "1:6.0", "secagg": False})
    result = run_vectorized(data, config)
    rounds = result.details["rounds"]
    spec = FeatureSpec.from_json(json.dumps(result.details["feature_spec"]))
    hidden = config.federated_hidden_sizes
    assert hidden == config.privacy.dp_hidden_sizes != config.train.hidden_sizes  # DP-SGD's smaller MLP
    shapes = [w.shape for w in result.weights[::2]]  # the weight matrices
    assert shapes == [(hidden[0], len(spec.names)), (hidden[1], hidden[0]), (1, hidden[1])]
    weights = get_weights(build_model("mlp", len(spec.names), hidden_sizes=hidden))
    for bank, path in write_bank_files(data, tmp_path).values():  # the Flower path's own client code
        state = None
        for record in rounds:
            outcome = train_round(
                load_bank(path, split=config.split),
                weights,
                spec,
                config,
                bank=bank,
                state=state,
                seed=record["round"],
            )
            state = outcome.state
            theirs = record["banks"][str(bank)]
            assert theirs["epsilon"] == state["dp-epsilon-spent"]
        assert state["dp-epsilon-spent"] <= config.privacy.epsilon_for(bank)
    assert rounds[-1]["ledger"]["1"] > rounds[-1]["ledger"]["0"]  # bank 1's larger budget


def test_run_declines_over_budget_and_records_like_the_flower_path(consortium):
    data, config = _prepared(consortium, **{"rounds": 4, "fraction-fit": 0.5, "secagg": False})
    result = run_vectorized(data, config)
    rounds = result.details["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["results"] == 2 and r["failures"] == 0 and "global" in r for r in rounds)
    for bank, eps in rounds[-1]["ledger"].items():
        assert eps <= config.privacy.epsilon_for(int(bank)) * (1 + 1e-9)
    assert result.scores.shape == (int(data.split.test.sum()),)


def test_entity_features_and_secagg_run_on_the_vectorized_engine(consortium):
    data, config = _prepared(
        consortium, **{"rounds": 1, "entity-features": "merchant_id", "entity-buckets": 1024, "dp": False}
    )
    result = run_vectorized(data, config)
    assert result.details["entity_release"]["contributing"] == 3
    assert len(result.details["feature_spec"]["names"]) == len(data.feature_names) + 6
    assert np.isfinite(result.scores).all()


def test_the_vectorized_engine_publishes_whole_counts_as_the_server_does(consortium):
    data, config = _prepared(
        consortium, **{"rounds": 1, "entity-features": "merchant_id", "entity-buckets": 1024, "dp": False}
    )
    assert config.entity.entity_mechanism == "discrete-laplace"
    table = run_vectorized(data, config).artifacts["entity_raw"]
    np.testing.assert_array_equal(table, np.round(table))
    assert (table < 0).any()  # noise included: some noisy counts fall below zero before post-processing


def test_cli_dispatches_the_vectorized_engine_and_refuses_checkpoints(tmp_path):
    methods = _methods("vectorized", EngineOptions(), lambda _: None, entity=True)
    assert {"federated", "federated_entity"} <= methods.keys()
    with pytest.raises(ConfigError, match="checkpoint"):
        _methods("vectorized", EngineOptions(checkpoint_dir=tmp_path), lambda _: None, entity=False)


@pytest.mark.slow
def test_final_ap_and_ledgers_agree_with_the_flower_engine_across_seeds(tmp_path):
    """Same data and config, 3 seeds each: mean AP within 4 standard errors; the epsilon ledgers identical."""
    from simulations.federated import run_federated  # noqa: PLC0415 - starts Ray

    out = tmp_path / "banks"
    gen = GeneratorConfig(banks=4, cards=3000, merchants=400, days=45, seed=11)
    write_consortium(generate_consortium(gen), out, config=gen)
    aps: dict[str, list[float]] = {"flower": [], "vectorized": []}
    for seed in (0, 1, 2):
        data, config = _prepared(out, seed=seed, **{"dp-epsilon": 8.0})
        labels = data.rows["is_fraud"].to_numpy()[data.split.test]
        ledgers = {}
        for engine, run in (("flower", run_federated), ("vectorized", run_vectorized)):
            result = run(data, config)
            aps[engine].append(fraud_metrics(labels, result.scores)["ap"])
            ledgers[engine] = [r["ledger"] for r in result.details["rounds"]]
        assert ledgers["flower"] == ledgers["vectorized"]
    flower, vectorized = np.array(aps["flower"]), np.array(aps["vectorized"])
    spread = math.sqrt(flower.var(ddof=1) / 3 + vectorized.var(ddof=1) / 3)
    assert abs(flower.mean() - vectorized.mean()) <= 4 * spread + 0.01, aps
