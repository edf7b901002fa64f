"""Each bank's share of the entity release's noise, drawn before SecAgg+ masking (`models.release_noise`).

The shares of `n_banks` banks sum to the release's noise:
- Gaussian: N(0, sigma^2 / n_banks) each.
- Laplace: Gamma(1/m, b) - Gamma(1/m, b) each; any m of them sum to Laplace(b).
- Discrete Laplace: NB(1/m, 1 - alpha) - NB(1/m, 1 - alpha) each (numpy's negative binomial takes a real
  shape); NB(r1, p) + NB(r2, p) = NB(r1 + r2, p) and NB(1, p) is the geometric distribution, so any m shares
  sum to the difference of two geometrics: the discrete Laplace P(k) ~ alpha^|k|. The shares are integers.

Truncation, so that SecAgg+ can bound the encoded values:
- Gaussian shares at +-`clip_sigmas` share standard deviations (default 12; total variation <= 4e-33).
- Each Gamma draw at `TAIL_SCALES` * b: a Gamma with shape <= 1 exceeds it with probability <= exp(-40).
- Each negative binomial draw at ceil(`TAIL_SCALES` * sensitivity / epsilon): NB(r <= 1) is stochastically
  below the geometric, which exceeds K with probability alpha^(K + 1) < exp(-40).
Each truncation adds at most that probability (~4e-18) per bank and cell to delta: negligible.
"""

from __future__ import annotations

import math

import numpy as np

from models.release_noise import DISCRETE_LAPLACE, LAPLACE, ReleaseNoise

TAIL_SCALES = 40.0
"""Each draw of a pure mechanism's share is truncated at this many scales (see module docstring)."""
DEFAULT_CLIP_SIGMAS = 12.0
"""Each Gaussian noise share is truncated at this many share standard deviations (see module docstring)."""


def share_std(noise: ReleaseNoise, *, n_banks: int) -> float:
    """Standard deviation of one bank's noise share when the noise is split n_banks ways: sigma / sqrt(n)."""
    if n_banks < 1:
        raise ValueError(f"n_banks must be >= 1, got {n_banks!r}")
    return noise.sigma / math.sqrt(n_banks)


def share_bound(noise: ReleaseNoise, *, n_banks: int, clip_sigmas: float = DEFAULT_CLIP_SIGMAS) -> float:
    """Largest absolute value of one bank's noise share (what the SecAgg+ plan must leave room for)."""
    if noise.mechanism == DISCRETE_LAPLACE:
        return float(_geometric_bound(noise))
    if noise.mechanism == LAPLACE:
        return TAIL_SCALES * noise.laplace_scale
    return clip_sigmas * share_std(noise, n_banks=n_banks)


def _geometric_bound(noise: ReleaseNoise) -> int:
    if noise.sigma == 0.0:
        return 0
    return math.ceil(TAIL_SCALES * noise.sensitivity / noise.epsilon)


def noise_share(
    shape: tuple[int, ...],
    *,
    noise: ReleaseNoise,
    n_banks: int,
    rng: np.random.Generator | None = None,
    clip_sigmas: float = DEFAULT_CLIP_SIGMAS,
) -> np.ndarray:
    """One bank's share per cell (float64): the sum of n_banks shares carries the release's noise.

    For the pure mechanisms n_banks is the fewest contributing banks the noise is calibrated for
    (`entity-min-banks`).
    """
    if not clip_sigmas >= 8.0:
        raise ValueError(f"clip_sigmas must be >= 8 (truncation must stay negligible), got {clip_sigmas!r}")
    std = share_std(noise, n_banks=n_banks)
    if std == 0.0:
        return np.zeros(shape, dtype=np.float64)
    generator = rng if rng is not None else np.random.default_rng()  # OS entropy by default
    bound = share_bound(noise, n_banks=n_banks, clip_sigmas=clip_sigmas)
    if noise.mechanism == DISCRETE_LAPLACE:
        success = 1.0 - noise.geometric_ratio
        draws = [generator.negative_binomial(1.0 / n_banks, success, size=shape) for _ in "ab"]
        return (np.minimum(draws[0], bound) - np.minimum(draws[1], bound)).astype(np.float64)
    if noise.mechanism == LAPLACE:
        halves = [generator.gamma(1.0 / n_banks, noise.laplace_scale, size=shape) for _ in "ab"]
        return np.minimum(halves[0], bound) - np.minimum(halves[1], bound)
    return np.clip(generator.normal(0.0, std, size=shape), -bound, bound)
