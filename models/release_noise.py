"""Distributed Laplace or Gaussian noise for the cross-bank entity statistics release (day x bucket counts).

Each bank adds its noise share to every cell before SecAgg+ masking, so the masked sum of the shares carries
the release's noise and no party (server or bank) ever sees un-noised totals.

Mechanisms (`entity-mechanism`):
- `laplace` (default): each bank adds Gamma(1/m, b) - Gamma(1/m, b), m = `entity-min-banks`; the sum of any
  m shares is Laplace(b) (the Laplace distribution is infinitely divisible), and more shares only add
  independent noise (post-processing). b = L1 sensitivity / epsilon: pure epsilon-DP. In the disjoint layout a
  transaction moves one cell by 1, so L1 = L2 = 1, and at epsilon 3 the Laplace noise has std 0.47 against
  the Gaussian's 1.65 (delta 1e-6): the Gaussian only wins when one record touches many cells. Fewer than m
  contributing shares: no guarantee is claimed (`achieved_epsilon` is inf) and the table is not published.
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
which adds at most that much per cell and bank to delta (negligible). Laplace shares truncate each Gamma draw
at `LAPLACE_TAIL_SCALES` * b; a Gamma with shape <= 1 exceeds it with probability <= exp(-40) ~ 4e-18, so
the pure epsilon-DP release becomes (epsilon, ~1e-17 per bank) in the same way (negligible).
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

from models.config_entity import RELEASE_MECHANISMS

logger = logging.getLogger(__name__)

LAYOUT_DISJOINT = "disjoint"
"""Release layout on the wire: [0] transactions not labelled fraud, [1] labelled frauds (sensitivity 1)."""
LAYOUT_COUNTS = "counts"
"""The published (and older wire) layout: [0] all transactions, [1] labelled frauds (sensitivity sqrt 2)."""
GAUSSIAN = "gaussian"
LAPLACE = "laplace"
MECHANISMS = RELEASE_MECHANISMS
LAPLACE_TAIL_SCALES = 40.0
"""Each Gamma draw of a Laplace share is truncated at this many Laplace scales b (see module docstring)."""
DEFAULT_CLIP_SIGMAS = 12.0
"""Each noise share is truncated at this many share standard deviations (see module docstring)."""


@dataclass(frozen=True)
class ReleaseNoise:
    """Privacy parameters of one release; sigma is the std of the TOTAL noise per cell (0 means no DP).

    `sensitivity` is the L2 sensitivity for the Gaussian, the L1 sensitivity for the Laplace mechanism.
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
    """Sensitivity (L2 for the Gaussian, L1 for Laplace) of a release in this layout to one transaction."""
    _check_mechanism(mechanism)
    if layout == LAYOUT_DISJOINT:
        return 1.0
    if layout == LAYOUT_COUNTS:  # a fraud moves two cells by 1
        return 2.0 if mechanism == LAPLACE else math.sqrt(2.0)
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


def share_std(noise: ReleaseNoise, *, n_banks: int) -> float:
    """Standard deviation of one bank's noise share when the noise is split n_banks ways: sigma / sqrt(n)."""
    if n_banks < 1:
        raise ValueError(f"n_banks must be >= 1, got {n_banks!r}")
    return noise.sigma / math.sqrt(n_banks)


def share_bound(noise: ReleaseNoise, *, n_banks: int, clip_sigmas: float = DEFAULT_CLIP_SIGMAS) -> float:
    """Largest absolute value of one bank's noise share (what the SecAgg+ plan must leave room for)."""
    if noise.mechanism == LAPLACE:
        return LAPLACE_TAIL_SCALES * noise.laplace_scale
    return clip_sigmas * share_std(noise, n_banks=n_banks)


def noise_share(
    shape: tuple[int, ...],
    *,
    noise: ReleaseNoise,
    n_banks: int,
    rng: np.random.Generator | None = None,
    clip_sigmas: float = DEFAULT_CLIP_SIGMAS,
) -> np.ndarray:
    """One bank's share per cell: the sum of n_banks shares carries the release's noise (std sigma).

    Gaussian: N(0, sigma^2 / n_banks). Laplace: Gamma(1/n_banks, b) - Gamma(1/n_banks, b), n_banks being the
    fewest contributing banks the noise is calibrated for (`entity-min-banks`).
    """
    if not clip_sigmas >= 8.0:
        raise ValueError(f"clip_sigmas must be >= 8 (truncation must stay negligible), got {clip_sigmas!r}")
    std = share_std(noise, n_banks=n_banks)
    if std == 0.0:
        return np.zeros(shape, dtype=np.float64)
    generator = rng if rng is not None else np.random.default_rng()  # OS entropy by default
    if noise.mechanism == LAPLACE:
        b, bound = noise.laplace_scale, share_bound(noise, n_banks=n_banks)
        halves = [np.minimum(generator.gamma(1.0 / n_banks, b, size=shape), bound) for _ in range(2)]
        return halves[0] - halves[1]
    share = generator.normal(0.0, std, size=shape)
    bound = clip_sigmas * std
    return np.clip(share, -bound, bound)


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

    Gaussian releases (their noise multipliers) compose by Opacus' RDP accountant; pure epsilon-DP (Laplace)
    releases add their epsilons on top (basic composition: (e1, delta) and (e2, 0) give (e1 + e2, delta)).
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

    Laplace: the target when contributing >= n_banks (the calibrated minimum), else inf (no guarantee).
    """
    if n_banks < 1:
        raise ValueError(f"n_banks must be >= 1, got {n_banks!r}")
    if noise.mechanism == LAPLACE and contributing >= 1:
        return _laplace_achieved(noise, contributing=contributing, n_banks=n_banks)
    if not 1 <= contributing <= n_banks:
        raise ValueError(f"contributing must be in [1, n_banks={n_banks}], got {contributing!r}")
    if noise.sigma == 0.0:
        return math.inf
    if contributing == n_banks:
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


def _laplace_achieved(noise: ReleaseNoise, *, contributing: int, n_banks: int) -> float:
    if noise.sigma == 0.0:
        return math.inf
    if contributing >= n_banks:
        return noise.epsilon
    logger.warning(
        "entity release: %d banks added Laplace noise shares, calibrated for at least %d: no epsilon holds",
        contributing,
        n_banks,
    )
    return math.inf
