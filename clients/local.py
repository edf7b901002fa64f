"""A bank's local round, free of Flower: train the global model under its privacy step, or evaluate it."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clients.bank import BankData
from clients.privacy import PrivacyBudgetExhausted, PrivacyStep, make_privacy_step, steps_per_round
from models.config import FedFraudConfig
from models.federation import CLIPPING_RANGE
from models.nets import federated_model, get_weights, set_weights
from models.spec import FeatureSpec
from models.training import (
    evaluate_loss,
    make_loader,
    make_optimizer,
    pos_weight_for,
    predict_scores,
    train_epochs,
)

logger = logging.getLogger(__name__)


class UpdateCheckError(ValueError):
    """A bank's update is unfit to be masked and sent (non-finite, mis-shaped, beyond SecAgg+'s range)."""


@dataclass(frozen=True)
class RoundOutcome:
    """What a bank's training round produced: new weights (None if it declined) and its privacy ledger."""

    weights: list[np.ndarray] | None
    examples: int
    epsilon: float
    state: dict[str, Any]
    loss: float = math.nan


def check_update(weights: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> None:
    """Refuse an update that is non-finite, mis-shaped or outside +-CLIPPING_RANGE (SecAgg+ would clip it)."""
    if len(weights) != len(reference):
        raise UpdateCheckError(f"update has {len(weights)} arrays, the model has {len(reference)}")
    for i, (w, ref) in enumerate(zip(weights, reference, strict=True)):
        if w.shape != ref.shape:
            raise UpdateCheckError(f"update array {i}: shape {w.shape}, the model's is {ref.shape}")
        if not np.isfinite(w).all():
            raise UpdateCheckError(f"update array {i}: has NaN or infinite values")
        if np.abs(w).max(initial=0.0) > CLIPPING_RANGE:
            raise UpdateCheckError(
                f"update array {i}: |value| {np.abs(w).max():.2f} exceeds the SecAgg+ "
                f"clipping range {CLIPPING_RANGE}"
            )


def _model(config: FedFraudConfig, n_features: int, weights: Sequence[np.ndarray]) -> torch.nn.Module:
    """The global model with these weights, on the GPU when this bank (or simulated bank) has one."""
    model = federated_model(config, n_features)
    set_weights(model, weights)
    return model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def round_privacy_step(
    config: FedFraudConfig, *, bank: int, n_examples: int, state: Mapping[str, Any] | None
) -> tuple[PrivacyStep, int, int]:
    """A bank's privacy step this round (its ledger restored), its batch size and its most steps per round."""
    train, fed, privacy = config.train, config.federation, config.privacy
    n = max(n_examples, 1)
    size = min(train.batch_size, n)
    step = make_privacy_step(
        enabled=privacy.dp,
        epsilon=privacy.epsilon_for(bank),
        delta=privacy.dp_delta,
        max_grad_norm=privacy.dp_max_grad_norm,
        n_examples=n,
        batch_size=size,
        local_epochs=train.local_epochs,
        planned_rounds=max(1, math.ceil(fed.rounds * fed.fraction_fit)),
        state=state,
    )
    return step, size, steps_per_round(n_examples=n, batch_size=size, local_epochs=train.local_epochs)


def train_round(
    data: BankData,
    weights: Sequence[np.ndarray],
    spec: FeatureSpec,
    config: FedFraudConfig,
    *,
    bank: int,
    state: Mapping[str, Any] | None,
    proximal_mu: float = 0.0,
    seed: int = 0,
) -> RoundOutcome:
    """Train the global model on this bank's train window under its privacy step (or decline, over budget)."""
    n, train, privacy = len(data.y_train), config.train, config.privacy
    step, size, steps = round_privacy_step(config, bank=bank, n_examples=n, state=state)
    if n == 0 or not step.admits(steps=steps):
        logger.warning(
            "bank %s declines this round: %s",
            bank,
            "no training rows"
            if n == 0
            else f"budget epsilon={privacy.epsilon_for(bank)} would be exceeded (spent {step.spent():.3f})",
        )
        return RoundOutcome(weights=None, examples=0, epsilon=step.spent(), state=dict(step.state()))
    model = _model(config, len(spec.names), weights)
    loader = make_loader(spec.transform(data.x_train), data.y_train, batch_size=size, seed=seed)
    optimizer = make_optimizer(model, lr=privacy.learning_rate(train.lr), weight_decay=train.weight_decay)
    private_model, private_opt, private_loader = step.wrap(model, optimizer, loader)
    global_tensors = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    try:
        stats = train_epochs(
            private_model,
            private_opt,
            private_loader,
            epochs=train.local_epochs,
            pos_weight=train.pos_weight or pos_weight_for(data.y_train),
            proximal_mu=proximal_mu,
            global_weights=global_tensors,
        )
    except PrivacyBudgetExhausted as exc:  # steps already taken are spent: keep the ledger, send nothing
        logger.warning("bank %s stops mid-round: %s", bank, exc)
        return RoundOutcome(weights=None, examples=0, epsilon=step.spent(), state=dict(step.state()))
    ledger = dict(step.state())
    new = get_weights(model)
    check_update(new, weights)
    return RoundOutcome(weights=new, examples=n, epsilon=step.spent(), state=ledger, loss=stats.loss)


def evaluate_round(
    data: BankData, weights: Sequence[np.ndarray], spec: FeatureSpec, config: FedFraudConfig
) -> tuple[float, dict[str, float]]:
    """Loss and fraud metrics of the global model on this bank's test window."""
    if len(data.y_test) == 0:
        return math.nan, {}
    model = _model(config, len(spec.names), weights)
    x = spec.transform(data.x_test)
    scores = predict_scores(model, x)
    loss = evaluate_loss(model, x, data.y_test, pos_weight=1.0)
    metrics = {k: v for k, v in data.test_metrics(scores).items() if math.isfinite(v)}
    return loss, metrics
