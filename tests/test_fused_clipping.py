"""Fast (fused) per-sample clipping: agreement with Opacus hooks, noise, and refused misuse."""

from __future__ import annotations

import copy
import gc
import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from clients.privacy_opacus import DPStepError, UnsupportedModelError, make_private
from models.nets import MLP, build_model
from models.training import make_loader, make_optimizer, train_epochs
from tests._helpers_privacy import BATCH, FEATURES, _step, _total_steps, _wrap, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


def _privatised_grad(
    mode: str, model: nn.Module, xb, yb, *, sigma: float = 0.0, max_grad_norm: float = 1.0
) -> list[torch.Tensor]:
    """One step's noised, clipped gradient (before the optimizer applies it)."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, _ = make_private(
            PrivacyEngine(accountant="rdp"),
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=make_loader(xb.numpy(), yb.numpy(), batch_size=BATCH, seed=0),
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            grad_sample_mode=mode,
        )
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.binary_cross_entropy_with_logits(private(xb), yb, pos_weight=torch.tensor(3.0))
    loss.backward()
    optimizer.pre_step()
    return [p.grad.detach().clone() for p in optimizer.params]


MODELS = {
    "mlp": lambda: build_model("mlp", FEATURES, seed=0),
    "mlp-layernorm": lambda: MLP(FEATURES, (16, 16), layer_norm=True),
    "logreg": lambda: build_model("logreg", FEATURES, seed=0),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 1e4])  # most, some, no samples clipped
def test_fused_mode_matches_opacus_hooks(data, kind, max_grad_norm):
    torch.manual_seed(0)
    model = MODELS[kind]()
    x, y = data
    xb, yb = torch.from_numpy(x[: BATCH * 4] * 3), torch.from_numpy(y[: BATCH * 4])
    hooks = _privatised_grad("hooks", model, xb, yb, max_grad_norm=max_grad_norm)
    fused = _privatised_grad("fused", model, xb, yb, max_grad_norm=max_grad_norm)
    for h, f in zip(hooks, fused, strict=True):
        torch.testing.assert_close(f, h, rtol=1e-5, atol=1e-6)


def test_noise_changes_the_gradient(data):
    x, y = data
    xb, yb = torch.from_numpy(x[:BATCH]), torch.from_numpy(y[:BATCH])
    model = build_model("mlp", FEATURES, seed=0)
    clean = _privatised_grad("fused", model, xb, yb, sigma=0.0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(clean, _privatised_grad("fused", model, xb, yb, sigma=0.0), strict=True)
    )
    noisy = _privatised_grad("fused", model, xb, yb, sigma=1.0)
    diff = torch.cat([(a - b).flatten() for a, b in zip(noisy, clean, strict=True)])
    # noise per coordinate is N(0, (sigma * C / expected batch size)^2) = N(0, (1/16)^2)
    assert 0.5 / 16 < float(diff.std()) < 2.0 / 16


# --- protocol violations -----------------------------------------------------------------------------------


def test_fused_mode_refuses_unsupported_models(data):
    x, y = data
    for model in (
        nn.Sequential(nn.Linear(FEATURES, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
        nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1)),
    ):
        with pytest.raises(UnsupportedModelError):
            _step().wrap(model, make_optimizer(model, lr=0.1), make_loader(x, y, batch_size=BATCH, seed=0))


def test_unclipped_or_replaced_gradients_are_refused(data):
    model, private, optimizer, _ = _wrap(_step(), data)
    xb = torch.from_numpy(data[0][:BATCH])
    with pytest.raises(DPStepError, match="without a backward"):
        optimizer.step()
    private.eval()  # no hooks in eval mode: raw gradients must not be noised and applied
    optimizer.zero_grad()
    private(xb).sum().backward()
    with pytest.raises(DPStepError, match="without a backward"):
        optimizer.step()
    private.train()
    optimizer.zero_grad(set_to_none=True)
    private(xb).mean().backward()
    weight = next(model.parameters())
    weight.grad = torch.zeros_like(weight)  # a new tensor would escape the noise
    with pytest.raises(DPStepError, match="replaced"):
        optimizer.step()
    with pytest.raises(ValueError, match="sample_rate"):
        _wrap(_step(), data, batch=BATCH * 2)


def test_fused_hooks_are_replaced_on_rewrap_and_end_with_the_round(data):
    model, *first = _wrap(_step(), data)
    private, optimizer, loader = _step().wrap(
        model, make_optimizer(model, lr=0.01), make_loader(*data, batch_size=BATCH, seed=1)
    )
    assert train_epochs(private, optimizer, loader, epochs=1, pos_weight=1.0).steps > 0  # no stale clipper
    del first, private, optimizer, loader
    gc.collect()
    reference = build_model("mlp", FEATURES, hidden_sizes=(16, 16))  # never wrapped (a deepcopy copies hooks)
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        m.zero_grad()
        m(torch.from_numpy(data[0][:BATCH])).mean().backward()
    # plain gradients again, not clipped sums
    torch.testing.assert_close(
        [p.grad for p in model.parameters()], [p.grad for p in reference.parameters()], rtol=0, atol=0
    )


def test_empty_poisson_batch_is_a_noise_only_accounted_step(data):
    step = _step()
    model, private, optimizer, _ = _wrap(step, data)
    optimizer.zero_grad(set_to_none=True)
    empty = torch.zeros(0, FEATURES)
    nn.functional.binary_cross_entropy_with_logits(private(empty), torch.zeros(0)).backward()
    optimizer.step()
    assert _total_steps(step) == 1
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
