"""Stacked local training for the vectorized engine: every bank's round as one batched tensor program.

Parameters are stacked [banks, ...] in the model's state_dict order, and each step does for all banks at once
what `clients.local.train_round` does for one:
- loss: weighted BCE with logits, the mean over the batch (`models.training.train_epochs`);
- optimizer: Adam as `make_optimizer` builds it (fresh every round), torch's update rule, per bank;
- DP-SGD as Opacus does it: Poisson sampling of each row at rate q = 1 / ceil(n / batch), per-sample gradients
  clipped by min(1, C / (norm + 1e-6)), summed, plus N(0, (sigma C)^2) per coordinate, divided by the expected
  batch size int(n q); an empty batch is skipped (no step, nothing accounted); without DP, shuffled batches of
  `batch` rows per epoch, the last one partial (a DataLoader with shuffle=True);
- FedProx's proximal step after each optimizer step (`models.training._proximal_step`).

Per-sample clipping: "ghost" computes the per-sample norms from each layer's input and output gradient
(||g x^T|| = ||g|| ||x||, the math of `clients.fused_clipping`) for chains of Linear / ReLU / LayerNorm, the
models of `models.nets`; "vmap" materialises per-sample gradients with `torch.func` (vmap over banks of vmap
over rows of grad of the model's own forward through `functional_call`) and works for any model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from simulations.vectorized_batches import Batch, PoissonBatches, ShuffledBatches, StackedAdam

logger = logging.getLogger(__name__)

CLIP_EPS = 1e-6  # Opacus' guard in C / (norm + 1e-6)
CLIPPING_MODES = ("auto", "ghost", "vmap")


@dataclass(frozen=True)
class Rows:
    """Rows per bank: features [B, K, F], labels [B, K], a 0/1 mask [B, K] of real rows, pos_weight [B]."""

    x: Tensor
    y: Tensor
    mask: Tensor
    pos_weight: Tensor

    def take(self, batch: Batch) -> Rows:
        """The rows at these indices (per bank), masked by the batch's mask."""
        index, mask = batch
        x = torch.gather(self.x, 1, index.unsqueeze(-1).expand(-1, -1, self.x.shape[-1]))
        return Rows(x, torch.gather(self.y, 1, index), mask.to(self.x.dtype), self.pos_weight)


@dataclass(frozen=True)
class Layer:
    """One step of a sequential model: 'linear', 'relu' or 'layernorm' with its parameters' indices."""

    kind: str
    weight: int = -1
    bias: int = -1
    shape: tuple[int, ...] = ()
    eps: float = 0.0


def layer_chain(model: nn.Module) -> list[Layer] | None:
    """The model's leaf layers in order if it is a Linear/ReLU/LayerNorm chain (checked by `StackedModel`)."""
    index = {name: i for i, name in enumerate(model.state_dict())}
    chain: list[Layer] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(True for _ in module.children()):
            continue
        if isinstance(module, nn.ReLU):
            chain.append(Layer("relu"))
        elif isinstance(module, nn.Linear | nn.LayerNorm):
            shape = tuple(module.normalized_shape) if isinstance(module, nn.LayerNorm) else ()
            chain.append(
                Layer(
                    "linear" if isinstance(module, nn.Linear) else "layernorm",
                    index.get(f"{prefix}weight", -1),
                    index.get(f"{prefix}bias", -1),
                    shape,
                    float(getattr(module, "eps", 0.0)),
                )
            )
        else:
            return None
    used = {i for layer in chain for i in (layer.weight, layer.bias) if i >= 0}
    return chain if used == set(range(len(index))) == set(range(len(list(model.parameters())))) else None


def _chain_forward(chain: Sequence[Layer], params: Sequence[Tensor], x: Tensor) -> tuple[Tensor, list]:
    """Logits [B, K] of the stacked chain, and (layer, layer input, layer output) of each parametric layer."""
    h, records = x, []
    for layer in chain:
        if layer.kind == "relu":
            h = torch.relu(h)
            continue
        if layer.kind == "linear":
            a = h
            z = torch.matmul(a, params[layer.weight].transpose(1, 2))
        else:
            a = F.layer_norm(h, layer.shape, eps=layer.eps)
            z = a * params[layer.weight].unsqueeze(1) if layer.weight >= 0 else a
        if layer.bias >= 0:
            z = z + params[layer.bias].unsqueeze(1)
        records.append((layer, a, z))
        h = z
    return h.squeeze(-1), records


def per_sample_loss(logits: Tensor, y: Tensor, pos_weight: Tensor) -> Tensor:
    """Weighted BCE with logits per row, [B, K] (pos_weight per bank, [B])."""
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight.unsqueeze(1), reduction="none")


class StackedModel:
    """The shared model applied to stacked per-bank parameters: forward, mean-loss and clipped gradients."""

    def __init__(self, model: nn.Module, *, clipping: str = "auto") -> None:
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {', '.join(CLIPPING_MODES)}, got {clipping!r}")
        self.model = model
        self.names = list(model.state_dict())
        chain = layer_chain(model) if clipping != "vmap" else None
        if chain is not None and not self._chain_matches(chain):
            chain = None
        if chain is None and clipping == "ghost":
            raise ValueError("clipping 'ghost' needs a Linear/ReLU/LayerNorm chain (use 'vmap')")
        self.chain = chain
        self.clipping = "ghost" if chain is not None else "vmap"

    def _chain_matches(self, chain: list[Layer]) -> bool:
        """Whether the chain reproduces the model's own forward (on random rows)."""
        ref = next(self.model.parameters())
        x = torch.randn(1, 5, self.model.state_dict()[self.names[0]].shape[-1], dtype=ref.dtype)
        params = [t.detach().cpu().unsqueeze(0) for t in self.model.state_dict().values()]
        named = dict(zip(self.names, [p[0] for p in params], strict=True))
        with torch.no_grad():
            mine, _ = _chain_forward(chain, params, x)
            theirs = functional_call(self.model.cpu(), named, (x[0],))
        return mine.shape == (1, 5) and torch.allclose(mine[0], theirs.reshape(-1), atol=1e-5)

    def forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """Logits [B, K] of x [B, K, F] under each bank's parameters."""
        if self.chain is not None:
            return _chain_forward(self.chain, params, x)[0]

        def one(p: tuple[Tensor, ...], xb: Tensor) -> Tensor:
            named = dict(zip(self.names, p, strict=True))
            return functional_call(self.model, named, (xb,)).reshape(xb.shape[0])

        return vmap(one)(tuple(params), x)

    def mean_loss_grads(self, params: Sequence[Tensor], rows: Rows) -> list[Tensor]:
        """Each bank's gradient of its mean batch loss (no DP)."""
        leaves = [p.detach().requires_grad_() for p in params]
        with torch.enable_grad():
            losses = per_sample_loss(self.forward(leaves, rows.x), rows.y, rows.pos_weight) * rows.mask
            total = (losses.sum(1) / rows.mask.sum(1).clamp(min=1)).sum()
            return list(torch.autograd.grad(total, leaves))

    def clipped_sums(self, params: Sequence[Tensor], rows: Rows, *, clip: float) -> list[Tensor]:
        """Each bank's sum of per-sample gradients clipped to L2 norm `clip` (masked rows excluded)."""
        if self.chain is not None:
            return _ghost_clipped_sums(self.chain, params, rows, clip=clip)
        return self._vmap_clipped_sums(params, rows, clip=clip)

    def _vmap_clipped_sums(self, params: Sequence[Tensor], rows: Rows, *, clip: float) -> list[Tensor]:
        def loss_one(p: tuple[Tensor, ...], xi: Tensor, yi: Tensor, pw: Tensor) -> Tensor:
            named = dict(zip(self.names, p, strict=True))
            logit = functional_call(self.model, named, (xi.unsqueeze(0),)).reshape(())
            return F.binary_cross_entropy_with_logits(logit, yi, pos_weight=pw)

        per_row = vmap(grad(loss_one), in_dims=(None, 0, 0, None))
        grads = vmap(per_row)(tuple(p.detach() for p in params), rows.x, rows.y, rows.pos_weight)
        sq = torch.stack([g.flatten(2).pow(2).sum(-1) for g in grads]).sum(0)
        coef = (clip / (sq.sqrt() + CLIP_EPS)).clamp(max=1.0) * rows.mask
        return [torch.einsum("bk,bk...->b...", coef, g) for g in grads]


def _ghost_clipped_sums(
    chain: Sequence[Layer], params: Sequence[Tensor], rows: Rows, *, clip: float
) -> list[Tensor]:
    """Clipped per-sample gradient sums from layer inputs and output gradients (no per-sample gradients)."""
    leaves = [p.detach().requires_grad_() for p in params]
    with torch.enable_grad():
        logits, records = _chain_forward(chain, leaves, rows.x)
        losses = per_sample_loss(logits, rows.y, rows.pos_weight) * rows.mask
        outs = torch.autograd.grad(losses.sum(), [z for _, _, z in records])
    records = [(layer, a.detach(), z) for layer, a, z in records]
    sq = torch.zeros_like(rows.mask)
    for (layer, a, _), g in zip(records, outs, strict=True):
        g_sq = (g * g).sum(-1)
        if layer.weight >= 0:
            sq += g_sq * (a * a).sum(-1) if layer.kind == "linear" else (g * a).pow(2).sum(-1)
        if layer.bias >= 0:
            sq += g_sq
    coef = ((clip / (sq.sqrt() + CLIP_EPS)).clamp(max=1.0) * rows.mask).unsqueeze(-1)
    sums = [torch.zeros_like(p) for p in params]
    for (layer, a, _), g in zip(records, outs, strict=True):
        cg = g * coef
        if layer.weight >= 0:
            sums[layer.weight] = cg.transpose(1, 2) @ a if layer.kind == "linear" else (cg * a).sum(1)
        if layer.bias >= 0:
            sums[layer.bias] = cg.sum(1)
    return sums


@dataclass(frozen=True)
class LocalPlan:
    """Per-bank settings of a chunk's round ([B] tensors); DP fields are None without DP."""

    n: Tensor
    batch: Tensor
    steps: Tensor
    active: Tensor
    pos_weight: Tensor
    rate: Tensor | None = None
    expected: Tensor | None = None
    sigma: Tensor | None = None


@dataclass(frozen=True)
class LocalSettings:
    """What every bank shares: learning rate, weight decay, epochs, clipping norm, FedProx mu."""

    lr: float
    epochs: int
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.0


def train_chunk(
    model: StackedModel,
    params: list[Tensor],
    data: Rows,
    plan: LocalPlan,
    settings: LocalSettings,
    *,
    generator: torch.Generator,
    batches: Callable[[int], Batch] | None = None,
) -> Tensor:
    """Train the stacked params in place for one round; return the optimizer steps each bank took."""
    banks, rows = data.y.shape
    if batches is None:
        batches = (
            ShuffledBatches(plan.n, plan.batch, settings.epochs, rows, generator)
            if plan.rate is None
            else PoissonBatches(data.mask.bool(), plan.rate, generator)
        )
    adam = StackedAdam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    start = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    taken = torch.zeros(banks, dtype=torch.long, device=data.y.device)
    for step in range(int(plan.steps[plan.active].max()) if bool(plan.active.any()) else 0):
        batch = batches(step)
        on = plan.active & (step < plan.steps) & batch[1].any(1)
        rows_b = data.take(batch)
        if plan.sigma is None or plan.expected is None:
            grads = model.mean_loss_grads(params, rows_b)
        else:
            clip = settings.max_grad_norm
            sums = model.clipped_sums(params, rows_b, clip=clip)
            grads = [_noised(s, plan.sigma * clip, plan.expected, generator) for s in sums]
        adam.step(grads, on)
        if start:
            c = settings.lr * settings.proximal_mu
            for p, g in zip(params, start, strict=True):
                p.copy_(torch.where(on.view((-1,) + (1,) * (p.dim() - 1)), (p + c * g) / (1 + c), p))
        taken += on.long()
    return taken


def _noised(clipped: Tensor, std: Tensor, expected: Tensor, generator: torch.Generator) -> Tensor:
    """(clipped sum + N(0, std^2) per coordinate) / expected batch size, per bank."""
    view = (-1,) + (1,) * (clipped.dim() - 1)
    noise = torch.randn(clipped.shape, generator=generator, device=clipped.device, dtype=clipped.dtype)
    return (clipped + noise * std.view(view)) / expected.view(view)


def expected_batch(n: int, rate: float) -> int:
    """Opacus' expected batch size for Poisson sampling: int(n * rate)."""
    return int(n * rate)
