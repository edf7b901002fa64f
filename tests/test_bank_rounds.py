"""A bank's round without Flower: update checks, budget refusal, evaluation; server guard and checkpoints."""

import dataclasses

import numpy as np
import pytest

from clients.bank import BankData
from clients.ledger import BankLedger
from clients.local import UpdateCheckError, check_update, evaluate_round, train_round
from models.config import load_config
from models.nets import build_model, get_weights
from models.spec import FeatureSpec, FeatureStats
from server.checkpoint import Checkpoint, check_resumable, load_checkpoint, save_checkpoint
from server.strategy import check_aggregate


def _bank(n=600, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, 20)).astype(np.float32)
    y = (x[:, 0] + rng.normal(scale=0.5, size=2 * n) > 1.8).astype(np.float32)
    return BankData(
        x_train=x[:n],
        y_train=y[:n],
        x_test=x[n:],
        y_test=y[n:],
        test_cards=None,
        test_days=None,
        feature_names=tuple(f"f{i}" for i in range(20)),
    )


def _spec(data):
    return FeatureSpec.from_stats(
        data.feature_names, FeatureStats.of(data.x_train), version="t", delay_days=7
    )


def test_check_update_refuses_bad_updates():
    ref = [np.zeros((2, 3)), np.zeros(3)]
    check_update([np.ones((2, 3)), np.ones(3)], ref)
    with pytest.raises(UpdateCheckError, match="shape"):
        check_update([np.ones((3, 2)), np.ones(3)], ref)
    with pytest.raises(UpdateCheckError, match="NaN"):
        check_update([np.full((2, 3), np.nan), np.ones(3)], ref)
    with pytest.raises(UpdateCheckError, match="clipping range"):
        check_update([np.full((2, 3), 9.0), np.ones(3)], ref)
    with pytest.raises(UpdateCheckError, match="arrays"):
        check_update([np.ones((2, 3))], ref)


def test_a_dp_round_trains_then_the_bank_declines_once_its_budget_is_spent():
    data = _bank()
    config = load_config({"rounds": 2, "dp": True, "dp-epsilon": 1.0})
    weights = get_weights(build_model("mlp", 20, hidden_sizes=config.federated_hidden_sizes, seed=0))
    state, eps = None, []
    for _ in range(2):
        out = train_round(data, weights, _spec(data), config, bank=0, state=state)
        assert out.weights is not None and out.examples == 600
        weights, state = out.weights, out.state
        eps.append(out.epsilon)
    assert 0 < eps[0] < eps[1] <= 1.0 + 1e-9
    third = train_round(data, weights, _spec(data), config, bank=0, state=state)
    assert third.weights is None and third.examples == 0
    assert third.epsilon == pytest.approx(eps[1])


def test_per_bank_budget_override_is_used():
    data = _bank()
    config = load_config({"rounds": 1, "dp": True, "dp-epsilon": 8.0, "dp-bank-epsilon": "4:0.5"})
    weights = get_weights(build_model("mlp", 20, hidden_sizes=config.federated_hidden_sizes, seed=0))
    low = train_round(data, weights, _spec(data), config, bank=4, state=None)
    high = train_round(data, weights, _spec(data), config, bank=0, state=None)
    assert low.epsilon <= 0.5 + 1e-9 < 1.0 < high.epsilon <= 8.0 + 1e-9


def test_no_training_rows_declines_and_evaluation_reports_metrics():
    data = _bank()
    empty = dataclasses.replace(data, x_train=data.x_train[:0], y_train=data.y_train[:0])
    config = load_config({"dp": False})
    weights = get_weights(build_model("mlp", 20, seed=0))
    assert train_round(empty, weights, _spec(data), config, bank=0, state=None).weights is None
    trained = train_round(data, weights, _spec(data), config, bank=0, state=None)
    loss, metrics = evaluate_round(data, trained.weights, _spec(data), config)
    assert np.isfinite(loss) and 0.5 < metrics["roc_auc"] <= 1.0
    assert "cp_at_100" not in metrics  # undefined without cards and days, so not reported


def test_aggregate_guard():
    ref = [np.zeros((2, 2))]
    assert check_aggregate([np.ones((2, 2))], ref) is None
    assert "non-finite" in check_aggregate([np.full((2, 2), np.inf)], ref)
    assert "clipping bound" in check_aggregate([np.full((2, 2), 100.0)], ref)
    assert "shapes" in check_aggregate([np.ones(4)], ref)


def test_checkpoint_round_trip_and_bank_ledger(tmp_path):
    weights = [np.arange(6.0).reshape(2, 3), np.ones(3)]
    ckpt = Checkpoint(
        round=3,
        weights=weights,
        spec_json='{"a": 1}',
        ledger={"0": 1.5},
        strategy_state={"m_t": [np.zeros(3)]},
        history=[{"round": 3}],
    )
    save_checkpoint(tmp_path, ckpt)
    back = load_checkpoint(tmp_path)
    assert back.round == 3 and back.ledger == {"0": 1.5} and back.history == [{"round": 3}]
    assert all(np.array_equal(a, b) for a, b in zip(back.weights, weights, strict=True))
    assert np.array_equal(back.strategy_state["m_t"][0], np.zeros(3))
    assert load_checkpoint(tmp_path / "none") is None
    (tmp_path / "checkpoint.json").write_text("{broken")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)
    ledger = BankLedger(tmp_path / "bank.json")
    assert ledger.load() == {}
    ledger.save({"dp-epsilon-spent": 0.7}, declined=False)
    ledger.save({"dp-epsilon-spent": 0.7}, declined=True)
    assert ledger.load() == {"dp-epsilon-spent": 0.7}


def test_a_checkpoint_of_another_model_size_is_refused_before_resuming(tmp_path):
    config = load_config({"dp": True, "hidden-sizes": "64,64", "dp-hidden-sizes": "8,8"})
    old = get_weights(build_model("mlp", 20, hidden_sizes=(64, 64), seed=0))  # written before dp-hidden-sizes
    ckpt = Checkpoint(round=2, weights=old, spec_json="{}", ledger={})
    with pytest.raises(ValueError, match=r"checkpoint\.json.*'dp-hidden-sizes'"):
        check_resumable(ckpt, config, n_features=20, directory=tmp_path)
    same = get_weights(build_model("mlp", 20, hidden_sizes=config.federated_hidden_sizes, seed=0))
    check_resumable(
        Checkpoint(round=2, weights=same, spec_json="{}", ledger={}),
        config,
        n_features=20,
        directory=tmp_path,
    )
