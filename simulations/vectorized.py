"""The vectorized simulation engine: every sampled bank's local round as one batched computation.

Same algorithm as the Flower engine (`simulations.federated`), without Ray and without one process call per
bank: the same bank data (each bank's own features and windows), entity release, secure statistics round,
initial model, per-bank privacy step (`clients.privacy.make_privacy_step`: the same sigma, admission and
accountant history, so the epsilon ledgers are those of the Flower path), local DP-SGD or plain training
(`simulations.vectorized_dp`), SecAgg+ quantization, FedAvg / FedProx / FedAdam, client-level DP and the guard
(`simulations.vectorized_server`), per-bank evaluation each round. Banks are stacked in chunks, on the GPU
when there is one. Not supported: checkpoints and resume (`--checkpoint-dir`), Ray resources.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from clients.bank import BankData
from clients.privacy import make_privacy_step, steps_per_round
from clients.privacy_opacus import entropy_generator
from models.averaging import TailAverage, first_averaged_round
from models.config import ConfigError, FedFraudConfig
from models.feature_names import CONSORTIUM_FEATURES, CONSORTIUM_VERSION
from models.nets import build_model
from models.split import time_split
from models.training import pos_weight_for
from server.secagg import choose_secagg
from server.server_app import ServerSettings, initial_weights
from simulations.baselines import MethodResult
from simulations.dataset import Prepared
from simulations.federated import data_days, federated_result
from simulations.vectorized_dp import (
    LocalPlan,
    LocalSettings,
    Rows,
    StackedModel,
    expected_batch,
    train_chunk,
)
from simulations.vectorized_eval import evaluate_banks
from simulations.vectorized_server import (
    SecureSum,
    ServerAdam,
    check_flat,
    clip_updates,
    entity_release,
    stats_spec,
)

logger = logging.getLogger(__name__)
CPU_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class VectorizedOptions:
    """How the vectorized engine runs: banks per chunk (0: from free memory), clipping mode, device."""

    chunk: int = 0
    clipping: str = "auto"
    device: str | None = None


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
        test = frame.loc[windows.test]
        dated = pd.api.types.is_datetime64_any_dtype(frame["timestamp"]) and "card_id" in frame.columns
        out.append(
            BankData(
                x_train=x[windows.train],
                y_train=y[windows.train],
                x_test=x[windows.test],
                y_test=y[windows.test],
                test_cards=test["card_id"].to_numpy() if dated else None,
                test_days=test["timestamp"].dt.floor("D").to_numpy() if dated else None,
                feature_names=data.feature_names,
                frame=None if table else frame,
                train_mask=windows.train,
                test_mask=windows.test,
            )
        )
    return out


def _chunk_size(options: VectorizedOptions, device: torch.device, rows: int, width: int, params: int) -> int:
    """Banks per chunk: the option, else what fits half the free GPU memory (1 GiB of working set on CPU)."""
    if options.chunk > 0:
        return options.chunk
    per_bank = 4 * (rows * (width + 3) + 512 * 8 * 64 + params * 12)
    if options.clipping == "vmap":
        per_bank += 4 * 512 * params * 3
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, int(budget // per_bank))


class Federation:
    """The run's state: banks in chunks, global weights, the banks' privacy ledgers, the sink of records."""

    def __init__(
        self, banks: list[BankData], bank_ids: list[int], config: FedFraudConfig, options: VectorizedOptions
    ) -> None:
        self.banks, self.bank_ids, self.config = banks, bank_ids, config
        self.max_weight = float(max(len(b.y_train) for b in banks))
        fed = config.federation
        self.per_round = max(1, round(fed.fraction_fit * len(banks)))
        cuda = torch.cuda.is_available()
        self.device = torch.device(options.device or ("cuda" if cuda else "cpu"))
        self.ledgers: list[dict[str, Any] | None] = [None] * len(banks)
        self.order = sorted(range(len(banks)), key=lambda i: len(banks[i].y_train))  # similar sizes together
        self.options = options
        self.sink: dict[str, Any] = {}
        self.noise = entropy_generator(self.device)
        self.shuffle = torch.Generator(device=self.device).manual_seed(config.train.seed)

    def setup(self, spec_names: int, initial: list[np.ndarray], transform: Callable[..., np.ndarray]) -> None:
        """Build the model, the chunks of padded, standardized train rows, and the first global weights."""
        train = self.config.train
        model = build_model(train.model, spec_names, hidden_sizes=train.hidden_sizes)
        self.stacked = StackedModel(model, clipping=self.options.clipping)
        self.shapes = [w.shape for w in initial]
        self.weights = np.concatenate([w.ravel() for w in initial]).astype(np.float64)
        rows = max(len(b.y_train) for b in self.banks)
        size = _chunk_size(self.options, self.device, rows, spec_names, self.weights.size)
        self.chunks = [self.order[i : i + size] for i in range(0, len(self.order), size)]
        self.rows = [self._rows(chunk, transform) for chunk in self.chunks]
        logger.info(
            "vectorized engine on %s: %d banks in %d chunks", self.device, len(self.banks), len(self.chunks)
        )

    def _rows(self, chunk: list[int], transform: Callable[..., np.ndarray]) -> Rows:
        width = len(self.banks[0].feature_names)
        n = max([1] + [len(self.banks[i].y_train) for i in chunk])
        x, y = np.zeros((len(chunk), n, width), np.float32), np.zeros((len(chunk), n), np.float32)
        for row, i in enumerate(chunk):
            bank = self.banks[i]
            x[row, : len(bank.y_train)] = transform(bank.x_train)
            y[row, : len(bank.y_train)] = bank.y_train
        counts = torch.tensor([len(self.banks[i].y_train) for i in chunk])
        mask = (torch.arange(n) < counts.unsqueeze(1)).float()
        pos = self.config.train.pos_weight
        weights = [pos or pos_weight_for(self.banks[i].y_train) for i in chunk]
        return Rows(
            torch.from_numpy(x), torch.from_numpy(y), mask, torch.tensor(weights, dtype=torch.float32)
        )

    def _privacy_step(self, i: int) -> tuple[Any, int, int]:
        """Bank i's privacy step as `train_round` makes it, its batch size and its steps per round."""
        train, privacy, fed = self.config.train, self.config.privacy, self.config.federation
        n = max(len(self.banks[i].y_train), 1)
        size = min(train.batch_size, n)
        step = make_privacy_step(
            enabled=privacy.dp,
            epsilon=privacy.epsilon_for(self.bank_ids[i]),
            delta=privacy.dp_delta,
            max_grad_norm=privacy.dp_max_grad_norm,
            n_examples=n,
            batch_size=size,
            local_epochs=train.local_epochs,
            planned_rounds=max(1, math.ceil(fed.rounds * fed.fraction_fit)),
            state=self.ledgers[i],
        )
        return step, size, steps_per_round(n_examples=n, batch_size=size, local_epochs=train.local_epochs)

    def _plan(
        self, chunk: list[int], sampled: set[int], pos_weight: torch.Tensor
    ) -> tuple[LocalPlan, list[Any]]:
        """Each bank's privacy step this round (declining over budget) and the chunk's per-bank settings."""
        columns: dict[str, list[Any]] = {
            k: [] for k in ("n", "batch", "steps", "active", "rate", "exp", "sigma")
        }
        privacy_steps = []
        for i in chunk:
            n = len(self.banks[i].y_train)
            step, size, k = self._privacy_step(i)
            go = i in sampled and n > 0 and step.admits(steps=k)
            if i in sampled and not go:
                logger.warning(
                    "bank %s declines this round (no training rows or over budget)", self.bank_ids[i]
                )
            rate = float(getattr(step, "sample_rate", 1.0))
            row = (
                n,
                size,
                k,
                go,
                rate,
                expected_batch(n, rate),
                float(getattr(step, "noise_multiplier", 0.0)),
            )
            for key, value in zip(columns, row, strict=True):
                columns[key].append(value)
            privacy_steps.append(step)
        dev, f32 = self.device, torch.float32
        dp = self.config.privacy.dp
        plan = LocalPlan(
            n=torch.tensor(columns["n"], device=dev),
            batch=torch.tensor(columns["batch"], device=dev),
            steps=torch.tensor(columns["steps"], device=dev),
            active=torch.tensor(columns["active"], device=dev),
            pos_weight=pos_weight,
            rate=torch.tensor(columns["rate"], dtype=f32, device=dev) if dp else None,
            expected=torch.tensor(columns["exp"], dtype=f32, device=dev) if dp else None,
            sigma=torch.tensor(columns["sigma"], dtype=f32, device=dev) if dp else None,
        )
        return plan, privacy_steps

    def fit_round(self, server_round: int, sampled: set[int], summer: SecureSum) -> int:
        """Train every sampled bank's chunk and add the updates to the secure sum; return the failures."""
        cfg = self.config
        local = LocalSettings(
            lr=cfg.privacy.learning_rate(cfg.train.lr),
            epochs=cfg.train.local_epochs,
            weight_decay=cfg.train.weight_decay,
            max_grad_norm=cfg.privacy.dp_max_grad_norm,
            proximal_mu=cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0,
        )
        start = torch.from_numpy(self.weights.astype(np.float32)).to(self.device)
        failures = 0
        for chunk, host in zip(self.chunks, self.rows, strict=True):
            rows = Rows(*(t.to(self.device, non_blocking=True) for t in dataclasses.astuple(host)))
            plan, steps = self._plan(chunk, sampled, rows.pos_weight)
            params = [
                p.unsqueeze(0).repeat(len(chunk), *[1] * p.dim()).contiguous() for p in self._split(start)
            ]
            generator = self.noise if plan.rate is not None else self.shuffle
            taken = train_chunk(self.stacked, params, rows, plan, local, generator=generator).cpu().tolist()
            for i, step, k in zip(chunk, steps, taken, strict=True):
                if hasattr(step, "record_steps"):
                    step.record_steps(int(k))
                self.ledgers[i] = dict(step.state()) or None
            flat = torch.cat([p.reshape(len(chunk), -1) for p in params], dim=1)
            ok = plan.active & torch.isfinite(flat).all(1) & (flat.abs().amax(1) <= 8.0)
            failures += int((plan.active & ~ok).sum())
            if cfg.privacy.central_dp:
                flat = clip_updates(flat, start, cfg.privacy.central_dp_clip)
            summer.add(flat[ok], plan.n[ok])
        return failures

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [math.prod(s) for s in self.shapes]
        return [part.reshape(s) for part, s in zip(flat.split(sizes), self.shapes, strict=True)]

    def weights_list(self) -> list[np.ndarray]:
        """The global weights as the model's arrays (float32)."""
        return [w.numpy().astype(np.float32) for w in self._split(torch.from_numpy(self.weights))]


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
        else:
            logger.error("round %d: aggregate discarded, the global model is kept: %s", server_round, reason)
            info["discarded"] = reason
        tail.add(server_round, fed.weights_list())
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
    options: VectorizedOptions = VectorizedOptions(),
    progress: Callable[[str], None] | None = None,
) -> MethodResult:
    """Train federatedly with the vectorized engine; score the test rows with the final global model."""
    split = dataclasses.replace(config.split, test_start=data.split.test_start or config.split.test_start)
    config = dataclasses.replace(config, split=split)
    n_banks = len(data.banks)
    if config.federation.secagg:
        choose_secagg(max(1, round(config.federation.fraction_fit * n_banks)), config.federation)
    entity = config.entity.enabled
    if entity and data.feature_version.startswith("table"):
        raise ConfigError("config key 'entity-features': a feature table has no entity ids to federate")
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
