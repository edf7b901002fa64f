"""Pluggable record-level privacy for a bank's local training: `NoPrivacy` or `DPSGD` (Opacus).

Training never branches on DP: it asks the step whether a round fits (`admits`), lets it `wrap`
(model, optimizer, loader), trains, and persists `state()` in the ClientApp's `context.state`.

This module is the public surface: the `PrivacyStep` protocol, `NoPrivacy`, `steps_per_round` and
`make_privacy_step`, with `DPSGD` and `epsilon_of` re-exported from `clients.dpsgd` (which explains the
cross-round accounting) and `PrivacyBudgetExhausted` from `clients.privacy_errors`. The Opacus glue lives
in `clients.privacy_opacus` and `clients.fused_clipping`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

# Re-exported (noqa: F401): names `clients.privacy` defined or imported before DPSGD moved to clients.dpsgd.
from clients.dpsgd import ACCOUNTANTS, BUDGET_RTOL, DPSGD, epsilon_of  # noqa: F401
from clients.privacy_errors import PrivacyBudgetExhausted
from clients.privacy_opacus import (  # noqa: F401
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    BudgetGuard,
    make_private,
)
from clients.privacy_state import History, _check_count  # noqa: F401

if TYPE_CHECKING:  # Flower's value type, so that ConfigRecord(step.state()) type-checks; values produced are
    # only int, float, str, list[int] and list[float]
    from flwr.app import ConfigRecordValues as StateValue

logger = logging.getLogger(__name__)

__all__ = [
    "DPSGD",
    "NoPrivacy",
    "PrivacyBudgetExhausted",
    "PrivacyStep",
    "epsilon_of",
    "make_privacy_step",
    "steps_per_round",
]


@runtime_checkable
class PrivacyStep(Protocol):
    """What local training needs from a privacy mechanism."""

    def admits(self, *, steps: int) -> bool:
        """Whether `steps` more DP steps stay within the budget."""
        ...

    def wrap(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """Make (model, optimizer, loader) private for this round."""
        ...

    def spent(self) -> float:
        """Epsilon spent so far (0.0 before any step, and for NoPrivacy by convention)."""
        ...

    def state(self) -> dict[str, StateValue]:
        """Flat, Flower ConfigRecord-compatible state to persist in context.state."""
        ...


class NoPrivacy:
    """No record-level DP: identity `wrap`, every round admitted, nothing to persist.

    `spent()` is 0.0 by convention (nothing is accounted), NOT a guarantee: report it as "DP off".
    """

    def admits(self, *, steps: int) -> bool:
        """Return True: there is no budget."""
        _check_count("steps", steps, minimum=0)
        return True

    def wrap(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """Return the inputs unchanged."""
        return model, optimizer, loader

    def spent(self) -> float:
        """Return 0.0: nothing is accounted (see the class docstring)."""
        return 0.0

    def state(self) -> dict[str, StateValue]:
        """Return {}: nothing to persist."""
        return {}


def steps_per_round(*, n_examples: int, batch_size: int, local_epochs: int) -> int:
    """Return the most DP steps one round takes: local_epochs * ceil(n_examples / batch_size)."""
    _check_count("n_examples", n_examples, minimum=1)
    _check_count("batch_size", batch_size, minimum=1)
    _check_count("local_epochs", local_epochs, minimum=1)
    return local_epochs * math.ceil(n_examples / batch_size)


def make_privacy_step(
    *,
    enabled: bool,
    epsilon: float,
    delta: float,
    max_grad_norm: float,
    n_examples: int,
    batch_size: int,
    local_epochs: int,
    planned_rounds: int,
    state: Mapping[str, Any] | None,
) -> PrivacyStep:
    """Build this round's privacy step: DPSGD (state restored) when enabled, else NoPrivacy."""
    if not enabled:
        if state is not None and "dp-sigma" in state:
            raise ValueError(
                "privacy state key 'dp-sigma' is present but DP is disabled: a bank cannot "
                "switch DP-SGD off mid-run"
            )
        return NoPrivacy()
    per_round = steps_per_round(n_examples=n_examples, batch_size=batch_size, local_epochs=local_epochs)
    rounds = _check_count("planned_rounds", planned_rounds, minimum=1)
    return DPSGD(
        epsilon=epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        sample_rate=1.0 / math.ceil(n_examples / batch_size),
        planned_steps=rounds * per_round,
        state=state,
    )
