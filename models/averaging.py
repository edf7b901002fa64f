"""Tail averaging of the global model: the served model is the mean of the last rounds' global models.

Under DP-SGD each round's global model carries fresh noise, so the last iterate wanders around the optimum;
the mean of the last rounds' models (Polyak-Ruppert tail averaging) cancels much of it. It is computed from
models the server already holds, so it is post-processing: it costs no privacy. Training itself continues
from the plain FedAvg model; only the model that is served (scored, exported) is the average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def first_averaged_round(rounds: int, fraction: float) -> int:
    """The first round whose global model enters the average (the last ceil(fraction * rounds) rounds)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    return rounds - max(1, math.ceil(fraction * rounds)) + 1


@dataclass
class TailAverage:
    """Running mean of the global models from round `first` on (checkpointable: sum and count)."""

    first: int
    total: list[np.ndarray] = field(default_factory=list)
    count: int = 0

    def add(self, round_no: int, weights: Sequence[np.ndarray]) -> None:
        """Take a round's global model into the mean when the round is inside the tail."""
        if round_no < self.first:
            return
        arrays = [np.asarray(w, dtype=np.float64) for w in weights]
        if self.total and [a.shape for a in arrays] != [t.shape for t in self.total]:
            raise ValueError("weights: shapes differ from the models already averaged")
        self.total = [t + a for t, a in zip(self.total, arrays, strict=True)] if self.total else arrays
        self.count += 1

    def value(self, fallback: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The averaged model (float32), or `fallback` while no round of the tail has been seen."""
        if self.count == 0:
            return [np.asarray(w) for w in fallback]
        return [(t / self.count).astype(np.float32) for t in self.total]
