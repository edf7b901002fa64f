"""SecAgg+ settings chosen from the number of banks, with a proof that the masked sum cannot overflow.

Flower's SecAgg+ quantizes each bank's weighted vector into [0, Q] (Q = quantization range) after clipping it
to +-clipping_range, sums modulo M (modulus range) and silently wraps on overflow. The sum of n banks is
at most n * Q, so it is exact only when n * Q < M; weights are quantized too (num_examples / max_weight, which
must stay <= 1). We refuse any configuration that breaks these bounds instead of letting it wrap.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from models.config import ConfigError, FederationConfig
from models.federation import CLIPPING_RANGE, MAX_WEIGHT

logger = logging.getLogger(__name__)


class SecAggConfigError(ConfigError):
    """A SecAgg+ configuration that could overflow or cannot reconstruct; the message says why."""


@dataclass(frozen=True)
class SecAggParams:
    """Arguments of Flower's SecAggPlusWorkflow for one federation."""

    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    def workflow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `SecAggPlusWorkflow`."""
        return {
            "num_shares": self.num_shares,
            "reconstruction_threshold": self.reconstruction_threshold,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "modulus_range": self.modulus_range,
            "max_weight": self.max_weight,
        }

    def max_error(self, n_banks: int) -> float:
        """Worst-case absolute quantization error of one coordinate of the weighted mean."""
        return n_banks * 2 * self.clipping_range / self.quantization_range


def choose_secagg(n_banks: int, config: FederationConfig, *, max_weight: float = MAX_WEIGHT) -> SecAggParams:
    """Pick shares and threshold from the number of banks per round and check that nothing can overflow."""
    if n_banks < 3:
        raise SecAggConfigError(
            f"SecAgg+ needs at least 3 banks per round, got {n_banks} (set secagg=false for smaller trials)"
        )
    shares = config.secagg_num_shares or min(n_banks, max(3, math.ceil(2 * math.log2(n_banks)) + 1))
    if shares < n_banks and shares % 2 == 0:
        shares += (
            1  # SecAgg+ builds a ring of (shares - 1) / 2 neighbours on each side: it needs an odd count
        )
    if not 2 < shares <= n_banks:
        raise SecAggConfigError(
            f"config key 'secagg-num-shares': {shares} must be > 2 and <= the {n_banks} banks per round"
        )
    threshold = config.secagg_reconstruction_threshold or max(2, math.ceil(0.6 * shares))
    threshold = min(threshold, shares - 1) if not config.secagg_reconstruction_threshold else threshold
    if not 1 < threshold < shares:
        raise SecAggConfigError(
            f"config key 'secagg-reconstruction-threshold': {threshold} must be in (1, num_shares={shares})"
        )
    q, m = config.secagg_quantization_range, config.secagg_modulus_range
    if n_banks * q >= m:
        raise SecAggConfigError(
            f"config key 'secagg-quantization-range': {n_banks} banks x {q} >= modulus {m}: the masked sum "
            f"could overflow and wrap silently; lower the quantization range below {m // n_banks} or raise "
            "'secagg-modulus-range'"
        )
    params = SecAggParams(
        num_shares=shares,
        reconstruction_threshold=threshold,
        clipping_range=CLIPPING_RANGE,
        quantization_range=q,
        modulus_range=m,
        max_weight=max_weight,
    )
    logger.info(
        "SecAgg+: %d banks, %d shares, threshold %d, quantization 2^%.0f, modulus 2^%.0f, max error %.1e",
        n_banks,
        shares,
        threshold,
        math.log2(q),
        math.log2(m),
        params.max_error(n_banks),
    )
    return params
