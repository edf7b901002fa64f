"""The vectorized simulation engine: every sampled bank's local round as one batched computation.

Same algorithm as the Flower engine (`simulations.federated`), without Ray and without one process call per
bank: the same bank data (each bank's own features and windows), entity release, secure statistics round,
initial model, per-bank privacy step (`clients.local.round_privacy_step`: the same sigma, admission and
accountant history, so the epsilon ledgers are those of the Flower path), local DP-SGD or plain training
(`simulations.vectorized_dp`), SecAgg+ quantization, FedAvg / FedProx / FedAdam, client-level DP and the guard
(`simulations.vectorized_server`), per-bank evaluation each round. Banks are stacked in chunks, on the GPU
when there is one (`simulations.vectorized_federation`). Not supported: checkpoints and resume
(`--checkpoint-dir`), Ray resources.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from clients.bank import BankData, windowed_bank
from models.averaging import TailAverage, first_averaged_round
from models.config import FedFraudConfig
from models.feature_names import CONSORTIUM_FEATURES, CONSORTIUM_VERSION
from models.split import time_split
from server.secagg import choose_secagg
from server.server_app import ServerSettings, initial_weights
from simulations.baselines import MethodResult
from simulations.dataset import Prepared
from simulations.federated import data_days, engine_config, federated_result
from simulations.vectorized_eval import evaluate_banks
from simulations.vectorized_federation import Federation, VectorizedOptions
from simulations.vectorized_server import SecureSum, ServerAdam, check_flat, entity_release, stats_spec

logger = logging.getLogger(__name__)
DEFAULT_OPTIONS = VectorizedOptions()


def bank_datasets(data: Prepared, config: FedFraudConfig) -> list[BankData]:
    """Each bank's data as its ClientApp builds it from its own file: own features, own time windows."""
    table = data.feature_version.startswith("table")
    labels = data.rows["is_fraud"].to_numpy().astype(np.float32)
    out = []
    for bank in data.banks:
        mask = data.bank_mask(bank)
        frame = data.frame.loc[mask].reset_index(drop=True)
        x, y = data.siloed[mask], labels[mask]
        windows = time_split(frame["timestamp"], config.split)
        out.append(windowed_bank(frame, x, y, windows, data.feature_names, keep_frame=not table))
    return out


def _server_step(
    fed: Federation, server_round: int, summer: SecureSum, failures: int, adam: Any
) -> str | None:
    """FedAvg/FedAdam, the guard and client-level DP noise; update the global weights or say why not."""
    privacy = fed.config.privacy
    aggregate = summer.mean()
    if adam is not None and np.isfinite(aggregate).all():
        aggregate = adam(server_round, aggregate)
    reason = check_flat(aggregate)
    if reason is None and privacy.central_dp:
        if failures:
            return "client-level DP: a sampled bank failed"
        std = privacy.central_dp_noise * privacy.central_dp_clip / fed.per_round
        aggregate = aggregate + np.random.default_rng().normal(0.0, std, aggregate.shape)
    if reason is None:
        fed.weights = aggregate
    return reason


def _run_rounds(
    fed: Federation, transform: Callable[..., np.ndarray], progress: Callable[[str], None] | None
) -> None:
    """The rounds: sample, train, aggregate, guard, evaluate every bank; records as the Flower path's."""
    cfg = fed.config.federation
    n = len(fed.banks)
    rng = np.random.default_rng(fed.config.train.seed)
    sample = max(int(n * cfg.fraction_fit), min(max(cfg.min_fit_banks, fed.per_round), n))
    secagg = choose_secagg(fed.per_round, cfg, max_weight=fed.max_weight) if cfg.secagg else None
    adam = ServerAdam(eta=cfg.server_lr, current=fed.weights.copy()) if cfg.strategy == "fedadam" else None
    ledger: dict[str, float] = {}
    tail = TailAverage(first=first_averaged_round(cfg.rounds, cfg.tail_average))
    for server_round in range(1, cfg.rounds + 1):
        started = time.perf_counter()
        sampled = set(rng.choice(n, size=min(sample, n), replace=False).tolist())
        summer = SecureSum(secagg, generator=fed.noise)
        failures = fed.fit_round(server_round, sampled, summer)
        reason = _server_step(fed, server_round, summer, failures, adam)
        results = len(sampled) - failures  # a declining bank answers too (weight 0), as in the Flower path
        info: dict[str, Any] = {"round": server_round, "results": results, "failures": failures}
        if reason is None:
            info["seconds"] = round(time.perf_counter() - started, 3)
            fed.sink.setdefault("round_weights", {})[server_round] = fed.weights_list()
            tail.add(server_round, fed.weights_list())  # as the Flower path: only rounds with a new model
        else:
            logger.error("round %d: aggregate discarded, the global model is kept: %s", server_round, reason)
            info["discarded"] = reason
        banks = evaluate_banks(fed, transform)
        ledger.update({b: float(m.get("epsilon", 0.0)) for b, m in banks.items()})
        record = {**info, "banks": banks, "evaluate_failures": 0, "ledger": dict(ledger)}
        fed.sink.setdefault("rounds", {})[server_round] = record
        if progress is not None:
            progress(f"federated round {server_round}/{cfg.rounds}")
    fed.sink["weights"] = fed.weights_list()
    fed.sink["served_weights"] = tail.value(fed.sink["weights"])


def run_vectorized(
    data: Prepared,
    config: FedFraudConfig,
    *,
    options: VectorizedOptions = DEFAULT_OPTIONS,
    progress: Callable[[str], None] | None = None,
) -> MethodResult:
    """Train federatedly with the vectorized engine; score the test rows with the final global model."""
    config = engine_config(data, config)
    n_banks = len(data.banks)
    entity = config.entity.enabled
    banks = bank_datasets(data, config)
    fed = Federation(banks, data.banks, config, options)
    names = data.feature_names + (CONSORTIUM_FEATURES if entity else ())
    version = data.feature_version + (f"+{CONSORTIUM_VERSION}" if entity else "")
    if entity:
        start, days = data_days(data)
        settings = ServerSettings(config, n_banks, names, version, entity_start=start, entity_days=days)
        fed.banks = entity_release(banks, settings, fed.sink)
    spec, fraud_rate = stats_spec(fed.banks, config, names=names, version=version, max_weight=fed.max_weight)
    fed.sink.update(spec_json=spec.to_json(), fraud_rate=fraud_rate)
    fed.setup(len(names), initial_weights(config, len(names), fraud_rate), spec.transform)
    _run_rounds(fed, spec.transform, progress)
    return federated_result(data, config, fed.sink)
