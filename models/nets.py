"""Torch modules for tabular fraud scoring, and flat weight exchange.

Only `nn.Linear`, `nn.LayerNorm` and `nn.ReLU` are used, so that Opacus' `GradSampleModule` can compute
per-sample gradients (BatchNorm mixes examples and is refused by Opacus). Every model returns one logit
per row, shape (N,).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from models.config import FedFraudConfig

logger = logging.getLogger(__name__)

MODEL_KINDS = ("mlp", "logreg")


def _check_n_features(n_features: int) -> None:
    if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
        raise ValueError(f"n_features must be a positive integer, got {n_features!r}")


class MLP(nn.Module):
    """Multi-layer perceptron: (Linear -> [LayerNorm] -> ReLU) per hidden layer, then Linear(..., 1)."""

    def __init__(
        self, n_features: int, hidden_sizes: Sequence[int] = (64, 64), *, layer_norm: bool = False
    ) -> None:
        super().__init__()
        _check_n_features(n_features)
        sizes = tuple(hidden_sizes)
        if not sizes or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in sizes):
            raise ValueError(f"hidden_sizes must be a non-empty sequence of positive integers, got {sizes!r}")
        layers: list[nn.Module] = []
        width = n_features
        for h in sizes:
            layers.append(nn.Linear(width, h))
            if layer_norm:
                layers.append(nn.LayerNorm(h))
            layers.append(nn.ReLU())
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Return one logit per row, shape (N,)."""
        return self.net(x).squeeze(-1)


class LogisticRegression(nn.Module):
    """Logistic regression: a single Linear(n_features, 1)."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        _check_n_features(n_features)
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Return one logit per row, shape (N,)."""
        return self.linear(x).squeeze(-1)


def _seeded_init(model: nn.Module, seed: int) -> None:
    """Re-initialise every Linear as PyTorch's default does, drawing from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                bound = 1.0 / math.sqrt(module.in_features)
                if module.bias is not None:
                    nn.init.uniform_(module.bias, -bound, bound, generator=gen)


def build_model(
    kind: str, n_features: int, *, hidden_sizes: Sequence[int] = (64, 64), seed: int | None = None
) -> nn.Module:
    """Build the named model ('mlp' or 'logreg') with deterministic init when seed is given."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    if seed is None:
        return MLP(n_features, hidden_sizes) if kind == "mlp" else LogisticRegression(n_features)
    # Seeded: the default init's draws from the global RNG are undone, then a private generator re-inits.
    with torch.random.fork_rng(devices=[]):
        model = MLP(n_features, hidden_sizes) if kind == "mlp" else LogisticRegression(n_features)
    _seeded_init(model, seed)
    return model


def federated_model(config: FedFraudConfig, n_features: int, *, seed: int | None = None) -> nn.Module:
    """The federated model a run configures (`dp-hidden-sizes` under DP-SGD, else `hidden-sizes`)."""
    return build_model(config.train.model, n_features, hidden_sizes=config.federated_hidden_sizes, seed=seed)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Return the model's state (state_dict order) as float32 numpy copies."""
    return [t.detach().cpu().numpy().astype(np.float32, copy=True) for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Copy weights (state_dict order) into the model in place; ValueError names a mismatching entry."""
    state = model.state_dict(keep_vars=True)
    if len(weights) != len(state):
        raise ValueError(
            f"weights has {len(weights)} arrays but the model has {len(state)} ({', '.join(state)})"
        )
    arrays = []
    for (name, target), value in zip(state.items(), weights, strict=True):
        array = np.asarray(value)
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(
                f"weights for parameter '{name}' have shape {tuple(array.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        arrays.append(array)
    with torch.no_grad():
        for target, array in zip(state.values(), arrays, strict=True):
            target.copy_(torch.as_tensor(array, dtype=target.dtype, device=target.device))


def init_output_bias(model: nn.Module, *, fraud_rate: float, pos_weight: float) -> None:
    """Start the output at the loss-weighted fraud prior, so early steps learn ranking, not the base rate."""
    if not 0 < fraud_rate < 1:
        return
    prior = fraud_rate * pos_weight / (fraud_rate * pos_weight + 1 - fraud_rate)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if last.bias is not None:
        with torch.no_grad():
            last.bias.fill_(math.log(prior / (1 - prior)))
