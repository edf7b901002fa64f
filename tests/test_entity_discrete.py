"""The entity release's distributed discrete Laplace (two-sided geometric) mechanism, the default."""

import math

import numpy as np
import pytest
from scipy import stats

from clients.release_ledger import confirm_release, entity_epsilon, join_release
from models.release_noise import (
    DISCRETE_LAPLACE,
    LAPLACE,
    LAYOUT_COUNTS,
    LAYOUT_DISJOINT,
    achieved_epsilon,
    calibrate_release,
    layout_sensitivity,
)
from models.release_shares import noise_share, share_bound
from server import entity_release as server_release
from tests._helpers_release import announced, small_release_settings

DELTA = 1e-6


def _discrete(epsilon, sensitivity=1.0):
    return calibrate_release(
        epsilon=epsilon, delta=DELTA, sensitivity=sensitivity, mechanism=DISCRETE_LAPLACE
    )


def _pmf(values, alpha):
    """The discrete Laplace's P(k) = (1 - alpha) / (1 + alpha) * alpha^|k|."""
    return (1 - alpha) / (1 + alpha) * alpha ** np.abs(values)


def _chi_square_pvalue(total, alpha, *, support=8):
    """Goodness of fit of integer samples to the discrete Laplace, |k| > support pooled into two tails."""
    edges = np.arange(-support, support + 1)
    observed = [(total < -support).sum(), *[(total == k).sum() for k in edges], (total > support).sum()]
    tail = alpha ** (support + 1) / (1 + alpha)  # P(X > support) = P(X < -support)
    expected = np.array([tail, *_pmf(edges, alpha), tail]) * total.size
    return stats.chisquare(observed, expected).pvalue


def test_golden_values_of_the_geometric_mechanism():
    noise = _discrete(3.0)
    alpha = math.exp(-3.0)
    assert noise.geometric_ratio == pytest.approx(alpha)
    assert noise.sigma == pytest.approx(0.33209, abs=1e-5)  # sqrt(2 alpha) / (1 - alpha)
    laplace = calibrate_release(epsilon=3.0, delta=DELTA, mechanism=LAPLACE)
    assert laplace.sigma / noise.sigma == pytest.approx(1.42, abs=0.01)  # 0.47 against 0.33
    assert layout_sensitivity(LAYOUT_DISJOINT, mechanism=DISCRETE_LAPLACE) == 1.0
    assert layout_sensitivity(LAYOUT_COUNTS, mechanism=DISCRETE_LAPLACE) == 2.0
    assert _discrete(3.0, sensitivity=2.0).geometric_ratio == pytest.approx(math.exp(-1.5))
    assert share_bound(noise, n_banks=8) == 14  # ceil(40 / 3): a draw beyond it has probability < e^-40
    assert _discrete(math.inf).sigma == 0.0
    with pytest.raises(ValueError, match="integer sensitivity"):
        _discrete(3.0, sensitivity=math.sqrt(2))


@pytest.mark.parametrize("min_banks", [1, 3, 10])
def test_any_min_banks_integer_shares_sum_to_the_discrete_laplace(min_banks):
    noise, rng = _discrete(1.0), np.random.default_rng(17)
    shares = [noise_share((40_000,), noise=noise, n_banks=min_banks, rng=rng) for _ in range(min_banks)]
    assert all(np.array_equal(s, np.rint(s)) for s in shares)  # SecAgg+ carries them exactly
    total = sum(shares)
    assert _chi_square_pvalue(total, noise.geometric_ratio) > 1e-3
    rounded_laplace = np.rint(rng.laplace(0.0, 1.0, size=total.size))  # the same epsilon, rounded afterwards
    assert _chi_square_pvalue(rounded_laplace, noise.geometric_ratio) < 1e-6  # the test tells them apart
    assert np.abs(shares[0]).max() <= share_bound(noise, n_banks=min_banks) == 40


def test_most_cells_carry_no_noise_at_epsilon_3():
    noise, rng = _discrete(3.0), np.random.default_rng(3)
    total = sum(noise_share((100_000,), noise=noise, n_banks=8, rng=rng) for _ in range(8))
    assert (total == 0).mean() == pytest.approx((1 - math.exp(-3)) / (1 + math.exp(-3)), abs=0.005)  # 0.905
    assert total.std() == pytest.approx(noise.sigma, rel=0.03)


def test_more_shares_than_calibrated_only_add_noise_and_fewer_void_the_epsilon():
    noise, rng = _discrete(1.0), np.random.default_rng(5)
    total = sum(noise_share((40_000,), noise=noise, n_banks=4, rng=rng) for _ in range(6))
    assert total.std() == pytest.approx(noise.sigma * math.sqrt(6 / 4), rel=0.03)
    assert achieved_epsilon(noise, contributing=6, n_banks=4) == 1.0
    assert achieved_epsilon(noise, contributing=3, n_banks=4) == math.inf


def test_ledger_composes_discrete_laplace_releases_with_the_others():
    def release(release_id, mechanism, epsilon, start="2024-01-01"):
        return announced(release_id, start, 30, epsilon, mechanism=mechanism, noise_banks=8)

    entries = join_release([], release("a", DISCRETE_LAPLACE, 3.0), budget=math.inf)
    entries = join_release(entries, release("b", LAPLACE, 1.0, start="2024-01-20"), budget=math.inf)
    assert entries[0].mechanism == DISCRETE_LAPLACE and entries[0].noise_banks == 8
    assert entity_epsilon(entries, delta=DELTA) == pytest.approx(4.0)  # pure epsilons add on a shared day
    short = confirm_release(entries, release_id="a", contributing=7, version="v")
    assert entity_epsilon(short, delta=DELTA) == math.inf  # fewer shares than calibrated: no epsilon holds
    with pytest.raises(Exception, match=r"budget 3\.5"):
        join_release(entries[:1], release("c", DISCRETE_LAPLACE, 1.0, start="2024-01-15"), budget=3.5)


def test_the_server_publishes_whole_counts(monkeypatch):
    total = np.arange(2 * 5 * 256, dtype=np.float64) % 7 - 2.0  # an integer sum, noise below zero included
    settings = small_release_settings()
    scale = server_release.announce(settings)["scale"]  # fixed by the banks and the encoding range

    def fake_round(grid, context, strategy, secagg=None):
        if strategy.key == "entity_mean":  # the decoded mean, off by SecAgg+'s quantization error
            strategy.sink.update(entity_mean=(total + 0.3) / (4 * scale), entity_mean_results=4)

    monkeypatch.setattr(server_release, "run_round", fake_round)
    server_release.entity_round(None, None, settings)
    wire = total.reshape(2, 5, 256)
    np.testing.assert_array_equal(settings.sink["entity_raw"], [wire[0] + wire[1], wire[1]])
    assert settings.sink["entity_epsilon"] == 3.0
