"""Exact integer sums through Flower's SecAgg+ (entity statistics round).

What Flower 1.42 does (read from the installed code):

* client, `flwr/client/mod/secure_aggregation/secaggplus_mod.py` (`_stage_2`): ratio = num_examples /
  max_weight; with num_examples = 1 and max_weight = 1, q_ratio = round(1 * Q) = Q and the vector is
  multiplied by dq_ratio = 1.0 (exact). `quantize` (`flwr/common/secure_aggregation/quantization.py`)
  computes p = (clip(x, -c, c) + c) * Q / (2c) and applies `_stochastic_round`: ceil(p) as int32, minus 1
  with probability ceil(p) - p. So q is in {ceil(p) - 1, ceil(p)}, q in [0, Q], |q - p| < 1 (0 when p is
  an integer), and Q must be <= 2**31 - 1 (int32 cast). q_ratio is prepended (`factor_combine`), masks
  added, everything taken mod M.
* server, `flwr/server/workflow/secure_aggregation/secaggplus_workflow.py` stage "unmask": masks removed,
  S = sum mod M; `factor_extract` gives the summed ratio k * Q; `dequantize` gives S * 2c / Q - c; the
  offset -(k - 1) * c and the factor Q / (k * Q) then yield the mean of the k active banks' encoded
  values; FedAvg (`flwr/server/strategy/aggregate.py`) averages k identical copies with weight 1.

Error bound: with no wrap (sum of k values in [0, Q] and the ratio k * Q both < M, i.e. n * Q < M), the
decoded sum mean * k * scale equals sum(v_i) + (2 c scale / Q) * sum(q_i - p_i), so
|error| < k * 2 * c * scale / Q = k * 2 * max_value / Q <= n * 2 * max_value / Q, plus float64 rounding
(bounded by 4 * eps * max_value * n * (n + 16), FedAvg's sequential sum included). When that is < 0.5,
np.rint returns the exact integer sum of noiseless integer tables. With noise shares the decoded value is
the noisy sum up to this (bounded, < 0.5) quantization error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.secagg import SecAggConfigError

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
"""Flower's `_stochastic_round` casts ceil(p) to int32, so the quantization range must not exceed this."""
MAX_MODULUS = 2**32
"""Largest modulus range accepted (Flower's default modulus_range)."""
_FLOAT_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class ExactSumPlan:
    """SecAgg+ settings and the scaling that make the masked sum of bounded tables exact after rounding."""

    scale: float
    quantization_range: int
    modulus_range: int
    clipping_range: float
    n_banks: int
    max_value: float

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Bank side: values / scale, within +-clipping_range; refuses values beyond max_value."""
        arr = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("values must be finite")
        worst = float(np.max(np.abs(arr))) if arr.size else 0.0
        if worst > self.max_value:
            raise ValueError(
                f"values: |value| {worst:.6g} exceeds the plan's max_value {self.max_value:.6g}; "
                "SecAgg+ would clip it silently"
            )
        return arr / self.scale

    def decode(
        self, mean_of_encoded: np.ndarray, *, contributing: int | None = None, integers: bool = False
    ) -> np.ndarray:
        """Server side: mean * contributing banks * scale; np.rint when `integers` (integer shares)."""
        k = self.n_banks if contributing is None else contributing
        if not 1 <= k <= self.n_banks:
            raise ValueError(f"contributing must be in [1, n_banks={self.n_banks}], got {contributing!r}")
        total = np.asarray(mean_of_encoded, dtype=np.float64) * k * self.scale
        return np.rint(total) if integers else total

    def max_abs_error(self) -> float:
        """Worst-case error of the decoded sum: n * 2 * max_value / Q plus float64 rounding."""
        n = self.n_banks
        quantization = n * 2.0 * self.max_value / self.quantization_range
        rounding = 4.0 * _FLOAT_EPS * self.max_value * n * (n + 16)
        return quantization + rounding

    def workflow_kwargs(self) -> dict[str, Any]:
        """Quantization arguments for `SecAggPlusWorkflow` (banks must send num_examples=1)."""
        return {
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "modulus_range": self.modulus_range,
            "max_weight": 1.0,
        }


def plan_exact_sum(
    *, n_banks: int, max_value: float, modulus_range: int = 2**32, clipping_range: float = 8.0
) -> ExactSumPlan:
    """Pick Q with n*Q < M (no wrap) and decoded-sum error < 0.5, else raise SecAggConfigError naming why."""
    if n_banks < 1:
        raise SecAggConfigError(f"n_banks must be >= 1, got {n_banks!r}")
    if not (math.isfinite(max_value) and max_value > 0.0):
        raise SecAggConfigError(f"max_value must be finite and > 0, got {max_value!r}")
    if not (math.isfinite(clipping_range) and clipping_range > 0.0):
        raise SecAggConfigError(f"clipping_range must be finite and > 0, got {clipping_range!r}")
    if modulus_range < 2 or modulus_range & (modulus_range - 1) or modulus_range > MAX_MODULUS:
        raise SecAggConfigError(f"modulus_range must be a power of 2 in [2, 2**32], got {modulus_range!r}")
    q = min((modulus_range - 1) // n_banks, INT32_MAX)  # largest Q with n * Q < M: finest quantization
    if q < 1:
        raise SecAggConfigError(
            f"n_banks: {n_banks} banks cannot sum without overflow under modulus_range {modulus_range}"
        )
    plan = ExactSumPlan(
        scale=max_value / clipping_range,
        quantization_range=q,
        modulus_range=modulus_range,
        clipping_range=clipping_range,
        n_banks=n_banks,
        max_value=max_value,
    )
    error = plan.max_abs_error()
    if error >= 0.5:
        largest = 0.5 * q / (2.0 * n_banks)
        raise SecAggConfigError(
            f"overflow/precision: {n_banks} banks with max_value {max_value:.6g} need a quantization "
            f"range above {4 * n_banks * max_value:.6g}, but n * Q < modulus_range {modulus_range} allows "
            f"at most {q} (worst-case error {error:.3g} >= 0.5); lower max_value below about "
            f"{largest:.6g}, use fewer banks per sum or a larger modulus_range"
        )
    logger.info(
        "exact sum: %d banks, max_value %.6g, Q %d, modulus 2^%.0f, worst-case error %.3g",
        n_banks,
        max_value,
        q,
        math.log2(modulus_range),
        error,
    )
    return plan
