"""Fused ghost clipping for `clients.privacy_opacus`: DP-SGD's per-sample clipping in one backward pass.

The "fused" grad-sample mode is one-pass ghost clipping for Linear/LayerNorm models: per-sample gradient norms
come from each layer's input x_i and output gradient g_i without materialising per-sample gradients
(||g_i x_i^T|| = ||g_i|| ||x_i||), and the clipped sum is one matmul per layer, (c * g)^T x, at the end of
the ordinary backward pass. (Opacus' "ghost" needs a wrapped criterion and a second backward pass.) Noise
(Opacus' `_generate_noise`, std sigma*C), scaling and the accountant hook are those of Opacus'
`DPOptimizerFastGradientClipping`, which `FusedDPOptimizer` subclasses.

The fused mode assumes, and checks where it can: a loss that is a mean over batch dimension 0; trainable
parameters only in `nn.Linear`/`nn.LayerNorm` fed 2-D (rows, features) input, each run once per forward
pass (no weight tying); no buffers.
"""

from __future__ import annotations

import logging
import weakref
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from clients.privacy_errors import DPStepError, UnsupportedModelError

logger = logging.getLogger(__name__)

_CLIP_EPS = 1e-6  # Opacus' guard in C / (norm + 1e-6)
_CLIPPERS: weakref.WeakKeyDictionary[nn.Module, FusedClipper] = weakref.WeakKeyDictionary()


def _trainable_layers(module: nn.Module) -> list[nn.Module]:
    """Return the layers that own trainable parameters; refuse anything but Linear and LayerNorm."""
    layers: list[nn.Module] = []
    for name, sub in module.named_modules():
        if any(True for _ in sub.buffers(recurse=False)):
            raise UnsupportedModelError(
                f"layer '{name}' ({type(sub).__name__}) has buffers: "
                "per-sample gradients are undefined (use LayerNorm, not BatchNorm)"
            )
        if not any(p.requires_grad for p in sub.parameters(recurse=False)):
            continue
        if not isinstance(sub, nn.Linear | nn.LayerNorm):
            raise UnsupportedModelError(
                f"layer '{name}' ({type(sub).__name__}) is not supported by "
                "grad_sample_mode 'fused' (Linear, LayerNorm only); use 'hooks'"
            )
        layers.append(sub)
    return layers


class FusedClipper:
    """Hooks that replace each p.grad with the sum of clipped per-sample gradients after backward.

    The hooks live as long as the DP optimizer they feed (`bind`): once it is garbage, the next training
    forward pass removes them. Wrapping a model again replaces the previous clipper.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        self.max_grad_norm = float(max_grad_norm)
        self._layers = _trainable_layers(module)
        self._params = [
            p for layer in self._layers for p in layer.parameters(recurse=False) if p.requires_grad
        ]
        self._sizes = [p.numel() for p in self._params]
        self._flat: Tensor | None = None  # all clipped sums in one buffer; each p.grad is a view of it
        self._views: list[Tensor] = []
        self._records: list[tuple[nn.Module, Tensor, Tensor]] = []
        self._queued = False
        self._fresh = False
        self._owner: weakref.ref[Any] | None = None
        previous = _CLIPPERS.get(module)
        if previous is not None:
            previous.remove()
        _CLIPPERS[module] = self
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(self._on_forward) for layer in self._layers
        ]
        logger.debug("fused per-sample clipping (C=%g) on %d layers", self.max_grad_norm, len(self._layers))

    def bind(self, optimizer: Any) -> None:
        """Tie the hooks' lifetime to the DP optimizer that consumes the clipped gradients."""
        self._owner = weakref.ref(optimizer)

    def _on_forward(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """Capture the layer input and hook its output gradient (training with grad only)."""
        if not (layer.training and torch.is_grad_enabled()):
            return
        if self._owner is not None and self._owner() is None:
            self.remove()  # the round's DP optimizer is gone: the model is a plain model again
            return
        activation = inputs[0]
        if activation.dim() != 2:
            raise UnsupportedModelError(
                f"{type(layer).__name__} got input of shape "
                f"{tuple(activation.shape)}; grad_sample_mode 'fused' needs "
                "2-D (rows, features)"
            )
        output.register_hook(partial(self._on_backprop, layer, activation.detach()))

    def _on_backprop(self, layer: nn.Module, activation: Tensor, grad: Tensor) -> None:
        """Store (layer, input, output gradient); finalise once the whole backward pass is done."""
        self._records.append((layer, activation, grad.detach()))
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)

    def _finalize(self) -> None:
        """Compute per-sample norms, clip coefficients and write the clipped sums into p.grad."""
        records, self._records, self._queued = self._records, [], False
        if self._fresh:
            raise DPStepError(
                "two backward passes without optimizer.step(): gradient accumulation "
                "is not supported under Poisson sampling"
            )
        if len({id(layer) for layer, _, _ in records}) != len(records):
            raise UnsupportedModelError(
                "a layer ran twice in one forward pass (weight tying): use grad_sample_mode 'hooks'"
            )
        inputs, sq = _squared_norms(records)
        n = sq.shape[0]
        # Per-sample gradients of the mean loss are n * g_i x_i^T: clip their norms at C, then sum.
        coef = (self.max_grad_norm / sq.sqrt().mul_(n).add_(_CLIP_EPS)).clamp_(max=1.0).mul_(n).unsqueeze(1)
        first = self._params[0]
        flat = torch.zeros(sum(self._sizes), dtype=first.dtype, device=first.device)  # unused layers: 0
        views = {id(p): v.view_as(p) for p, v in zip(self._params, flat.split(self._sizes), strict=True)}
        for (layer, _, grad), x in zip(records, inputs, strict=True):
            cg = grad * coef
            weight, bias = layer.weight, layer.bias
            if weight is not None and weight.requires_grad:
                if isinstance(layer, nn.Linear):
                    torch.mm(cg.t(), x, out=views[id(weight)])
                else:
                    torch.sum(cg * x, 0, out=views[id(weight)])
            if bias is not None and bias.requires_grad:
                torch.sum(cg, 0, out=views[id(bias)])
        self._views = [views[id(p)] for p in self._params]
        for p, view in zip(self._params, self._views, strict=True):
            p.grad = view
        self._flat = flat
        self._fresh = True

    def consume(self) -> Tensor:
        """Return the buffer of this backward pass's clipped sums (the p.grad views), marking it used."""
        flat = self._flat
        if not self._fresh or flat is None:
            raise DPStepError(
                "optimizer.step() without a backward pass through the private model "
                "(model in eval mode or under no_grad?): gradients are not clipped"
            )
        self._fresh, self._flat = False, None
        if any(p.grad is not view for p, view in zip(self._params, self._views, strict=True)):
            raise DPStepError(
                "a gradient was replaced between backward and optimizer.step(): it would not be noised"
            )
        return flat

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records, self._fresh, self._flat = [], False, None


def _squared_norms(records: list[tuple[nn.Module, Tensor, Tensor]]) -> tuple[list[Tensor], Tensor]:
    """Return each layer's weight-gradient input and the per-sample squared gradient norms / n^2."""
    inputs: list[Tensor] = []
    total: Tensor | None = None
    for layer, act, grad in records:
        if total is not None and grad.shape[0] != total.shape[0]:
            raise UnsupportedModelError("layers saw different batch sizes: the batch must be dimension 0")
        g_sq = torch.linalg.vecdot(grad, grad)
        sq: Tensor | None = None
        if isinstance(layer, nn.Linear):
            x = act.to(grad.dtype)
            if layer.weight.requires_grad:
                sq = g_sq * torch.linalg.vecdot(x, x)  # ||g x^T||^2 = ||g||^2 ||x||^2
        elif isinstance(layer, nn.LayerNorm):
            x = F.layer_norm(act, layer.normalized_shape, eps=layer.eps).to(grad.dtype)
            if layer.weight is not None and layer.weight.requires_grad:
                gx = grad * x
                sq = torch.linalg.vecdot(gx, gx)
        else:
            raise UnsupportedModelError(f"{type(layer).__name__} is not supported by 'fused'")
        if layer.bias is not None and layer.bias.requires_grad:
            sq = g_sq if sq is None else sq + g_sq
        if sq is None:
            sq = torch.zeros_like(g_sq)
        total = sq if total is None else total + sq
        inputs.append(x)
    if total is None:
        raise DPStepError("backward pass reached no trainable layer")
    return inputs, total


class FusedDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' fast-gradient-clipping optimizer fed by a `FusedClipper`, with a lean step.

    The clipper hands over fresh clipped sums each backward pass (checked by `consume`), so the step only
    adds N(0, (sigma*C)^2) noise from one draw, divides by the expected batch size and runs the step hook
    (budget guard, accountant) before the wrapped optimizer's step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        clipper: FusedClipper,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: Any = None,
        secure_mode: bool = False,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=secure_mode,
        )
        self.clipper = clipper
        clipper.bind(self)

    def pre_step(self, closure: Any = None) -> bool:
        """Noise the clipped sums, scale them by 1 / expected batch size and run the step hook."""
        flat = self.clipper.consume()
        if self._step_skip_queue:
            raise DPStepError("virtual steps (BatchMemoryManager) are not supported by 'fused'")
        noise = _generate_noise(
            std=self.noise_multiplier * self.max_grad_norm,
            reference=flat,
            generator=self.generator,
            secure_mode=self.secure_mode,
        )
        flat.add_(noise).div_(float(self.expected_batch_size * self.accumulated_iterations))
        if self.step_hook:
            self.step_hook(self)
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear p.grad (no summed or per-sample gradients are kept)."""
        self.original_optimizer.zero_grad(set_to_none)
