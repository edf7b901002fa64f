"""The vectorized engine's state: the banks in chunks, the global weights, the banks' privacy ledgers.

`Federation` builds the chunks of padded, standardized train rows and runs one round of local training for
every chunk (`fit_round`): each bank's privacy step as the Flower client makes it
(`clients.local.round_privacy_step`), the stacked DP-SGD or plain steps (`simulations.vectorized_dp`), the
update guard and clipping, and the secure sum (`simulations.vectorized_server`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clients.bank import BankData
from clients.local import round_privacy_step
from clients.privacy_opacus import entropy_generator
from models.config import FedFraudConfig
from models.nets import federated_model
from models.training import pos_weight_for
from simulations.vectorized_dp import (
    LocalPlan,
    LocalSettings,
    Rows,
    StackedModel,
    expected_batch,
    train_chunk,
)
from simulations.vectorized_server import SecureSum, clip_updates

logger = logging.getLogger(__name__)
CPU_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class VectorizedOptions:
    """How the vectorized engine runs: banks per chunk (0: from free memory), clipping mode, device."""

    chunk: int = 0
    clipping: str = "auto"
    device: str | None = None


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
        model = federated_model(self.config, spec_names)
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
            step, size, k = round_privacy_step(
                self.config, bank=self.bank_ids[i], n_examples=n, state=self.ledgers[i]
            )
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
