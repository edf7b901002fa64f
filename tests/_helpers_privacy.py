"""Shared set-up of the privacy-step tests (test_privacy.py, test_fused_clipping.py)."""

from __future__ import annotations

import numpy as np

from clients.privacy import DPSGD, PrivacyStep, make_privacy_step
from models.nets import build_model
from models.training import make_loader, make_optimizer

N, BATCH, FEATURES = 320, 16, 8  # sample rate 1/20, 20 steps per epoch
EPS, DELTA = 3.0, 1e-5


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=N) > 1.0).astype(np.float32)
    return x, y


def _step(state=None, *, rounds: int = 3, epsilon: float = EPS, delta: float = DELTA) -> DPSGD:
    step = make_privacy_step(
        enabled=True,
        epsilon=epsilon,
        delta=delta,
        max_grad_norm=1.0,
        n_examples=N,
        batch_size=BATCH,
        local_epochs=1,
        planned_rounds=rounds,
        state=state,
    )
    assert isinstance(step, DPSGD)
    return step


def _wrap(step: PrivacyStep, data, *, kind: str = "mlp", seed: int = 0, batch: int = BATCH, **opt):
    """Return (model, private model, optimizer, loader) of a fresh model wrapped by the step."""
    model = build_model(kind, FEATURES, hidden_sizes=(16, 16), seed=seed)
    wrapped = step.wrap(
        model, make_optimizer(model, **{"lr": 0.01, **opt}), make_loader(*data, batch_size=batch, seed=seed)
    )
    return (model, *wrapped)


def _total_steps(step: DPSGD) -> int:
    return sum(k for _, _, k in step.history())
