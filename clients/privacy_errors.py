"""The errors of record-level privacy (`clients.privacy`, `clients.privacy_opacus`, `clients.fused_clipping`).

They live in their own module so that every privacy module can raise them without importing another.
"""

from __future__ import annotations


class PrivacyBudgetExhausted(RuntimeError):  # noqa: N818 (the ClientApp's contract)
    """The next DP-SGD step or round would spend more than the bank's (epsilon, delta) budget."""


class UnsupportedModelError(ValueError):
    """The model has a layer, input shape or use the chosen grad-sample mode cannot privatise."""


class DPStepError(RuntimeError):
    """A training step broke the DP-SGD protocol (step without private backward, or two backwards)."""
