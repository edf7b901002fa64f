"""Batches and the optimizer of the vectorized engine's stacked local training (`simulations.vectorized_dp`).

Poisson sampling as Opacus' `UniformWithReplacementSampler` (each row with probability q, every step),
shuffled batches as a `DataLoader(shuffle=True)` per epoch, and torch's Adam update with one step
count per bank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]
"""Row indices [B, K] of each bank's batch and their mask [B, K] (rows beyond a bank's count are padding)."""


def poisson_batch(valid: Tensor, rate: Tensor, generator: torch.Generator) -> Batch:
    """Each valid row with probability rate[bank] (Opacus' sampler), compacted to [B, max count] + mask."""
    banks, rows = valid.shape
    take = (torch.rand(banks, rows, generator=generator, device=valid.device) < rate.unsqueeze(1)) & valid
    counts = take.sum(1)
    k = int(counts.max()) if banks else 0
    slot = torch.where(take, take.cumsum(1) - 1, k)
    index = torch.zeros(banks, k + 1, dtype=torch.long, device=valid.device)
    index.scatter_(1, slot, torch.arange(rows, device=valid.device).expand(banks, rows))
    return index[:, :k], torch.arange(k, device=valid.device) < counts.unsqueeze(1)


class PoissonBatches:
    """With DP: every step an independent Poisson sample of each bank's rows."""

    def __init__(self, valid: Tensor, rate: Tensor, generator: torch.Generator) -> None:
        self.valid, self.rate, self.generator = valid, rate, generator

    def __call__(self, step: int) -> Batch:
        """Row indices and mask of every bank's sample at this step."""
        return poisson_batch(self.valid, self.rate, self.generator)


class ShuffledBatches:
    """Without DP: per bank and epoch a random permutation cut into `batch`-row batches (the last partial)."""

    def __init__(self, n: Tensor, batch: Tensor, epochs: int, rows: int, generator: torch.Generator) -> None:
        device = n.device
        keys = torch.rand(epochs, len(n), rows, generator=generator, device=device)
        keys.masked_fill_(torch.arange(rows, device=device) >= n.unsqueeze(1), 2.0)
        self.perms = keys.argsort(-1)
        self.n, self.batch, self.epochs = n, batch, epochs
        self.per_epoch = (n + batch - 1) // batch.clamp(min=1)
        self.k = int(batch.max()) if len(batch) else 0

    def __call__(self, step: int) -> Batch:
        """Row indices and mask of every bank's batch number `step` (counted over epochs)."""
        per_epoch = self.per_epoch.clamp(min=1)
        epoch, j = step // per_epoch, step % per_epoch
        start = j * self.batch
        size = torch.where(epoch < self.epochs, (self.n - start).clamp(min=0).minimum(self.batch), 0)
        ar = torch.arange(self.k, device=self.n.device)
        pos = (start.unsqueeze(1) + ar).clamp(max=self.perms.shape[-1] - 1)
        banks = torch.arange(len(self.n), device=self.n.device).unsqueeze(1)
        index = self.perms[epoch.clamp(max=self.epochs - 1).unsqueeze(1), banks, pos]
        return index, ar < size.unsqueeze(1)


@dataclass
class StackedAdam:
    """torch.optim.Adam's update for stacked parameters, one step count per bank; inactive banks stay put."""

    params: list[Tensor]
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        first = self.params[0]
        self.t = torch.zeros(first.shape[0], dtype=first.dtype, device=first.device)

    def step(self, grads: Sequence[Tensor], active: Tensor) -> None:
        """One Adam step for the banks where `active` is True."""
        b1, b2 = self.betas
        self.t += active.to(self.t.dtype)
        t = self.t.clamp(min=1)
        step_size = self.lr / (1 - b1**t)
        c2 = (1 - b2**t).sqrt()
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            view = (-1,) + (1,) * (p.dim() - 1)
            on = active.view(view)
            d = g + self.weight_decay * p if self.weight_decay else g
            m.copy_(torch.where(on, torch.lerp(m, d, 1 - b1), m))
            v.copy_(torch.where(on, v * b2 + (1 - b2) * d * d, v))
            update = step_size.view(view) * m / (v.sqrt() / c2.view(view) + self.eps)
            p.copy_(torch.where(on, p - update, p))
