"""An entity release as the server announces it, and the server settings of a small one (entity tests)."""

from __future__ import annotations

from typing import Any

from models.config import load_config
from models.release_noise import GAUSSIAN, calibrate_release
from server.server_app import ServerSettings


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
    """The release's public fields, with its mechanism and noise split as the server announces them."""
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
        "mechanism": mechanism,
        "noise-banks": noise_banks or banks,
    }
    return release


def small_release_settings(**overrides: Any) -> ServerSettings:
    """Server settings for a release over 4 banks, 5 days and 256 buckets, without SecAgg+."""
    raw = {"entity-features": "merchant_id", "entity-buckets": 256, "secagg": False, **overrides}
    return ServerSettings(
        config=load_config(raw),
        n_banks=4,
        feature_names=(),
        feature_version="",
        entity_start="2024-01-01",
        entity_days=5,
    )
