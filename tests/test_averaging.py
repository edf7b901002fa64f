"""Tail averaging of the global model: which rounds enter, the mean, the fallback, checkpointable state."""

import numpy as np
import pytest

from models.averaging import TailAverage, first_averaged_round


def test_first_averaged_round_takes_the_last_fraction_of_rounds():
    assert first_averaged_round(10, 0.5) == 6
    assert first_averaged_round(10, 0.0) == 10  # 0: the last model only
    assert first_averaged_round(10, 1.0) == 1
    assert first_averaged_round(3, 0.5) == 2  # ceil(1.5) = 2 rounds
    with pytest.raises(ValueError, match="fraction"):
        first_averaged_round(10, 1.5)


def test_the_mean_of_the_tail_rounds_only():
    tail = TailAverage(first=3)
    for round_no in range(1, 6):
        tail.add(round_no, [np.full(2, float(round_no)), np.full((1, 1), -float(round_no))])
    assert tail.count == 3
    mean = tail.value([np.zeros(2), np.zeros((1, 1))])
    np.testing.assert_allclose(mean[0], [4.0, 4.0])
    np.testing.assert_allclose(mean[1], [[-4.0]])
    assert mean[0].dtype == np.float32
    resumed = TailAverage(first=3, total=list(tail.total), count=tail.count)  # from a checkpoint
    resumed.add(6, [np.full(2, 6.0), np.full((1, 1), -6.0)])
    np.testing.assert_allclose(resumed.value([])[0], [4.5, 4.5])


def test_fallback_before_the_tail_and_shape_checks():
    tail = TailAverage(first=5)
    tail.add(1, [np.ones(2)])
    fallback = [np.full(2, 7.0)]
    np.testing.assert_array_equal(tail.value(fallback)[0], fallback[0])
    tail.add(5, [np.ones(2)])
    with pytest.raises(ValueError, match="shapes"):
        tail.add(6, [np.ones(3)])
