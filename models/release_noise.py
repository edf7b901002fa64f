"""Distributed Laplace or Gaussian noise for the cross-bank entity statistics release (day x bucket counts).

Each bank adds its noise share to every cell before SecAgg+ masking, so the masked sum of the shares carries
the release's noise and no party (server or bank) ever sees un-noised totals.

Mechanisms (`entity-mechanism`); the shares themselves are drawn in `models.release_shares`:
- `discrete-laplace` (default): the two-sided geometric mechanism (Ghosh, Roughgarden and Sundararajan 2009),
  integer noise P(k) ~ alpha^|k| with alpha = exp(-epsilon / L1 sensitivity): pure epsilon-DP for integer
  counts. Each bank adds NB(1/m, 1 - alpha) - NB(1/m, 1 - alpha) (Polya shares; the negative binomial is
  infinitely divisible, so any m shares sum to the discrete Laplace). At epsilon 3 its std is 0.33 against the
  continuous Laplace's 0.47, and 90% of the cells carry no noise at all; the sum stays an integer, so SecAgg+
  carries it exactly and the server decodes whole counts.
- `laplace`: each bank adds Gamma(1/m, b) - Gamma(1/m, b); the sum of any m shares is Laplace(b), b = L1
  sensitivity / epsilon: pure epsilon-DP.
- For both pure mechanisms m = `entity-min-banks`, and more shares only add independent noise
  (post-processing). In the disjoint layout a transaction moves one cell by 1, so L1 = L2 = 1: the Gaussian
  only wins when one record touches many cells. Fewer than m contributing shares: no guarantee is claimed
  (`achieved_epsilon` is inf) and the table is not published.
- `gaussian`: each bank adds N(0, sigma^2 / n_banks), calibrated as below.

Layout: a release is (2, days, buckets). On the wire (`LAYOUT_DISJOINT`) row 0 counts the transactions not
labelled fraud and row 1 the labelled frauds, so one transaction moves exactly one cell by 1: L2 sensitivity
1. The server publishes row 0 as all transactions (row 0 + row 1, post-processing), the table every consumer
reads. The older layout (all transactions, frauds) needs sensitivity sqrt(2) for the same epsilon: a fraud
moves both rows.

Gaussian calibration (no home-made accountant): sigma = sensitivity * z, where z comes from
`opacus.accountants.utils.get_noise_multiplier(..., sample_rate=1.0, steps=1, accountant="rdp")`. With
q = 1 Opacus' `_compute_rdp` returns the exact Renyi DP of the plain Gaussian mechanism, alpha / (2 z^2),
and `get_privacy_spent` converts it to (epsilon, delta) with Balle et al. 2020 (Theorem 21): a valid,
slightly conservative bound for one release (Opacus' PRV accountant gives a ~5% smaller sigma; we keep
the simpler, well-understood RDP bound). The bisection returns the upper end, so the achieved epsilon
is <= the target (within Opacus' epsilon_tolerance of 0.01 below it).

Gaussian dropouts: if only k of n banks add their shares, the release carries noise sigma * sqrt(k / n);
`achieved_epsilon` reports the epsilon that this smaller noise actually gives (same Opacus accountant).
Shares are truncated at +-`clip_sigmas` share standard deviations (default 12) so SecAgg+ can bound the
encoded values; truncation changes each cell's distribution by total variation <= 2 * P(|Z| > 12) ~ 4e-33,
which adds at most that much per cell and bank to delta (negligible). The pure mechanisms' shares are
truncated likewise (`models.release_shares`), which makes them (epsilon, ~1e-17 per bank and cell).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from models.config_entity import PURE_RELEASE_MECHANISMS, RELEASE_MECHANISMS

logger = logging.getLogger(__name__)

LAYOUT_DISJOINT = "disjoint"
"""Release layout on the wire: [0] transactions not labelled fraud, [1] labelled frauds (sensitivity 1)."""
LAYOUT_COUNTS = "counts"
"""The published (and older wire) layout: [0] all transactions, [1] labelled frauds (sensitivity sqrt 2)."""
GAUSSIAN = "gaussian"
LAPLACE = "laplace"
DISCRETE_LAPLACE = "discrete-laplace"
PURE_MECHANISMS = PURE_RELEASE_MECHANISMS
"""Mechanisms with pure epsilon-DP, calibrated for `entity-min-banks` shares and refused below them."""
MECHANISMS = RELEASE_MECHANISMS


def is_pure(mechanism: str) -> bool:
    """Whether a release mechanism gives pure epsilon-DP (Laplace, discrete Laplace)."""
    return mechanism in PURE_MECHANISMS


@dataclass(frozen=True)
class ReleaseNoise:
    """Privacy parameters of one release; sigma is the std of the TOTAL noise per cell (0 means no DP).

    `sensitivity` is the L2 sensitivity for the Gaussian, the L1 sensitivity for the pure mechanisms.
    """

    epsilon: float
    delta: float
    sensitivity: float
    sigma: float
    mechanism: str = GAUSSIAN

    @property
    def laplace_scale(self) -> float:
        """The Laplace scale b of the total noise (sigma / sqrt 2); 0 without noise."""
        return self.sigma / math.sqrt(2.0)

    @property
    def geometric_ratio(self) -> float:
        """The discrete Laplace's alpha = exp(-epsilon / sensitivity): P(k) ~ alpha^|k| (0 without noise)."""
        return math.exp(-self.epsilon / self.sensitivity)


def _discrete_laplace(epsilon: float, delta: float, sensitivity: float) -> ReleaseNoise:
    """The two-sided geometric mechanism for an integer sensitivity: std sqrt(2 alpha) / (1 - alpha)."""
    if sensitivity != round(sensitivity):
        raise ValueError(f"the discrete Laplace needs an integer sensitivity, got {sensitivity!r}")
    alpha = math.exp(-epsilon / sensitivity)
    sigma = math.sqrt(2.0 * alpha) / (1.0 - alpha)
    logger.info("entity release: discrete Laplace, epsilon %.3g, alpha %.4g, std %.4g", epsilon, alpha, sigma)
    return ReleaseNoise(
        epsilon=epsilon, delta=delta, sensitivity=sensitivity, sigma=sigma, mechanism=DISCRETE_LAPLACE
    )


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _rdp_epsilon(noise_multiplier: float, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, 1.0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the smallest/largest alpha": bound stays valid
        return float(accountant.get_epsilon(delta=delta))


def _check_mechanism(mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown entity release mechanism {mechanism!r} (known: {', '.join(MECHANISMS)})")


def layout_sensitivity(layout: str, *, mechanism: str = GAUSSIAN) -> float:
    """Sensitivity (L2 for the Gaussian, L1 for the pure mechanisms) of a release in this layout."""
    _check_mechanism(mechanism)
    if layout == LAYOUT_DISJOINT:
        return 1.0
    if layout == LAYOUT_COUNTS:  # a fraud moves two cells by 1
        return 2.0 if is_pure(mechanism) else math.sqrt(2.0)
    raise ValueError(f"unknown entity release layout {layout!r} (known: {LAYOUT_DISJOINT}, {LAYOUT_COUNTS})")


def _is_disjoint(layout: str) -> bool:
    layout_sensitivity(layout)  # refuses an unknown layout by name
    return layout == LAYOUT_DISJOINT


def to_wire_layout(table: np.ndarray, layout: str) -> np.ndarray:
    """A bank's (counts, frauds) table in the release's wire layout."""
    out = np.array(table, dtype=np.float64)
    if _is_disjoint(layout):
        out[0] -= out[1]
    return out


def from_wire_layout(table: np.ndarray, layout: str) -> np.ndarray:
    """The decoded sum back in the published (counts, frauds) layout (post-processing, no privacy cost)."""
    out = np.array(table, dtype=np.float64)
    if _is_disjoint(layout):
        out[0] += out[1]
    return out


def calibrate_release(
    *, epsilon: float, delta: float, sensitivity: float = 1.0, mechanism: str = GAUSSIAN
) -> ReleaseNoise:
    """Noise for one release of this `sensitivity` (`layout_sensitivity`: 1 for the disjoint layout)."""
    _check_mechanism(mechanism)
    if math.isnan(epsilon) or epsilon <= 0.0:
        raise ValueError(f"epsilon must be > 0 (math.inf disables noise), got {epsilon!r}")
    _check_delta(delta)
    if not (math.isfinite(sensitivity) and sensitivity > 0.0):
        raise ValueError(f"sensitivity must be finite and > 0, got {sensitivity!r}")
    if math.isinf(epsilon):
        logger.warning("entity release without differential privacy (epsilon=inf): sigma = 0")
        return ReleaseNoise(
            epsilon=math.inf, delta=delta, sensitivity=sensitivity, sigma=0.0, mechanism=mechanism
        )
    if mechanism == DISCRETE_LAPLACE:
        return _discrete_laplace(epsilon, delta, sensitivity)
    if mechanism == LAPLACE:
        scale = sensitivity / epsilon
        logger.info(
            "entity release: Laplace, epsilon %.3g -> scale %.4g (std %.4g)", epsilon, scale, scale * 2**0.5
        )
        return ReleaseNoise(
            epsilon=epsilon,
            delta=delta,
            sensitivity=sensitivity,
            sigma=scale * math.sqrt(2.0),
            mechanism=LAPLACE,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1, accountant="rdp"
        )
    sigma = float(z) * sensitivity
    logger.info(
        "entity release: epsilon %.3g, delta %.1e -> noise multiplier %.4g, sigma %.4g",
        epsilon,
        delta,
        z,
        sigma,
    )
    return ReleaseNoise(epsilon=epsilon, delta=delta, sensitivity=sensitivity, sigma=sigma)


def check_table(table: np.ndarray) -> np.ndarray:
    """The release as published: the noisy totals, float64 (2, days, buckets), finite, NOT clipped per cell.

    Post-processing happens where the table is used, on window sums (counts clipped at 0, fraud rates to
    [0, 1], `clients.entity.consortium_features`): clipping every noisy cell first would bias each window
    upward by the sum of the cells' clipped-off negative noise.
    """
    arr = np.asarray(table, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] != 2:
        raise ValueError(f"table must have shape (2, days, buckets), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("table must be finite")
    return arr


def composed_epsilon(
    noise_multipliers: Sequence[float], *, delta: float, pure_epsilons: Sequence[float] = ()
) -> float:
    """Epsilon of several releases of the same records at `delta`.

    Gaussian releases (their noise multipliers) compose by Opacus' RDP accountant; pure epsilon-DP releases
    (Laplace, discrete Laplace) add their epsilons on top (basic composition: (e1, delta) and (e2, 0) give
    (e1 + e2, delta)).
    """
    _check_delta(delta)
    pure = float(sum(pure_epsilons))
    if not noise_multipliers:
        return pure
    if any(not z > 0.0 for z in noise_multipliers):
        return math.inf  # a release without noise (or a bad multiplier) has no finite epsilon
    accountant = RDPAccountant()
    accountant.history = [(float(z), 1.0, 1) for z in noise_multipliers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta)) + pure


def achieved_epsilon(noise: ReleaseNoise, *, contributing: int, n_banks: int) -> float:
    """Epsilon actually achieved when `contributing` banks added a share of noise split n_banks ways.

    Pure mechanisms: the target when contributing >= n_banks (the calibrated minimum), else inf.
    """
    if n_banks < 1:
        raise ValueError(f"n_banks must be >= 1, got {n_banks!r}")
    if is_pure(noise.mechanism) and contributing >= 1:
        return _pure_achieved(noise, contributing=contributing, n_banks=n_banks)
    if contributing < 1:
        raise ValueError(f"contributing must be >= 1, got {contributing!r}")
    if noise.sigma == 0.0:
        return math.inf
    if contributing >= n_banks:  # more shares than calibrated for only add noise
        return noise.epsilon
    effective = noise.sigma * math.sqrt(contributing / n_banks)
    eps = _rdp_epsilon(effective / noise.sensitivity, noise.delta)
    # never report less than the calibrated target (the target is itself an upper bound at full noise)
    eps = max(eps, noise.epsilon)
    logger.warning(
        "entity release: %d of %d banks added noise -> sigma %.4g, epsilon %.4g (target %.4g)",
        contributing,
        n_banks,
        effective,
        eps,
        noise.epsilon,
    )
    return eps


def _pure_achieved(noise: ReleaseNoise, *, contributing: int, n_banks: int) -> float:
    if noise.sigma == 0.0:
        return math.inf
    if contributing >= n_banks:
        return noise.epsilon
    logger.warning(
        "entity release: %d banks added %s noise shares, calibrated for at least %d: no epsilon holds",
        contributing,
        noise.mechanism,
        n_banks,
    )
    return math.inf
