import dataclasses

import pytest

from models.config import ConfigError, load_config, parse_config, read_defaults


def test_defaults_come_from_pyproject():
    raw = read_defaults()
    config = load_config()
    assert config.split.train_days == raw["train-days"]
    assert config.train.hidden_sizes == tuple(int(h) for h in raw["hidden-sizes"].split(","))
    assert config.train.pos_weight == raw["pos-weight"]
    assert load_config({"pos-weight": "auto"}).train.pos_weight is None


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.split.train_days = 3  # type: ignore[misc]


def test_overrides_apply_and_none_is_skipped():
    config = load_config({"train-days": 14, "lr": "0.01", "seed": None, "pos-weight": 20})
    assert config.split.train_days == 14
    assert config.train.lr == pytest.approx(0.01)
    assert config.train.seed == read_defaults()["seed"]
    assert config.train.pos_weight == 20.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train-days", 0),
        ("train-days", 2.5),
        ("train-days", "x"),
        ("delay-days", -1),
        ("test-fraction", 1.0),
        ("model", "xgboost"),
        ("hidden-sizes", "64,-1"),
        ("hidden-sizes", ""),
        ("dp-hidden-sizes", "8,0"),
        ("lr", 0),
        ("batch-size", True),
        ("pos-weight", "often"),
        ("lr", float("nan")),
    ],
)
def test_bad_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config({key: value})


def test_unknown_and_missing_keys_are_refused():
    with pytest.raises(ConfigError, match="'learning-rate' is unknown"):
        load_config({"learning-rate": 0.1})
    raw = read_defaults()
    del raw["seed"]
    with pytest.raises(ConfigError, match="'seed' is missing"):
        parse_config(raw)


def test_bank_budgets_and_booleans():
    config = load_config({"dp-bank-epsilon": "3:1.5, 7:8", "secagg": "false", "dp": True})
    assert config.privacy.epsilon_for(3) == 1.5 and config.privacy.epsilon_for(7) == 8.0
    assert config.privacy.epsilon_for(0) == config.privacy.dp_epsilon
    assert config.federation.secagg is False and config.privacy.dp is True
    with pytest.raises(ConfigError, match="'dp-bank-epsilon'"):
        load_config({"dp-bank-epsilon": "3:-1"})
    with pytest.raises(ConfigError, match="'secagg'"):
        load_config({"secagg": "maybe"})
    with pytest.raises(ConfigError, match="'test-start'"):
        load_config({"test-start": "2024-13-01"})


def test_the_federated_mlp_is_smaller_under_dp_sgd_only():
    sizes = {"hidden-sizes": "64,64", "dp-hidden-sizes": "8,8"}
    assert load_config(sizes).federated_hidden_sizes == (8, 8)
    assert load_config({**sizes, "dp": False}).federated_hidden_sizes == (64, 64)
    assert load_config({**sizes, "dp-hidden-sizes": ""}).federated_hidden_sizes == (64, 64)  # as hidden-sizes


def test_to_dict_round_trips():
    config = load_config({"hidden-sizes": "32,16", "dp-hidden-sizes": "4"})
    assert parse_config(config.to_dict()) == config
