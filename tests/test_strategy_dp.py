"""Client-level DP at the server: the recorded (checkpointed, served) model is the noised one."""

import time

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from models.config import load_config
from models.federation import KEY_EVALUATE
from server.strategy import RecordedClientSideDP, build_strategy


def _strategy(records):
    config = load_config({"central-dp": True, "rounds": 2})
    initial = [np.zeros((3, 2), dtype=np.float32), np.zeros(2, dtype=np.float32)]
    inner = build_strategy(
        config, initial, n_banks=2, spec_json="{}", on_round=lambda r, info: records.append((r, info))
    )
    inner._started = time.perf_counter()  # as configure_fit stamps it
    return inner, RecordedClientSideDP(inner, noise_multiplier=0.5, clipping_norm=5.0, num_sampled_clients=2)


def _result(value, metrics=None):
    arrays = [np.full((3, 2), value, dtype=np.float32), np.full(2, value, dtype=np.float32)]
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, metrics or {})


def test_the_round_record_holds_the_noised_weights():
    records = []
    inner, dp = _strategy(records)
    params, _ = dp.aggregate_fit(1, [_result(0.1), _result(0.3)], [])
    noised = parameters_to_ndarrays(params)
    assert len(records) == 1  # one record per round, not the un-noised one too
    round_no, info = records[0]
    assert round_no == 1 and info["results"] == 2 and info["failures"] == 0
    for recorded, sent, current in zip(info["weights"], noised, inner.current, strict=True):
        np.testing.assert_array_equal(recorded, sent)
        np.testing.assert_array_equal(current, sent)
    assert not np.allclose(noised[0], 0.2)  # noise std 0.5 * 5 / 2 per weight was added to the mean


def test_a_round_with_failures_is_recorded_as_discarded():
    records = []
    inner, dp = _strategy(records)
    params, _ = dp.aggregate_fit(1, [_result(0.1)], [RuntimeError("bank lost")])
    assert params is None
    ((round_no, info),) = records
    assert round_no == 1 and "weights" not in info
    assert "failures" in info["discarded"] and info["failures"] == 1
    np.testing.assert_array_equal(inner.current[0], 0.0)


def test_a_banks_score_of_the_previous_model_goes_to_that_round_and_its_epsilon_to_this_one():
    records = []
    _, dp = _strategy(records)
    reports = [{"bank": b, "epsilon": 0.5 + b, "eval-ap": 0.1 * b, "eval-loss": 0.3} for b in (0, 1)]
    dp.aggregate_fit(2, [_result(0.1, reports[0]), _result(0.3, reports[1])], [])
    (previous, scored), (current, info) = records  # under client-level DP too (it holds this round's)
    assert previous == 1 and scored["banks"] == {
        "0": {"ap": 0.0, "loss": 0.3, "bank": 0},
        "1": {"ap": 0.1, "loss": 0.3, "bank": 1},
    }
    assert current == 2 and info["banks"] == {
        "0": {"bank": 0, "epsilon": 0.5},
        "1": {"bank": 1, "epsilon": 1.5},
    }
    assert "weights" in info


@pytest.mark.parametrize(("offset", "asked"), [(0, [False, True, True]), (2, [True, True, True])])
def test_banks_score_the_incoming_model_unless_it_is_the_initial_one(offset, asked):
    config = load_config({"rounds": 5})
    strategy = build_strategy(
        config, [np.zeros(2)], n_banks=3, spec_json="{}", on_round=lambda *_: None, round_offset=offset
    )
    assert [KEY_EVALUATE in strategy.on_fit_config_fn(r) for r in (1, 2, 3)] == asked
    off = build_strategy(
        load_config({"evaluate-in-fit": False}),
        [np.zeros(2)],
        n_banks=3,
        spec_json="{}",
        on_round=lambda *_: None,
    )
    assert not any(KEY_EVALUATE in off.on_fit_config_fn(r) for r in (1, 2, 3))
