"""The pluggable privacy step: cross-round accounting, budget enforcement, state, DP training."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from clients.privacy import (
    DPSGD,
    NoPrivacy,
    PrivacyBudgetExhausted,
    PrivacyStep,
    epsilon_of,
    make_privacy_step,
    steps_per_round,
)
from models.training import train_epochs
from tests._helpers_privacy import BATCH, DELTA, EPS, N, _step, _total_steps, _wrap, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


def _train_round(step: PrivacyStep, data, seed: int = 0):
    model, private, optimizer, loader = _wrap(step, data, seed=seed)
    before = [p.detach().clone() for p in model.parameters()]
    return model, before, train_epochs(private, optimizer, loader, epochs=1, pos_weight=2.0)


def _after(step: DPSGD, steps: int) -> dict[str, Any]:
    """The step's state as if `steps` steps had been taken at its sigma and sample rate."""
    return dict(
        step.state(),
        **{
            "dp-history-sigma": [step.noise_multiplier],
            "dp-history-rate": [step.sample_rate],
            "dp-history-steps": [steps],
        },
    )


# --- accounting across rounds ---------------------------------------------------------------------------


def test_three_rounds_accumulate_like_an_independent_accountant(data):
    state: dict[str, Any] | None = None
    spent, sigmas, steps_taken = [], [], 0
    for _ in range(3):
        step = _step(state)
        assert step.admits(steps=steps_per_round(n_examples=N, batch_size=BATCH, local_epochs=1))
        _, _, stats = _train_round(step, data)
        steps_taken += stats.steps
        state = step.state()
        sigmas.append(state["dp-sigma"])
        spent.append(step.spent())
        assert state["dp-epsilon-spent"] == spent[-1]
        independent = RDPAccountant()  # fed the same (sigma, sample rate, steps) history
        independent.history = list(
            zip(*(state[f"dp-history-{k}"] for k in ("sigma", "rate", "steps")), strict=True)
        )
        assert spent[-1] == pytest.approx(independent.get_epsilon(delta=DELTA), rel=1e-12)
    assert _total_steps(step) == steps_taken  # the steps Opacus actually took
    assert sigmas[0] == sigmas[1] == sigmas[2]  # calibrated once
    assert spent[0] < spent[1] < spent[2] <= EPS
    assert not _step(state).admits(steps=20)  # a 4th round of a 3-round plan does not fit


def test_golden_epsilon_and_sigma():
    # Golden values from Opacus 1.6's RDPAccountant: history [(1.0, 0.01, 1000)] at delta 1e-5 ->
    # RDPAccountant().get_epsilon(1e-5) = 2.1013652716430564; and get_noise_multiplier(target_epsilon=2.0,
    # target_delta=1e-5, sample_rate=0.01, steps=1000, accountant="rdp", epsilon_tolerance=0.01) =
    # 1.02294921875 (computed once in a Python shell, 2026-11).
    state = {
        "dp-epsilon": 10.0,
        "dp-delta": 1e-5,
        "dp-accountant": "rdp",
        "dp-sigma": 1.0,
        "dp-history-sigma": [1.0],
        "dp-history-rate": [0.01],
        "dp-history-steps": [1000],
    }
    restored = DPSGD(
        epsilon=10.0, delta=1e-5, max_grad_norm=1.0, sample_rate=0.01, planned_steps=5000, state=state
    )
    assert restored.spent() == pytest.approx(2.1013652716430564, rel=1e-12)
    assert restored.noise_multiplier == 1.0  # restored, not re-calibrated
    fresh = DPSGD(epsilon=2.0, delta=1e-5, max_grad_norm=1.0, sample_rate=0.01, planned_steps=1000)
    assert fresh.noise_multiplier == 1.02294921875
    assert fresh.spent() == 0.0


def test_sigma_calibrated_for_the_whole_plan_lands_just_below_budget():
    step = _step(rounds=3)
    planned = 3 * steps_per_round(n_examples=N, batch_size=BATCH, local_epochs=1)
    assert step.planned_steps == planned and step.sample_rate == BATCH / N
    accountant = RDPAccountant()
    accountant.history = [(step.noise_multiplier, step.sample_rate, planned)]
    landed = accountant.get_epsilon(delta=DELTA)
    assert EPS - 0.015 <= landed <= EPS
    assert step.admits(steps=planned) and not step.admits(steps=planned + 5)
    assert step.admissible_steps(limit=10**6) >= planned


def test_admits_refuses_a_round_beyond_the_plan():
    first = _step(rounds=2)
    per_round = steps_per_round(n_examples=N, batch_size=BATCH, local_epochs=1)
    assert first.admits(steps=per_round)
    step = _step(_after(first, 2 * per_round), rounds=2)
    assert step.noise_multiplier == first.noise_multiplier
    assert step.spent() <= EPS
    assert step.admits(steps=0)
    assert not step.admits(steps=per_round)


def test_budget_guard_stops_training_before_the_update_that_would_exceed_it(data):
    first = _step(rounds=2)
    planned = first.planned_steps
    step = _step(_after(first, planned - 3), rounds=2)
    left = step.admissible_steps(limit=20)
    assert 3 <= left < 20
    with pytest.raises(PrivacyBudgetExhausted, match="not applied"):
        _train_round(step, data)
    assert _total_steps(step) == planned - 3 + left
    assert step.spent() <= EPS * (1 + 1e-9)


def test_prv_accountant_matches_opacus():
    history = [(1.1, 0.05, 40)]
    reference = PRVAccountant()
    reference.history = list(history)
    assert epsilon_of(history, delta=DELTA, accountant="prv") == reference.get_epsilon(delta=DELTA)
    with pytest.raises(ValueError, match="accountant"):
        DPSGD(
            epsilon=EPS, delta=DELTA, max_grad_norm=1.0, sample_rate=0.05, planned_steps=10, accountant="gdp"
        )


# --- state -----------------------------------------------------------------------------------------------


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    return dict(config_record_from_proto(config_record_to_proto(ConfigRecord(state))))


def test_state_is_a_flower_config_record_and_round_trips(data):
    step = _step()
    before_training = _step(_round_trip(step.state()))  # empty history lists survive too
    assert before_training.noise_multiplier == step.noise_multiplier and before_training.spent() == 0.0
    _train_round(step, data)
    state = step.state()
    assert all(k.startswith("dp-") and k == k.lower() for k in state)
    restored = _step(_round_trip(state))
    assert restored.history() == step.history()
    assert restored.spent() == step.spent()


@pytest.mark.parametrize(("change", "key"), [({"epsilon": 4.0}, "dp-epsilon"), ({"delta": 1e-6}, "dp-delta")])
def test_state_with_another_budget_is_refused(change, key):
    state = _step().state()
    with pytest.raises(ValueError, match=key):
        _step(state, **change)


def test_malformed_or_orphaned_state_is_refused():
    state = _step().state()
    with pytest.raises(ValueError, match="dp-history-steps"):
        _step({k: v for k, v in state.items() if k != "dp-history-steps"})
    with pytest.raises(ValueError, match="dp-history"):
        _step(dict(state, **{"dp-history-steps": [1, 2]}))
    with pytest.raises(ValueError, match="dp-sigma"):
        make_privacy_step(
            enabled=False,
            epsilon=EPS,
            delta=DELTA,
            max_grad_norm=1.0,
            n_examples=N,
            batch_size=BATCH,
            local_epochs=1,
            planned_rounds=3,
            state=state,
        )
    unrelated = {"round": 3, "other-component": "x"}  # context.state may hold other keys
    assert _step(unrelated).spent() == 0.0


def test_arguments_are_checked():
    assert steps_per_round(n_examples=1000, batch_size=256, local_epochs=2) == 8
    step = make_privacy_step(
        enabled=True,
        epsilon=EPS,
        delta=DELTA,
        max_grad_norm=1.0,
        n_examples=1000,
        batch_size=256,
        local_epochs=2,
        planned_rounds=5,
        state=None,
    )
    assert isinstance(step, DPSGD) and step.sample_rate == 0.25 and step.planned_steps == 40
    bad: dict[str, Any]
    for bad in ({"n_examples": 0}, {"batch_size": 2.5}, {"local_epochs": True}):
        counts: dict[str, Any] = {"n_examples": 10, "batch_size": 2, "local_epochs": 1, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            steps_per_round(**counts)
    for bad in ({"epsilon": 0.0}, {"delta": 1.0}, {"max_grad_norm": math.nan}, {"sample_rate": 1.5}):
        args: dict[str, Any] = {
            "epsilon": EPS,
            "delta": DELTA,
            "max_grad_norm": 1.0,
            "sample_rate": 0.1,
            **bad,
        }
        with pytest.raises(ValueError, match=next(iter(bad))):
            DPSGD(planned_steps=10, **args)
    with pytest.raises(ValueError, match="steps"):
        _step().admits(steps=-1)


# --- NoPrivacy -------------------------------------------------------------------------------------------


def test_no_privacy_is_an_identity(data):
    step = make_privacy_step(
        enabled=False,
        epsilon=EPS,
        delta=DELTA,
        max_grad_norm=1.0,
        n_examples=N,
        batch_size=BATCH,
        local_epochs=1,
        planned_rounds=3,
        state={"round": 1},
    )
    assert isinstance(step, NoPrivacy) and isinstance(step, PrivacyStep)
    model, private, optimizer, loader = _wrap(step, data)
    assert private is model and type(optimizer) is torch.optim.Adam and type(loader) is DataLoader
    assert step.admits(steps=10**9) and step.spent() == 0.0 and step.state() == {}


# --- training and per-sample gradients --------------------------------------------------------------------


def test_dp_training_end_to_end_changes_weights(data):
    step = _step()
    assert isinstance(step, PrivacyStep)
    model, before, stats = _train_round(step, data)
    assert stats.steps > 0 and stats.examples > 0 and math.isfinite(stats.loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert 0.0 < step.spent() < EPS


def test_dp_training_with_fedprox_and_sgd(data):
    model, private, optimizer, loader = _wrap(_step(), data, kind="logreg", name="sgd", lr=0.1)
    global_weights = [p.detach().clone() for p in model.parameters()]
    stats = train_epochs(
        private, optimizer, loader, epochs=2, pos_weight=1.0, proximal_mu=0.1, global_weights=global_weights
    )
    assert stats.steps > 20 and math.isfinite(stats.loss)


def test_poisson_sampling_does_not_replay_the_loader_seed(data):
    batches = []
    for _ in range(2):
        *_, loader = _wrap(_step(), data, kind="logreg")
        assert isinstance(loader.batch_sampler, UniformWithReplacementSampler)
        batches.append(list(loader.batch_sampler))
    assert batches[0] != batches[1]
