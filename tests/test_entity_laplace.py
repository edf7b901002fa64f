"""The entity release's distributed Laplace mechanism: shares, calibration, dropouts, ledger and config."""

import math

import numpy as np
import pytest
from scipy import stats

from clients import entity_round
from clients.release_ledger import confirm_release, entity_epsilon, join_release
from models.config import ConfigError, load_config
from models.release_noise import (
    LAPLACE,
    LAYOUT_COUNTS,
    LAYOUT_DISJOINT,
    achieved_epsilon,
    calibrate_release,
    composed_epsilon,
    layout_sensitivity,
)
from models.release_shares import TAIL_SCALES, noise_share, share_bound
from server import entity_release as server_release
from server.entity_release import EntityReleaseError, check_contributing
from tests._helpers_release import announced, small_release_settings

DELTA = 1e-6


def _laplace(epsilon=3.0):
    return calibrate_release(epsilon=epsilon, delta=DELTA, mechanism=LAPLACE)


def test_scale_is_l1_sensitivity_over_epsilon():
    assert layout_sensitivity(LAYOUT_DISJOINT, mechanism=LAPLACE) == 1.0
    assert layout_sensitivity(LAYOUT_COUNTS, mechanism=LAPLACE) == 2.0  # a fraud moves two cells
    noise = _laplace(3.0)
    assert noise.laplace_scale == pytest.approx(1 / 3) and noise.sigma == pytest.approx(math.sqrt(2) / 3)
    gaussian = calibrate_release(epsilon=3.0, delta=DELTA)
    assert gaussian.sigma / noise.sigma == pytest.approx(3.49, abs=0.01)  # 1.65 against 0.47 at epsilon 3
    counts = calibrate_release(epsilon=3.0, delta=DELTA, sensitivity=2.0, mechanism=LAPLACE)
    assert counts.laplace_scale == pytest.approx(2 / 3)
    assert calibrate_release(epsilon=math.inf, delta=DELTA, mechanism=LAPLACE).sigma == 0.0
    with pytest.raises(ValueError, match="mechanism 'laplas'"):
        calibrate_release(epsilon=3.0, delta=DELTA, mechanism="laplas")


@pytest.mark.parametrize("min_banks", [1, 3, 10])
def test_any_min_banks_shares_sum_to_the_laplace_distribution(min_banks):
    noise, rng = _laplace(2.0), np.random.default_rng(11)
    total = sum(noise_share((40_000,), noise=noise, n_banks=min_banks, rng=rng) for _ in range(min_banks))
    result = stats.kstest(total, "laplace", args=(0.0, 0.5))
    assert result.pvalue > 1e-3, result
    gaussian_like = stats.kstest(total, "norm", args=(0.0, noise.sigma))
    assert gaussian_like.pvalue < 1e-6  # the test can tell the two apart at this size
    single = noise_share((40_000,), noise=noise, n_banks=min_banks, rng=rng)
    assert np.abs(single).max() <= share_bound(noise, n_banks=min_banks) == TAIL_SCALES * 0.5


def test_more_shares_than_calibrated_only_add_noise():
    noise, rng = _laplace(2.0), np.random.default_rng(5)
    total = sum(noise_share((40_000,), noise=noise, n_banks=4, rng=rng) for _ in range(6))
    assert total.std() == pytest.approx(noise.sigma * math.sqrt(6 / 4), rel=0.03)
    assert achieved_epsilon(noise, contributing=6, n_banks=4) == 2.0
    assert achieved_epsilon(noise, contributing=4, n_banks=4) == 2.0
    assert achieved_epsilon(noise, contributing=3, n_banks=4) == math.inf  # no guarantee is claimed


def test_pure_epsilons_add_to_the_gaussian_composition():
    z = calibrate_release(epsilon=3.0, delta=DELTA).sigma
    gaussian = composed_epsilon([z], delta=DELTA)
    assert composed_epsilon([z], delta=DELTA, pure_epsilons=[1.0, 0.5]) == pytest.approx(gaussian + 1.5)
    assert composed_epsilon([], delta=DELTA, pure_epsilons=[3.0, 3.0]) == 6.0


def _release(release_id, start="2024-01-01", epsilon=3.0):
    return announced(release_id, start, 30, epsilon, mechanism=LAPLACE, noise_banks=8)


def test_ledger_adds_overlapping_laplace_releases_and_marks_short_ones():
    entries = join_release([], _release("a"), budget=math.inf)
    entries = join_release(entries, _release("b", start="2024-01-20", epsilon=1.0), budget=math.inf)
    entries = join_release(entries, _release("c", start="2024-03-01"), budget=math.inf)
    assert entity_epsilon(entries, delta=DELTA) == pytest.approx(4.0)  # a and b overlap, c is disjoint
    assert entries[0].mechanism == "laplace" and entries[0].noise_banks == 8
    confirmed = confirm_release(entries, release_id="c", contributing=9, version="v")
    assert confirmed[2].achieved == 3.0 and entity_epsilon(confirmed, delta=DELTA) == pytest.approx(4.0)
    short = confirm_release(entries, release_id="a", contributing=7, version="v")
    assert short[0].achieved == math.inf and entity_epsilon(short, delta=DELTA) == math.inf
    with pytest.raises(Exception, match=r"budget 3\.5"):
        join_release(entries[:1], _release("d", start="2024-01-15", epsilon=1.0), budget=3.5)


def test_server_refuses_to_publish_below_the_calibrated_banks_and_banks_check_the_split():
    release = _release("a")
    check_contributing(release, 8)
    with pytest.raises(EntityReleaseError, match="entity-min-banks"):
        check_contributing(release, 7)
    for mechanism in ("gaussian", "discrete-laplace"):  # every mechanism: too little noise is not published
        check_contributing({**release, "mechanism": mechanism}, 9)  # more shares only add noise
        with pytest.raises(EntityReleaseError, match=f"its {mechanism} noise is calibrated for"):
            check_contributing({**release, "mechanism": mechanism}, 7)
    assert entity_round.noise_banks(release) == 8
    assert entity_round.noise_banks({k: v for k, v in release.items() if k != "noise-banks"}) == 10
    with pytest.raises(entity_round.EntityReleaseError, match="noise split 11 ways"):
        entity_round.noise_banks({**release, "noise-banks": 11})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"entity-mechanism": "exponential"}, "entity-mechanism"),
        ({"entity-min-banks": -1}, "entity-min-banks"),
        ({"entity-min-banks": 2.5}, "entity-min-banks"),
    ],
)
def test_config_refuses_bad_mechanism_settings_by_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides)


def test_min_banks_defaults_to_80_percent_and_cannot_exceed_the_banks():
    entity = load_config().entity
    assert entity.entity_mechanism == "discrete-laplace"
    assert [entity.min_banks(n) for n in (3, 4, 10, 1000)] == [3, 4, 8, 800]
    for mechanism in ("laplace", "gaussian"):  # every mechanism's noise is split the same way
        settings = small_release_settings(**{"entity-mechanism": mechanism})
        assert server_release.announce(settings)["noise-banks"] == entity.min_banks(4) == 4
    assert load_config({"entity-mechanism": "gaussian"}).entity.min_banks(10) == 8
    assert load_config({"entity-min-banks": 5}).entity.min_banks(10) == 5
    with pytest.raises(ValueError, match="'entity-min-banks': 12"):
        load_config({"entity-min-banks": 12}).entity.min_banks(10)


@pytest.mark.parametrize(("contributing", "published"), [(3, True), (2, False)])
def test_a_short_laplace_release_is_decoded_but_never_published(monkeypatch, contributing, published):
    rounds = []

    def fake_round(grid, context, strategy, secagg=None):
        rounds.append(strategy.key)
        if strategy.key == "entity_mean":  # what the SecAgg+ workflow hands the strategy: the decoded mean
            strategy.sink.update(entity_mean=np.zeros(2 * 5 * 256), entity_mean_results=contributing)

    monkeypatch.setattr(server_release, "run_round", fake_round)
    settings = small_release_settings(**{"entity-min-banks": 3})
    if published:
        server_release.entity_round(None, None, settings)
        assert settings.sink["entity_epsilon"] == 3.0 and rounds == ["entity_mean", "entity_publish"]
        return
    with pytest.raises(EntityReleaseError, match="fewer than the 3"):
        server_release.entity_round(None, None, settings)
    assert rounds == ["entity_mean"]  # nothing goes back to the banks
    assert settings.sink["entity_epsilon"] == math.inf and settings.sink["entity_contributing"] == 2
    assert "entity_table" not in settings.sink  # what the audit log records: the release, no epsilon
