"""An entity release as the server announces it (test_release_ledger.py, test_entity_laplace.py)."""

from __future__ import annotations

from typing import Any

from models.release_noise import GAUSSIAN, calibrate_release, is_pure


def announced(
    release_id: str,
    start: str = "2024-01-01",
    days: int = 30,
    epsilon: float = 3.0,
    *,
    banks: int = 10,
    mechanism: str = GAUSSIAN,
    noise_banks: int | None = None,
) -> dict[str, Any]:
    """The release's public fields; pure-DP ones also carry the mechanism and its noise split."""
    noise = calibrate_release(epsilon=epsilon, delta=1e-6, mechanism=mechanism)
    release: dict[str, Any] = {
        "id": release_id,
        "column": "merchant_id",
        "start": start,
        "days": days,
        "sigma": noise.sigma,
        "sensitivity": noise.sensitivity,
        "layout": "disjoint",
        "delta": 1e-6,
        "epsilon": epsilon,
        "banks": banks,
    }
    if is_pure(mechanism):
        release |= {"mechanism": mechanism, "noise-banks": noise_banks or banks}
    return release
