"""Baselines on one split: central with pooled features, central with siloed features, each bank alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.config import FedFraudConfig, TrainConfig
from models.spec import FeatureSpec, FeatureStats
from models.training import predict_scores, train_model
from simulations.dataset import Prepared

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodResult:
    """A method's score for every test row, plus per-round details for metrics.json."""

    scores: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)
    weights: list[np.ndarray] | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    """Large or private outputs kept out of metrics.json (e.g. the published entity table)."""


Method = Callable[[Prepared, FedFraudConfig], "np.ndarray | MethodResult"]
"""A method trains on the train window and scores every test row (in `Prepared.rows` order)."""


def standardize(x_train: np.ndarray, x_other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardize both matrices with the statistics of the training rows (as the feature spec does)."""
    names = [f"f{i}" for i in range(x_train.shape[1])]
    spec = FeatureSpec.from_stats(names, FeatureStats.of(x_train), version="baseline", delay_days=0)
    return spec.transform(x_train), spec.transform(x_other)


def _fit_and_score(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, config: TrainConfig, *, seed: int
) -> np.ndarray:
    """Standardize with the training rows' statistics, train a model centrally, score the test rows."""
    x_train, x_test = standardize(x_train, x_test)
    model = train_model(
        x_train,
        y_train,
        kind=config.model,
        hidden_sizes=config.hidden_sizes,
        epochs=config.central_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        pos_weight=config.pos_weight,
        seed=seed,
    )
    return predict_scores(model, x_test)


def _central(x: np.ndarray, data: Prepared, config: TrainConfig) -> np.ndarray:
    train, test = data.split.train, data.split.test
    y_train = data.rows["is_fraud"].to_numpy()[train].astype(np.float32)
    return _fit_and_score(x[train], y_train, x[test], config, seed=config.seed)


def central_pooled(data: Prepared, config: FedFraudConfig) -> np.ndarray:
    """One model on all banks' rows, features computed over the pooled data lake."""
    return _central(data.pooled, data, config.train)


def central_siloed(data: Prepared, config: FedFraudConfig) -> np.ndarray:
    """One model on all banks' rows, features computed by each bank from its own rows."""
    return _central(data.siloed, data, config.train)


def local(data: Prepared, config: FedFraudConfig) -> np.ndarray:
    """Each bank alone: its own features, scaler and model; its test rows scored by its own model."""
    scores = np.full(int(data.split.test.sum()), np.nan)
    test_banks = data.rows["bank_id"].to_numpy()[data.split.test]
    y = data.rows["is_fraud"].to_numpy().astype(np.float32)
    for bank in data.banks:
        mask = data.bank_mask(bank)
        train, test = mask & data.split.train, mask & data.split.test
        if not test.any():
            continue
        if not train.any():
            logger.warning("bank %s has no training rows: its test rows score 0", bank)
            scores[test_banks == bank] = 0.0
            continue
        scores[test_banks == bank] = _fit_and_score(
            data.siloed[train], y[train], data.siloed[test], config.train, seed=config.train.seed + bank
        )
    return scores


BASELINES: dict[str, Method] = {
    "central_pooled": central_pooled,
    "central_siloed": central_siloed,
    "local": local,
}
