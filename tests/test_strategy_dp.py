"""Client-level DP at the server: the recorded (checkpointed, served) model is the noised one."""

import time

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from models.config import load_config
from server.strategy import RecordedClientSideDP, build_strategy


def _strategy(records):
    config = load_config({"central-dp": True, "rounds": 2})
    initial = [np.zeros((3, 2), dtype=np.float32), np.zeros(2, dtype=np.float32)]
    inner = build_strategy(
        config, initial, n_banks=2, spec_json="{}", on_round=lambda r, info: records.append((r, info))
    )
    inner._started = time.perf_counter()  # as configure_fit stamps it
    return inner, RecordedClientSideDP(inner, noise_multiplier=0.5, clipping_norm=5.0, num_sampled_clients=2)


def _result(value):
    arrays = [np.full((3, 2), value, dtype=np.float32), np.full(2, value, dtype=np.float32)]
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, {})


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
