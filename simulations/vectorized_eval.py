"""Per-bank evaluation of the vectorized engine: each bank's `evaluate_round` report, for all banks at once.

One forward pass of the global model over every bank's standardized test rows; then, per bank, the mean BCE
(pos_weight 1, float64, as `models.training.evaluate_loss`), its fraud metrics (`BankData.test_metrics`),
its epsilon spent from its ledger: the record the Flower path keeps (`server.server_app.RoundRecorder`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from models.nets import federated_model, set_weights

logger = logging.getLogger(__name__)


def _logits(fed: Any, transform: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """The global model's logits of each bank's test rows (float64)."""
    model = federated_model(fed.config, len(fed.banks[0].feature_names))
    set_weights(model, fed.weights_list())
    model = model.to(fed.device).eval()
    sizes = [len(b.y_test) for b in fed.banks]
    rows = [transform(b.x_test) for b in fed.banks if len(b.y_test)]
    if not rows:
        return [np.zeros(0) for _ in sizes]
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate(rows), dtype=np.float32))
    with torch.no_grad():
        parts = [model(x[i : i + 65536].to(fed.device)).reshape(-1).cpu() for i in range(0, len(x), 65536)]
    logits = torch.cat(parts).double().numpy()
    return np.split(logits, np.cumsum(sizes)[:-1])


def evaluate_banks(fed: Any, transform: Callable[[np.ndarray], np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each bank's test loss, fraud metrics and epsilon under the current global model."""
    out: dict[str, dict[str, Any]] = {}
    for i, (bank, logits) in enumerate(zip(fed.banks, _logits(fed, transform), strict=True)):
        metrics: dict[str, Any] = {}
        loss = math.nan
        if len(bank.y_test):
            t = torch.from_numpy(logits)
            loss = float(F.binary_cross_entropy_with_logits(t, torch.from_numpy(bank.y_test).double()))
            scores = torch.sigmoid(t).numpy()
            metrics = {k: v for k, v in bank.test_metrics(scores).items() if math.isfinite(v)}
        ledger = fed.ledgers[i] or {}
        bank_id = int(fed.bank_ids[i])
        metrics.update(bank=bank_id, epsilon=float(ledger.get("dp-epsilon-spent", 0.0)))
        metrics.update(loss=loss if math.isfinite(loss) else 0.0, examples=len(bank.y_test))
        out[str(bank_id)] = metrics
    return out
