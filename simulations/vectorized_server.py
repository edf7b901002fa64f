"""The consortium's side of the vectorized engine: the same aggregation arithmetic as the Flower path.

SecAgg+ (what `flwr.client.mod.secaggplus_mod` and `SecAggPlusWorkflow` compute; the masks cancel): each
bank's weight num_examples / max_weight is quantized to q = round(w Q) / Q, its vector multiplied by it,
clipped to +-c, mapped to [0, Q] and stochastically rounded (`flwr.common.secure_aggregation.quantization`,
in the vector's own dtype); the server dequantizes the integer sum, removes the offsets and divides by the
summed weights. Without SecAgg+, FedAvg's weighted mean. Then FedAdam, client-level DP (the clip of
`fixedclipping_mod`, the noise of `DifferentialPrivacyClientSideFixedClipping`) and the guard.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from clients.bank import BankData
from clients.entity_round import table_share, with_consortium
from models.config import FedFraudConfig
from models.federation import CLIPPING_RANGE, STATS_CLIP
from models.release_noise import achieved_epsilon, check_table, from_wire_layout
from models.spec import FeatureSpec, FeatureStats
from server.entity_release import announce, check_contributing, publishes_whole_counts, table_version
from server.secagg import SecAggParams, choose_secagg

logger = logging.getLogger(__name__)


@dataclass
class SecureSum:
    """Running sums over chunks of banks: SecAgg+'s integer sum and weights, or FedAvg's weighted sum."""

    params: SecAggParams | None
    total: Tensor | None = None
    weight: float = 0.0
    results: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)

    def add(self, vectors: Tensor, examples: Tensor) -> None:
        """Add banks' vectors [B, P] with their num_examples [B] (what each bank's FitRes carries)."""
        if len(vectors) == 0:
            return
        if self.params is None:
            w = examples.to(torch.float64)
            part = (vectors.to(torch.float64) * w.unsqueeze(1)).sum(0)
            self.weight += float(w.sum())
        else:
            part, ratio = quantized_sum(vectors, examples, self.params, self.generator)
            self.weight += ratio
        self.total = part if self.total is None else self.total + part
        self.results += len(vectors)

    def mean(self) -> np.ndarray:
        """The aggregate the strategy receives (NaN when no weight arrived: the guard discards it)."""
        if self.total is None or self.weight == 0:
            size = 0 if self.total is None else self.total.numel()
            return np.full(size, np.nan)
        total = self.total.cpu().numpy()
        if self.params is None:
            return total / self.weight
        c, q = self.params.clipping_range, self.params.quantization_range
        recon = total * ((2 * c) / q) + (-c)
        recon += -(self.results - 1) * c
        recon *= q / self.weight
        return recon


def quantized_sum(
    vectors: Tensor, examples: Tensor, params: SecAggParams, generator: torch.Generator | None
) -> tuple[Tensor, float]:
    """Sum of the banks' quantized weighted vectors (float64, exact integers) and of their weights."""
    q, c = params.quantization_range, params.clipping_range
    q_ratio = torch.round(examples.to(torch.float64) / params.max_weight * q)
    dq = (q_ratio / q).to(vectors.dtype).unsqueeze(1)
    pre = ((vectors * dq).clamp(-c, c) + c) * (q / (2 * c))
    ceil = torch.ceil(pre).to(torch.float64)
    u = torch.rand(pre.shape, generator=generator, device=pre.device, dtype=torch.float64)
    quantized = ceil - (u < ceil - pre.to(torch.float64)).to(torch.float64)
    return quantized.sum(0), float(q_ratio.sum())


def clip_updates(new: Tensor, start: Tensor, norm: float) -> Tensor:
    """`fixedclipping_mod` for each bank: the update new - start scaled to L2 norm <= `norm`, plus start."""
    update = new - start.unsqueeze(0)
    size = update.norm(dim=1, keepdim=True)
    scale = torch.where(size > 0, (norm / size).clamp(max=1.0), torch.ones_like(size))
    return start.unsqueeze(0) + update * scale


@dataclass
class ServerAdam:
    """Flower's FedAdam server step (beta1 0.9, beta2 0.99, tau 1e-9) on the aggregated weights."""

    eta: float
    current: np.ndarray
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9
    m_t: np.ndarray | None = None
    v_t: np.ndarray | None = None

    def __call__(self, server_round: int, aggregate: np.ndarray) -> np.ndarray:
        """The new global weights after one FedAdam step towards the FedAvg aggregate."""
        delta = aggregate - self.current
        self.m_t = self.beta_1 * (self.m_t if self.m_t is not None else 0 * delta) + (1 - self.beta_1) * delta
        v_prev = self.v_t if self.v_t is not None else 0 * delta
        self.v_t = self.beta_2 * v_prev + (1 - self.beta_2) * delta * delta
        eta_norm = (
            self.eta
            * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0))
            / (1 - np.power(self.beta_1, server_round + 1.0))
        )
        self.current = self.current + eta_norm * self.m_t / (np.sqrt(self.v_t) + self.tau)
        return self.current


def check_flat(flat: np.ndarray) -> str | None:
    """`server.strategy.check_aggregate` on a flat vector: non-finite or beyond the clipping bound."""
    if not np.isfinite(flat).all():
        return "non-finite values (e.g. every bank declined)"
    worst = float(np.abs(flat).max(initial=0.0))
    return (
        f"|value| {worst:.2f} beyond the clipping bound {CLIPPING_RANGE}" if worst > CLIPPING_RANGE else None
    )


def stats_secagg(config: FedFraudConfig, n_banks: int, max_weight: float) -> SecAggParams | None:
    """SecAgg+ settings of the statistics round (quantization from the modulus and the number of banks)."""
    fed = config.federation
    if not fed.secagg:
        return None
    q = 2 ** int(math.log2((fed.secagg_modulus_range - 1) // n_banks))
    params = choose_secagg(n_banks, fed, max_weight=max_weight)
    return SecAggParams(**{**params.workflow_kwargs(), "quantization_range": q})


def stats_spec(
    banks: list[BankData], config: FedFraudConfig, *, names: tuple[str, ...], version: str, max_weight: float
) -> tuple[FeatureSpec, float]:
    """`server_app.stats_round`: the consortium feature spec and fraud rate from the banks' secure mean."""
    n_features = len(names)
    bounds = np.concatenate([np.full(n_features, STATS_CLIP), np.full(n_features, STATS_CLIP**2), [1.0]])
    scales = bounds / CLIPPING_RANGE
    summer = SecureSum(stats_secagg(config, len(banks), max_weight))
    vectors = torch.from_numpy(np.stack([b.stats_vector() / scales for b in banks]))
    summer.add(vectors, torch.tensor([len(b.y_train) for b in banks]))
    moments = summer.mean() * scales
    stats = FeatureStats(count=1.0, total=moments[:n_features], total_sq=moments[n_features : 2 * n_features])
    fraud_rate = float(np.clip(moments[-1], 1e-6, 0.5))
    spec = FeatureSpec.from_stats(names, stats, version=version, delay_days=config.split.delay_days)
    return spec, fraud_rate


def entity_release(banks: list[BankData], settings: Any, sink: dict[str, Any]) -> list[BankData]:
    """`server.entity_release.entity_round` with the banks' own `table_share`; each bank gets the features."""
    release = announce(settings)
    plan, noise = release.pop("_plan"), release.pop("_noise")
    public = json.dumps(release)
    params = None
    if settings.config.federation.secagg:
        shares = choose_secagg(len(banks), settings.config.federation).workflow_kwargs()
        params = SecAggParams(**{**shares, **plan.workflow_kwargs()})
    summer = SecureSum(params)
    for bank in banks:  # one bank at a time: a table is days x buckets x 2 cells
        summer.add(torch.from_numpy(table_share(bank, public)).unsqueeze(0), torch.ones(1))
    check_contributing(release, summer.results)
    total = plan.decode(summer.mean(), contributing=summer.results, integers=publishes_whole_counts(release))
    shape = (2, int(release["days"]), int(release["buckets"]))
    total = from_wire_layout(total.reshape(shape), release["layout"])
    table = check_table(total)
    epsilon = achieved_epsilon(noise, contributing=summer.results, n_banks=int(release["noise-banks"]))
    sink.update(
        entity_table=table,
        entity_release=public,
        entity_epsilon=epsilon,
        entity_raw=total,
        entity_version=table_version(public, table),
        entity_contributing=summer.results,
    )
    return [with_consortium(bank, table.ravel(), public) for bank in banks]
