"""Record-level DP-SGD with Opacus (`DPSGD`) and its accounting (`epsilon_of`), for `clients.privacy`.

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
from typing import TYPE_CHECKING, Any

import numpy as np
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from clients.privacy_opacus import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, BudgetGuard, make_private
from clients.privacy_state import _SAME_RTOL, History, _check_count, _check_number, _restore

if TYPE_CHECKING:  # Flower's value type, so that ConfigRecord(step.state()) type-checks; values produced are
    # only int, float, str, list[int] and list[float]
    from flwr.app import ConfigRecordValues as StateValue

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")  # Opacus' "gdp" is an approximation, not an upper bound: refused
BUDGET_RTOL = 1e-9


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
        return calibrate_sigma(
            epsilon=self.epsilon,
            delta=self.delta,
            sample_rate=self.sample_rate,
            planned_steps=self.planned_steps,
            accountant=self.accountant_name,
        )

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

    def record_steps(self, steps: int) -> None:
        """Account `steps` DP-SGD steps taken outside Opacus' optimizer, one by one as its step hook does."""
        for _ in range(_check_count("steps", steps, minimum=0)):
            self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

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


@functools.lru_cache(maxsize=1024)
def calibrate_sigma(
    *, epsilon: float, delta: float, sample_rate: float, planned_steps: int, accountant: str = "rdp"
) -> float:
    """Return the sigma spending (epsilon, delta) over planned_steps at sample_rate (cached: it is slow)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=planned_steps,
                accountant=accountant,
                epsilon_tolerance=min(0.01, 0.005 * epsilon),
            )
    except ValueError as exc:
        raise ValueError(
            f"epsilon {epsilon} is too small for {planned_steps} steps at "
            f"sample rate {sample_rate:.4g} (delta {delta:g}): {exc}"
        ) from exc
    logger.info(
        "calibrated DP-SGD: sigma %.4f for epsilon %g, delta %g, %d steps at sample rate %.4g",
        sigma,
        epsilon,
        delta,
        planned_steps,
        sample_rate,
    )
    return float(sigma)


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
