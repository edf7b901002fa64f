"""Opacus glue for `clients.privacy`: private (model, optimizer, loader), fast clipping, budget guard.

`make_private` runs `PrivacyEngine.make_private` with noise and Poisson sampling drawn from OS entropy
(never from a configured seed). Opacus' grad-sample modes "hooks", "ew", "functorch" are used as they are.
The default "fused" mode is one-pass ghost clipping for Linear/LayerNorm models (`clients.fused_clipping`,
whose docstring states what it assumes): per-sample gradient norms and the clipped sum come from each
layer's input and output gradient at the end of the ordinary backward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from clients.fused_clipping import FusedClipper, FusedDPOptimizer

# DPStepError and UnsupportedModelError are re-exported (noqa: F401): they were defined here before the split.
from clients.privacy_errors import DPStepError, PrivacyBudgetExhausted, UnsupportedModelError  # noqa: F401

logger = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("fused", "hooks", "ew", "functorch")
DEFAULT_GRAD_SAMPLE_MODE = "fused"


class BudgetGuard:
    """Optimizer step hook: refuse an update beyond the budget, else run the accountant's hook.

    `admissible(limit)`, how many more steps (<= limit) fit the budget, is asked once per `chunk` steps.
    """

    def __init__(
        self,
        inner: Callable[[Any], None] | None,
        *,
        admissible: Callable[[int], int],
        chunk: int,
        describe: Callable[[], str],
    ) -> None:
        self._inner, self._admissible, self._describe = inner, admissible, describe
        self._chunk = max(1, chunk)
        self._left = 0

    def __call__(self, optimizer: Any) -> None:
        """Raise PrivacyBudgetExhausted (before the update is applied) or account the step."""
        if self._left == 0:
            self._left = self._admissible(self._chunk)
            if self._left == 0:
                raise PrivacyBudgetExhausted(
                    f"one more DP-SGD step would exceed {self._describe()}: the update was not applied"
                )
        if self._inner is not None:
            self._inner(optimizer)
        self._left -= 1


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """Return a torch.Generator on `device` seeded from OS entropy (never from a configured seed)."""
    generator = torch.Generator(device=device)
    generator.seed()
    return generator


def make_private(
    engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
) -> tuple[nn.Module, DPOptimizer, DataLoader]:
    """Run `engine.make_private` (Poisson sampling, mean loss, entropy-seeded) in the grad-sample mode."""
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {grad_sample_mode!r}"
        )
    device = next(iter(module.parameters()), torch.empty(0)).device  # noise is drawn where the params are
    common: dict[str, Any] = {
        "data_loader": data_loader,
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "poisson_sampling": True,
        "noise_generator": entropy_generator(device),
    }
    if grad_sample_mode != "fused":
        private, dp_optimizer, loader = engine.make_private(
            module=module, optimizer=optimizer, grad_sample_mode=grad_sample_mode, **common
        )
        return private, dp_optimizer, _reseed_sampler(loader)
    clipper = FusedClipper(module, max_grad_norm=max_grad_norm)  # refuses unsupported models first
    # Opacus' ghost mode builds what the fused mode keeps (Poisson loader, expected batch size, noise
    # generator, accountant hook); its second-backward hooks are removed and its optimizer re-typed.
    try:
        gsm, ghost_optimizer, _criterion, loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=nn.BCEWithLogitsLoss(),
            grad_sample_mode="ghost",
            **common,
        )
    except Exception:
        clipper.remove()
        raise
    gsm.to_standard_module()
    fused = FusedDPOptimizer(
        ghost_optimizer.original_optimizer,
        clipper=clipper,
        noise_multiplier=ghost_optimizer.noise_multiplier,
        max_grad_norm=ghost_optimizer.max_grad_norm,
        expected_batch_size=ghost_optimizer.expected_batch_size,
        generator=ghost_optimizer.generator,
        secure_mode=ghost_optimizer.secure_mode,
    )
    fused.attach_step_hook(ghost_optimizer.step_hook)
    return module, fused, _reseed_sampler(loader)


def _reseed_sampler(loader: DataLoader) -> DataLoader:
    """Make Opacus' Poisson sampler draw from OS entropy, not the source loader's (seeded) generator."""
    sampler = loader.batch_sampler
    if not isinstance(sampler, UniformWithReplacementSampler):
        raise TypeError(f"expected Opacus' Poisson sampler, got {type(sampler).__name__}")
    sampler.generator = entropy_generator()
    return loader
