"""Names and order of the local features: a versioned contract shared by banks, server and scoring."""

from __future__ import annotations

FEATURE_VERSION = "local-v1"
WINDOWS_DAYS: tuple[int, ...] = (1, 7, 30)

_TIME_FEATURES: tuple[str, ...] = ("log_amount", "hour_sin", "hour_cos", "is_weekend", "is_night")
_CARD_STATS: tuple[str, ...] = ("card_count", "card_mean_amount", "card_amount_ratio")
_MERCHANT_STATS: tuple[str, ...] = ("merchant_count", "merchant_fraud_rate")

LOCAL_FEATURES: tuple[str, ...] = (
    *_TIME_FEATURES,
    *(f"{stat}_{w}d" for stat in _CARD_STATS for w in WINDOWS_DAYS),
    *(f"{stat}_{w}d" for stat in _MERCHANT_STATS for w in WINDOWS_DAYS),
)

CONSORTIUM_VERSION = "consortium-v1"
CONSORTIUM_FEATURES: tuple[str, ...] = (
    *(f"consortium_count_{w}d" for w in WINDOWS_DAYS),
    *(f"consortium_fraud_rate_{w}d" for w in WINDOWS_DAYS),
)
"""Merchant statistics over all banks (a secure, DP-noised release), appended to the local features."""
