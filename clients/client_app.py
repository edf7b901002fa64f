"""The bank's Flower ClientApp: statistics round, DP training round and evaluation over the bank's own file.

Flower wiring only (legacy NumPyClient + mods, the one API with SecAgg+); the work is in `clients.local`.
Simulation builds the app with `make_client_app(settings)`; deployment runs `app`, which reads the run config
and the node config (`data-path`, `bank-id`, optional `columns`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.client import Client, NumPyClient
from flwr.client.mod import fixedclipping_mod
from flwr.clientapp import ClientApp

from clients import entity_round
from clients.bank import BankData, load_bank
from clients.data import parse_columns
from clients.ledger import BankLedger
from clients.local import evaluate_round, train_round
from clients.mods import optional_secaggplus_mod, scrub_plaintext_mod, skip_for_stats
from clients.node_policy import apply_bank_policy, require_secagg_mod
from clients.sent_log import sent_log_mod
from clients.transport import packed_transport_mod
from models.config import FedFraudConfig, parse_config
from models.federation import (
    BANK_STATE,
    ENTITY_RELEASE,
    ENTITY_TABLE,
    EVAL_PREFIX,
    KEY_ENTITY,
    KEY_EVALUATE,
    KEY_PROXIMAL_MU,
    KEY_PUBLISHED,
    KEY_ROUND,
    KEY_SPEC,
    TASK,
    TASK_ENTITY,
    TASK_PUBLISH,
    TASK_STATS,
)
from models.spec import FeatureSpec

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
logger = logging.getLogger(__name__)
NDArrays = list[np.ndarray]


@dataclass(frozen=True)
class BankSettings:
    """Where each simulated bank's file is (partition id -> (bank id, path)) and how to read it."""

    config: FedFraudConfig
    banks: dict[int, tuple[int, str]] = field(default_factory=dict)
    features: tuple[str, ...] | None = None
    columns: dict[str, str] = field(default_factory=dict)
    ledger_dir: str | None = None


class BankClient(NumPyClient):
    """One bank: trains and evaluates the global model on its own rows; its ledger lives in context.state."""

    def __init__(
        self,
        context: Context,
        config: FedFraudConfig,
        bank: int,
        data: BankData,
        ledger: BankLedger | None = None,
    ) -> None:
        self.context, self.config, self.bank, self.data = context, config, bank, data
        self.ledger_file = ledger
        self.entity_budget = config.entity.entity_bank_epsilon
        if BANK_STATE not in context.state.config_records and ledger is not None:
            saved = ledger.load()
            if saved:
                context.state.config_records[BANK_STATE] = ConfigRecord(saved)
        published = context.state.array_records.get(ENTITY_TABLE)
        if published is not None:  # the consortium's entity table: add its features to the local ones
            release = str(context.state.config_records[ENTITY_RELEASE]["release"])
            self.data = entity_round.with_consortium(data, published.to_numpy_ndarrays()[0], release)

    def _ledger(self) -> dict[str, Any] | None:
        record = self.context.state.config_records.get(BANK_STATE)
        return dict(record) if record is not None else None

    def fit(self, parameters: NDArrays, config: Mapping[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        """Answer a statistics round or a training round (a zero-weight echo when the bank declines)."""
        if config.get(TASK) == TASK_STATS:
            scales = np.asarray(parameters[0], dtype=np.float64)
            return [self.data.stats_vector() / scales], len(self.data.y_train), {}
        if config.get(TASK) == TASK_ENTITY:  # weight 1: the masked mean times the banks is the exact sum
            budget = float(self.entity_budget)
            entity_round.join(self.context.state, self.ledger_file, str(config[KEY_ENTITY]), budget=budget)
            return [entity_round.table_share(self.data, str(config[KEY_ENTITY]))], 1, {}
        if config.get(TASK) == TASK_PUBLISH:
            self.context.state.array_records[ENTITY_TABLE] = ArrayRecord(numpy_ndarrays=[parameters[0]])
            self.context.state.config_records[ENTITY_RELEASE] = ConfigRecord(
                {"release": str(config[KEY_ENTITY])}
            )
            if KEY_PUBLISHED in config:
                entity_round.confirm(self.context.state, self.ledger_file, str(config[KEY_PUBLISHED]))
            return [np.zeros(1)], 0, {}
        spec = FeatureSpec.from_json(str(config[KEY_SPEC]))
        scored = self._score_previous(parameters, spec) if config.get(KEY_EVALUATE) else {}
        outcome = train_round(
            self.data,
            parameters,
            spec,
            self.config,
            bank=self.bank,
            state=self._ledger(),
            proximal_mu=float(config.get(KEY_PROXIMAL_MU, 0.0)),
            seed=self.config.train.seed + 1000 * int(config.get(KEY_ROUND, 0)) + self.bank,
        )
        if outcome.state:
            self.context.state.config_records[BANK_STATE] = ConfigRecord(outcome.state)
            if self.ledger_file is not None:
                self.ledger_file.save(outcome.state, declined=outcome.weights is None)
        report = {**scored, **self._privacy_report()}
        if outcome.weights is None:
            return parameters, 0, report
        return outcome.weights, outcome.examples, report

    def evaluate(self, parameters: NDArrays, config: Mapping[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """Score the global model on this bank's test window; report its metrics and epsilon spent."""
        loss, metrics = self._test_scores(parameters, FeatureSpec.from_json(str(config[KEY_SPEC])))
        return loss, len(self.data.y_test), {**metrics, **self._privacy_report()}

    def _test_scores(self, parameters: NDArrays, spec: FeatureSpec) -> tuple[float, dict[str, Any]]:
        """Loss (0 when the test window is empty) and fraud metrics of a model on this bank's test window."""
        loss, metrics = evaluate_round(self.data, parameters, spec, self.config)
        return (float(loss) if np.isfinite(loss) else 0.0), dict(metrics)

    def _score_previous(self, parameters: NDArrays, spec: FeatureSpec) -> dict[str, Any]:
        """The incoming global model (the previous round's) scored as `evaluate` would, keys prefixed."""
        loss, metrics = self._test_scores(parameters, spec)
        metrics = {**metrics, "loss": loss, "examples": len(self.data.y_test)}
        return {f"{EVAL_PREFIX}{k}": v for k, v in metrics.items()}

    def _privacy_report(self) -> dict[str, Any]:
        """The bank's id and privacy spent so far (`REPORT_KEYS`), sent in the clear with each reply."""
        ledger = self._ledger() or {}
        return {
            "bank": self.bank,
            "epsilon": float(ledger.get("dp-epsilon-spent", 0.0)),
            "entity-epsilon": entity_round.spent(
                self.context.state, self.ledger_file, delta=self.config.entity.entity_delta
            ),
        }


def _client_mods(config: FedFraudConfig) -> list[Any]:
    """Outermost first: hide plaintext counts, mask (SecAgg+), then clip for client-level DP."""
    mods: list[Any] = [scrub_plaintext_mod, optional_secaggplus_mod]
    if config.privacy.central_dp:
        mods.append(skip_for_stats(fixedclipping_mod))
    return mods


def make_client_app(settings: BankSettings) -> ClientApp:
    """A ClientApp for simulation: each partition id is one bank's file."""

    def client_fn(context: Context) -> Client:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        bank, path = settings.banks[int(context.node_config["partition-id"])]
        data = load_bank(
            path, split=settings.config.split, features=settings.features, columns=settings.columns
        )
        ledger = (
            BankLedger(Path(settings.ledger_dir) / f"bank_{bank:03d}.json") if settings.ledger_dir else None
        )
        return BankClient(context, settings.config, bank, data, ledger).to_client()

    return ClientApp(client_fn=client_fn, mods=_client_mods(settings.config))


def _data_path(node: Mapping[str, Any], config: FedFraudConfig) -> str:
    """The bank's file: `data-path` in the node config, else bank_<partition-id> under the run's data-dir."""
    if node.get("data-path"):
        return str(node["data-path"])
    if config.federation.data_dir and "partition-id" in node:
        return str(Path(config.federation.data_dir) / f"bank_{int(node['partition-id']):02d}.parquet")
    raise ValueError(
        "node config key 'data-path' is missing: start the SuperNode with "
        "--node-config \"data-path='/path/to/transactions.parquet'\""
    )


def _deployed_client(context: Context) -> Client:
    """Deployment: the bank's file from the node config, settings from the run config."""
    node = context.node_config
    config = apply_bank_policy(parse_config(dict(context.run_config)), node)
    features = tuple(str(node["features"]).split(",")) if node.get("features") else None
    data = load_bank(
        _data_path(node, config),
        split=config.split,
        features=features,
        columns=parse_columns(str(node.get("columns", "")) or None),
    )
    ledger = BankLedger(Path(str(node["ledger-path"]))) if node.get("ledger-path") else None
    return BankClient(context, config, int(node.get("bank-id", 0)), data, ledger).to_client()


# Deployment: the outermost mod restores the model arrays the server packed into one object and packs the
# reply the same way (clients/transport.py); the next logs each reply as it leaves the bank
# (clients/sent_log.py); the bank's node config can forbid any reply outside SecAgg+ (clients/node_policy.py).
app = ClientApp(
    client_fn=_deployed_client,
    mods=[
        packed_transport_mod,
        sent_log_mod,
        scrub_plaintext_mod,
        require_secagg_mod,
        optional_secaggplus_mod,
    ],
)
