"""Distributed DP noise for the entity statistics release and exact integer sums through SecAgg+ numerics."""

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.server.strategy.aggregate import aggregate
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from clients.entity import EntityTableSpec, local_table
from models.release_noise import (
    LAYOUT_COUNTS,
    LAYOUT_DISJOINT,
    ReleaseNoise,
    achieved_epsilon,
    calibrate_release,
    check_table,
    from_wire_layout,
    layout_sensitivity,
    to_wire_layout,
)
from models.release_shares import noise_share, share_bound
from server.exact_sum import ExactSumPlan, plan_exact_sum
from server.secagg import SecAggConfigError

DELTA = 1e-6


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_calibrate_matches_independent_opacus_computation():
    noise = calibrate_release(epsilon=3.0, delta=DELTA, sensitivity=math.sqrt(2.0))
    z = get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=1.0, steps=1, accountant="rdp"
    )
    assert noise.sigma == pytest.approx(z * math.sqrt(2.0), rel=1e-12)
    assert noise.sensitivity == pytest.approx(math.sqrt(2.0))
    assert calibrate_release(epsilon=3.0, delta=DELTA).sigma == pytest.approx(z, rel=1e-12)  # default: 1
    assert calibrate_release(epsilon=3.0, delta=DELTA).sigma == pytest.approx(2.327 / math.sqrt(2), abs=1e-3)
    # the calibrated noise really gives epsilon <= target (and close to it) for the plain Gaussian mechanism
    accountant = RDPAccountant()
    accountant.history = [(noise.sigma / noise.sensitivity, 1.0, 1)]
    assert 2.95 <= accountant.get_epsilon(delta=DELTA) <= 3.0


def test_smaller_epsilon_more_noise_and_inf_turns_noise_off():
    sigmas = [calibrate_release(epsilon=e, delta=DELTA).sigma for e in (8.0, 3.0, 1.0)]
    assert sigmas[0] < sigmas[1] < sigmas[2]
    off = calibrate_release(epsilon=math.inf, delta=DELTA)
    assert off.sigma == 0.0
    assert not np.any(noise_share((4, 5), noise=off, n_banks=10))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epsilon": 0.0, "delta": DELTA}, "epsilon"),
        ({"epsilon": -1.0, "delta": DELTA}, "epsilon"),
        ({"epsilon": math.nan, "delta": DELTA}, "epsilon"),
        ({"epsilon": 1.0, "delta": 0.0}, "delta"),
        ({"epsilon": 1.0, "delta": 1.0}, "delta"),
        ({"epsilon": 1.0, "delta": DELTA, "sensitivity": 0.0}, "sensitivity"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        calibrate_release(**kwargs)


def test_noise_shares_sum_to_calibrated_sigma():
    noise = calibrate_release(epsilon=1.0, delta=DELTA)
    n_banks, cells = 10, 200_000
    shares = [
        noise_share((cells,), noise=noise, n_banks=n_banks, rng=np.random.default_rng(100 + b))
        for b in range(n_banks)
    ]
    for share in shares:
        assert np.std(share) == pytest.approx(noise.sigma / math.sqrt(n_banks), rel=0.02)
        assert np.max(np.abs(share)) <= share_bound(noise, n_banks=n_banks)
    total = np.sum(shares, axis=0)
    assert np.std(total) == pytest.approx(noise.sigma, rel=0.02)
    assert abs(np.mean(total)) < 5 * noise.sigma / math.sqrt(cells)
    with pytest.raises(ValueError, match="n_banks"):
        noise_share((3,), noise=noise, n_banks=0)


def test_published_table_is_not_clipped_cell_by_cell():
    table = np.array([[[5.4, -2.0, 3.0]], [[7.0, 1.0, -0.5]]])
    np.testing.assert_array_equal(check_table(table), table)  # window sums stay unbiased
    with pytest.raises(ValueError, match="shape"):
        check_table(np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="finite"):
        check_table(np.full((2, 1, 1), np.inf))


def test_achieved_epsilon_grows_when_banks_drop_out():
    noise = calibrate_release(epsilon=3.0, delta=DELTA)
    assert achieved_epsilon(noise, contributing=10, n_banks=10) == 3.0
    assert achieved_epsilon(noise, contributing=10, n_banks=8) == 3.0  # more shares only add noise
    eps = [achieved_epsilon(noise, contributing=k, n_banks=10) for k in (9, 5, 1)]
    assert 3.0 < eps[0] < eps[1] < eps[2]
    assert (
        achieved_epsilon(calibrate_release(epsilon=math.inf, delta=DELTA), contributing=3, n_banks=10)
        == math.inf
    )
    with pytest.raises(ValueError, match="contributing"):
        achieved_epsilon(noise, contributing=0, n_banks=10)


def _secaggplus_round_trip(plan: ExactSumPlan, encoded: list[np.ndarray]) -> np.ndarray:
    """Flower 1.42 SecAgg+ numerics minus the masks (they cancel mod M): stage 2, unmask, FedAvg."""
    q, m, c = plan.quantization_range, plan.modulus_range, plan.clipping_range
    k = len(encoded)
    q_ratio = round(1.0 / 1.0 * q)  # num_examples=1, max_weight=1 -> ratio 1 -> dq_ratio 1.0
    total = np.zeros(encoded[0].shape, dtype=np.int64)
    for arr in encoded:
        quantized = quantize([arr * (q_ratio / q)], c, q)[0]
        assert quantized.min() >= 0 and quantized.max() <= q
        total = (total + quantized.astype(np.int64)) % m
    q_total_ratio = (k * q_ratio) % m
    mean = dequantize([total], c, q)[0]
    mean += -(k - 1) * c
    mean *= q / q_total_ratio
    return aggregate([([mean], 1) for _ in range(k)])[0]


@pytest.mark.parametrize(
    ("n_banks", "max_count"), [(3, 5_000), (10, 5_000), (100, 5_000), (10, 10_000_000)]
)  # the last one sits just below the precision limit (Q / (4 n) ~ 10.7M for n = 10, M = 2**32)
def test_exact_integer_sum_through_secaggplus_quantization(n_banks, max_count):
    np.random.seed(1234)  # Flower's stochastic rounding draws from the global numpy generator
    rng = np.random.default_rng(n_banks)
    plan = plan_exact_sum(n_banks=n_banks, max_value=max_count)
    assert plan.max_abs_error() < 0.5
    assert n_banks * plan.quantization_range < plan.modulus_range
    tables = [rng.integers(0, max_count + 1, size=(2, 30, 64)) for _ in range(n_banks)]
    tables[0][:, :, :3] = max_count  # the worst case is inside the grid
    tables[-1][1] = 0  # a bank with no frauds
    mean = _secaggplus_round_trip(plan, [plan.encode(t) for t in tables])
    exact = np.sum(tables, axis=0)
    raw = plan.decode(mean)
    assert np.max(np.abs(raw - exact)) < plan.max_abs_error()
    np.testing.assert_array_equal(plan.decode(mean, integers=True), exact)


def test_noisy_sum_through_secaggplus_and_dropouts():
    np.random.seed(7)
    n_banks, max_count = 10, 1_000
    noise = calibrate_release(epsilon=3.0, delta=DELTA)
    plan = plan_exact_sum(n_banks=n_banks, max_value=max_count + share_bound(noise, n_banks=n_banks))
    rng = np.random.default_rng(3)
    tables = [rng.integers(0, max_count + 1, size=(2, 20, 50)) for _ in range(n_banks)]
    noisy = [t + noise_share(t.shape, noise=noise, n_banks=n_banks, rng=rng) for t in tables]
    active = noisy[:7]  # three banks dropped out: Flower averages over the 7 that sent masked vectors
    mean = _secaggplus_round_trip(plan, [plan.encode(t) for t in active])
    decoded = plan.decode(mean, contributing=7)
    assert np.max(np.abs(decoded - np.sum(active, axis=0))) < plan.max_abs_error()


def test_refusals():
    with pytest.raises(SecAggConfigError, match="overflow"):
        plan_exact_sum(n_banks=3000, max_value=5_000, modulus_range=2**32)
    with pytest.raises(SecAggConfigError, match="overflow"):
        plan_exact_sum(n_banks=10, max_value=11_000_000)
    with pytest.raises(SecAggConfigError, match="modulus_range"):
        plan_exact_sum(n_banks=10, max_value=5_000, modulus_range=3 * 2**20)
    with pytest.raises(SecAggConfigError, match="max_value"):
        plan_exact_sum(n_banks=10, max_value=0.0)
    plan = plan_exact_sum(n_banks=10, max_value=100.0)
    with pytest.raises(ValueError, match="max_value"):
        plan.encode(np.array([101.0]))
    assert plan.workflow_kwargs()["max_weight"] == 1.0
    assert isinstance(calibrate_release(epsilon=1.0, delta=DELTA), ReleaseNoise)


def _one_merchant(frauds: list[int]):
    import pandas as pd  # noqa: PLC0415

    stamps = pd.Timestamp("2024-03-01") + pd.to_timedelta(range(len(frauds)), unit="h")
    return pd.DataFrame({"timestamp": stamps, "merchant_id": "m1", "is_fraud": frauds})


@pytest.mark.parametrize("added", [0, 1])
def test_one_transaction_moves_one_wire_cell_by_one(added):
    """Adding a transaction (legitimate or labelled fraud) changes the disjoint layout by L2 norm 1."""
    spec = EntityTableSpec(start="2024-03-01", days=20, buckets=256, delay_days=7)
    before = local_table(_one_merchant([0, 1, 0]), spec, key=b"k" * 16)
    after = local_table(_one_merchant([0, 1, 0, added]), spec, key=b"k" * 16)
    disjoint = to_wire_layout(after, LAYOUT_DISJOINT) - to_wire_layout(before, LAYOUT_DISJOINT)
    counts = to_wire_layout(after, LAYOUT_COUNTS) - to_wire_layout(before, LAYOUT_COUNTS)
    assert np.linalg.norm(disjoint) == pytest.approx(layout_sensitivity(LAYOUT_DISJOINT)) == 1.0
    assert np.linalg.norm(counts) <= layout_sensitivity(LAYOUT_COUNTS) + 1e-12
    assert np.linalg.norm(counts) == pytest.approx(math.sqrt(1 + added))  # a fraud moves both rows
    assert np.array_equal(from_wire_layout(to_wire_layout(after, LAYOUT_DISJOINT), LAYOUT_DISJOINT), after)
    with pytest.raises(ValueError, match="layout"):
        layout_sensitivity("rows")
