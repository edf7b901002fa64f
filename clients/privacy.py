"""Pluggable record-level privacy for a bank's local training: `NoPrivacy` or `DPSGD` (Opacus).

Training never branches on DP: it asks the step whether a round fits (`admits`), lets it `wrap`
(model, optimizer, loader), trains, and persists `state()` in the ClientApp's `context.state`.

DP-SGD accounting spans rounds: a ClientApp is re-created per message, and a fresh `PrivacyEngine` per round
would restart the accountant (the bug of Flower's Opacus example). So `DPSGD` calibrates sigma ONCE for the
bank's whole planned participation, restores the accountant's (sigma, sample rate, steps) history from
`state` into each round's `PrivacyEngine` (Opacus adds the steps it takes), refuses a state whose budget,
delta or accountant differ (ValueError naming the key), and enforces the budget: `admits` for the
ClientApp, and a step-hook guard raising `PrivacyBudgetExhausted` before an update that would exceed it.

Sample rate: Opacus' Poisson loader samples rows with probability 1 / len(loader) = 1 / ceil(n / batch)
(= batch / n when batch divides n); the accountant records that rate, so calibration uses it too.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from clients.privacy_opacus import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    BudgetGuard,
    PrivacyBudgetExhausted,
    make_private,
)

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

History = list[tuple[float, float, int]]
ACCOUNTANTS = ("rdp", "prv")  # Opacus' "gdp" is an approximation, not an upper bound: refused
BUDGET_RTOL = 1e-9
_SAME_RTOL = 1e-12
_HISTORY_KEYS = ("dp-history-sigma", "dp-history-rate", "dp-history-steps")
_RESTORED_KEYS = ("dp-sigma", "dp-epsilon", "dp-delta", "dp-accountant", *_HISTORY_KEYS)


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


class DPSGD:
    """Record-level DP-SGD with Opacus: sigma calibrated once per bank, accountant carried across rounds.

    A restored `state` must match epsilon, delta and accountant; its sample rate, planned steps and clipping
    norm may differ (the bank's data grew, say): sigma stays, and the history accounts each rate exactly.
    """

    def __init__(
        self,
        *,
        epsilon: float,
        delta: float,
        max_grad_norm: float,
        sample_rate: float,
        planned_steps: int,
        accountant: str = "rdp",
        state: Mapping[str, Any] | None = None,
        grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    ) -> None:
        self.epsilon = _check_number("epsilon", epsilon)
        self.delta = _check_number("delta", delta, upper=1.0)
        self.max_grad_norm = _check_number("max_grad_norm", max_grad_norm)
        self.sample_rate = _check_number("sample_rate", sample_rate, upper=1.0, closed=True)
        self.planned_steps = _check_count("planned_steps", planned_steps, minimum=1)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {grad_sample_mode!r}"
            )
        self.accountant_name = accountant
        self.grad_sample_mode = grad_sample_mode
        self._accountant = create_accountant(mechanism=accountant)
        restored = _restore(state or {}, epsilon=self.epsilon, delta=self.delta, accountant=accountant)
        if restored is None:
            self.noise_multiplier = self._calibrate()
        else:
            self.noise_multiplier, history = restored
            self._accountant.load_state_dict({"history": history, "mechanism": accountant})
            logger.debug(
                "restored DP-SGD state: sigma %.4f, %d steps so far",
                self.noise_multiplier,
                sum(k for _, _, k in history),
            )

    def _calibrate(self) -> float:
        """Return the sigma that spends (epsilon, delta) over the planned steps at the sample rate."""
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                sigma = get_noise_multiplier(
                    target_epsilon=self.epsilon,
                    target_delta=self.delta,
                    sample_rate=self.sample_rate,
                    steps=self.planned_steps,
                    accountant=self.accountant_name,
                    epsilon_tolerance=min(0.01, 0.005 * self.epsilon),
                )
        except ValueError as exc:
            raise ValueError(
                f"epsilon {self.epsilon} is too small for {self.planned_steps} steps at "
                f"sample rate {self.sample_rate:.4g} (delta {self.delta:g}): {exc}"
            ) from exc
        logger.info(
            "calibrated DP-SGD: sigma %.4f for epsilon %g, delta %g, %d steps at sample rate %.4g",
            sigma,
            self.epsilon,
            self.delta,
            self.planned_steps,
            self.sample_rate,
        )
        return float(sigma)

    def _epsilon_after(self, steps: int) -> float:
        """Return epsilon after `steps` more steps at (sigma, sample rate), on a copy of the history."""
        extra = [(self.noise_multiplier, self.sample_rate, steps)] if steps > 0 else []
        return epsilon_of(self.history() + extra, delta=self.delta, accountant=self.accountant_name)

    def admits(self, *, steps: int) -> bool:
        """Whether `steps` more DP steps stay within the budget."""
        _check_count("steps", steps, minimum=0)
        return self._epsilon_after(steps) <= self.epsilon * (1.0 + BUDGET_RTOL)

    def admissible_steps(self, *, limit: int) -> int:
        """Return the largest k <= limit such that k more steps stay within the budget."""
        _check_count("limit", limit, minimum=0)
        if self.admits(steps=limit):
            return limit
        lo, hi = 0, limit  # admits(lo) (or lo == 0), not admits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.admits(steps=mid) else (lo, mid)
        return lo

    def wrap(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """Make (model, optimizer, loader) private for this round."""
        loader_rate = 1.0 / len(loader)
        if not math.isclose(loader_rate, self.sample_rate, rel_tol=_SAME_RTOL):
            raise ValueError(
                f"the loader has {len(loader)} batches, so Opacus samples at rate "
                f"{loader_rate:.6g}, but sample_rate is {self.sample_rate:.6g}: build the "
                "loader with the batch size and rows the privacy step was made for"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=self.accountant_name)
        engine.accountant = self._accountant  # the restored one: this round's steps add to its history
        private, dp_optimizer, dp_loader = make_private(
            engine,
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            grad_sample_mode=self.grad_sample_mode,
        )
        dp_optimizer.attach_step_hook(
            BudgetGuard(
                dp_optimizer.step_hook,
                admissible=lambda limit: self.admissible_steps(limit=limit),
                chunk=len(dp_loader),
                describe=lambda: f"epsilon {self.epsilon} (spent {self.spent():.4f})",
            )
        )
        logger.debug(
            "wrapped for DP-SGD (%s): sigma %.4f, C %g, sample rate %.4g",
            self.grad_sample_mode,
            self.noise_multiplier,
            self.max_grad_norm,
            self.sample_rate,
        )
        return private, dp_optimizer, dp_loader

    def spent(self) -> float:
        """Return the epsilon spent so far at delta (0.0 before any step)."""
        return self._epsilon_after(0)

    def history(self) -> History:
        """Return the accountant's (sigma, sample rate, steps) history, oldest first."""
        return [(float(s), float(q), int(k)) for s, q, k in self._accountant.history]

    def state(self) -> dict[str, StateValue]:
        """Flat, Flower ConfigRecord-compatible state to persist in context.state."""
        history = self.history()
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-accountant": self.accountant_name,
            "dp-sigma": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-planned-steps": self.planned_steps,
            "dp-max-grad-norm": self.max_grad_norm,
            "dp-history-sigma": [s for s, _, _ in history],
            "dp-history-rate": [q for _, q, _ in history],
            "dp-history-steps": [k for _, _, k in history],
            "dp-epsilon-spent": self.spent(),
        }


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, rate: float) -> tuple[float, ...]:
    """Return the RDP of one subsampled Gaussian step at Opacus' default orders (cached: it is slow)."""
    return tuple(
        rdp_analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    )


def epsilon_of(history: History, *, delta: float, accountant: str = "rdp") -> float:
    """Return epsilon at delta of a (sigma, sample rate, steps) history, as Opacus' accountant does."""
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant != "rdp":
            probe = create_accountant(mechanism=accountant)
            probe.history = list(history)
            return float(probe.get_epsilon(delta=delta))
        # RDPAccountant sums compute_rdp(q, sigma, k) = (one step's RDP) * k over its history: the same
        # arithmetic, with the one-step RDP cached.
        rdp = sum([np.asarray(_rdp_per_step(s, q)) * k for s, q, k in history])
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _check_count(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_number(name: str, value: float, *, upper: float = math.inf, closed: bool = False) -> float:
    ok = _finite(value) and value > 0 and (value <= upper if closed else value < upper)
    if not ok:
        raise ValueError(
            f"{name} must be a finite number in (0, {upper}{']' if closed else ')'}, got {value!r}"
        )
    return float(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _restore(
    state: Mapping[str, Any], *, epsilon: float, delta: float, accountant: str
) -> tuple[float, History] | None:
    """Return (sigma, history) from a persisted state, None if it holds no DP-SGD state."""
    present = [k for k in _RESTORED_KEYS if k in state]
    if not present:
        return None
    missing = [k for k in _RESTORED_KEYS if k not in state]
    if missing:
        raise ValueError(f"privacy state key '{missing[0]}' is missing (state has {', '.join(present)})")
    for key, expected in (("dp-epsilon", epsilon), ("dp-delta", delta)):
        stored = state[key]
        if not _finite(stored) or not math.isclose(stored, expected, rel_tol=_SAME_RTOL):
            raise ValueError(
                f"privacy state key '{key}' is {stored!r} but {expected!r} was requested: "
                "a bank cannot change its privacy budget mid-run (start a new run instead)"
            )
    if state["dp-accountant"] != accountant:
        raise ValueError(
            f"privacy state key 'dp-accountant' is {state['dp-accountant']!r} but "
            f"{accountant!r} was requested"
        )
    sigma = state["dp-sigma"]
    if not _finite(sigma) or sigma <= 0:
        raise ValueError(f"privacy state key 'dp-sigma' must be a positive number, got {sigma!r}")
    sigmas, rates, steps = (list(state[k]) for k in _HISTORY_KEYS)
    if not len(sigmas) == len(rates) == len(steps):
        raise ValueError(
            "privacy state keys 'dp-history-sigma', 'dp-history-rate', 'dp-history-steps' "
            f"have different lengths ({len(sigmas)}, {len(rates)}, {len(steps)})"
        )
    history = []
    for s, q, k in zip(sigmas, rates, steps, strict=True):
        if not (
            _finite(s)
            and s > 0
            and _finite(q)
            and 0 < q <= 1
            and isinstance(k, int)
            and not isinstance(k, bool)
            and k > 0
        ):
            raise ValueError(f"privacy state key 'dp-history-*' has an invalid entry ({s!r}, {q!r}, {k!r})")
        history.append((float(s), float(q), int(k)))
    return float(sigma), history


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
