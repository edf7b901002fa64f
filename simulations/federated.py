"""Federated training in the harness: the real ServerApp and ClientApp on Flower's simulation engine (Ray).

Each simulated bank gets its own file (written here from the prepared data), and reads, featurizes and
splits it with the same code as a deployed bank. The harness then scores every test row with the final
global model and the consortium's feature spec, exactly as each bank would score its own rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clients.client_app import BankSettings, make_client_app
from clients.entity import consortium_features
from clients.entity_round import release_spec
from models.config import ConfigError, FedFraudConfig
from models.feature_names import CONSORTIUM_FEATURES, CONSORTIUM_VERSION
from models.metrics import fraud_metrics
from models.nets import federated_model, set_weights
from models.spec import FeatureSpec
from models.training import predict_scores
from server.secagg import choose_secagg
from server.server_app import FederationError, ServerSettings, make_server_app
from simulations.baselines import MethodResult
from simulations.dataset import Prepared

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How the Flower simulation engine runs the banks."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ray_address: str | None = None
    checkpoint_dir: Path | None = None


def write_bank_files(data: Prepared, directory: Path) -> dict[int, tuple[int, str]]:
    """One canonical file per bank (what a deployed bank holds); partition id -> (bank id, path)."""
    directory.mkdir(parents=True, exist_ok=True)
    extra = list(data.feature_names) if data.feature_version.startswith("table") else []
    columns = [
        c
        for c in ["transaction_id", "timestamp", "card_id", "merchant_id", "amount", "is_fraud", *extra]
        if c in data.frame.columns
    ]
    out = {}
    for pid, bank in enumerate(data.banks):
        path = directory / f"bank_{bank:03d}.parquet"
        data.frame.loc[data.bank_mask(bank), columns].to_parquet(path, index=False)
        out[pid] = (bank, str(path))
    return out


def _test_features(data: Prepared, sink: dict[str, Any]) -> np.ndarray:
    """Each test row's features as its bank computes them: local, plus consortium ones after a release."""
    return method_features(data, sink, data.split.test)


def method_features(data: Prepared, sink: Mapping[str, Any], rows: np.ndarray) -> np.ndarray:
    """The rows' features as their banks compute them (consortium ones when the run published a table)."""
    x = data.siloed[rows]
    if "entity_table" not in sink:
        return x
    release = json.loads(sink["entity_release"])
    extra = consortium_features(
        data.frame.loc[rows],
        sink["entity_table"],
        release_spec(release),
        key=bytes.fromhex(release["key"]),
    )
    return np.hstack([x, extra.to_numpy(np.float32)])


def _scores(
    config: FedFraudConfig, weights: list[np.ndarray], spec: FeatureSpec, x: np.ndarray
) -> np.ndarray:
    model = federated_model(config, len(spec.names))
    set_weights(model, weights)
    return predict_scores(model, spec.transform(x))


def without_entity(config: FedFraudConfig) -> FedFraudConfig:
    """The same configuration with the entity release switched off (the model-only federated row)."""
    return dataclasses.replace(config, entity=dataclasses.replace(config.entity, entity_features=""))


def data_days(data: Prepared) -> tuple[str, int]:
    """The first day of the data and the number of days it spans (the entity table's day range)."""
    times = data.frame["timestamp"]
    first, last = times.min().normalize(), times.max().normalize()
    return str(first.date()), int((last - first).days) + 1


def _round_curves(
    data: Prepared, config: FedFraudConfig, sink: dict[str, Any], spec: FeatureSpec, x: np.ndarray
) -> list[dict[str, Any]]:
    labels = data.rows["is_fraud"].to_numpy()[data.split.test]
    test = data.rows.loc[data.split.test]
    dated = pd.api.types.is_datetime64_any_dtype(test["timestamp"]) and test["card_id"].notna().all()
    cards = test["card_id"].to_numpy() if dated else None
    days = test["timestamp"].dt.floor("D").to_numpy() if dated else None
    curves = []
    for round_no, record in sorted(sink.get("rounds", {}).items()):
        weights = sink.get("round_weights", {}).get(round_no)
        entry = {k: v for k, v in record.items() if k != "weights"}
        if weights is not None:
            entry["global"] = fraud_metrics(
                labels, _scores(config, weights, spec, x), card_ids=cards, days=days
            )
        curves.append(entry)
    return curves


def engine_config(data: Prepared, config: FedFraudConfig) -> FedFraudConfig:
    """The config at the data's test start; ConfigError for an overflowing SecAgg+ or entities of a table."""
    split = dataclasses.replace(config.split, test_start=data.split.test_start or config.split.test_start)
    config = dataclasses.replace(config, split=split)
    if config.federation.secagg:
        choose_secagg(max(1, round(config.federation.fraction_fit * len(data.banks))), config.federation)
    if config.entity.enabled and data.feature_version.startswith("table"):
        raise ConfigError("config key 'entity-features': a feature table has no entity ids to federate")
    return config


def run_federated(
    data: Prepared,
    config: FedFraudConfig,
    *,
    engine: EngineOptions = EngineOptions(),
    progress: Callable[[str], None] | None = None,
) -> MethodResult:
    """Train federatedly on Flower's simulation engine; score the test rows with the final global model."""
    from flwr.simulation import run_simulation  # noqa: PLC0415 - imports Ray: only when federating

    config = engine_config(data, config)  # refuses a bad configuration before starting Ray
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="fedfraud-banks-") as tmp:
        banks = write_bank_files(data, Path(tmp))
        entity = config.entity.enabled
        entity_start, entity_days = data_days(data) if entity else ("", 0)
        train_rows = [int((data.bank_mask(b) & data.split.train).sum()) for b, _ in banks.values()]
        table = data.feature_names if data.feature_version.startswith("table") else None
        server = ServerSettings(
            config=config,
            n_banks=len(banks),
            feature_names=data.feature_names + (CONSORTIUM_FEATURES if entity else ()),
            feature_version=data.feature_version + (f"+{CONSORTIUM_VERSION}" if entity else ""),
            checkpoint_dir=engine.checkpoint_dir,
            max_weight=float(max(train_rows)),
            entity_start=entity_start,
            entity_days=entity_days,
            on_progress=progress,
        )
        ledgers = str(engine.checkpoint_dir / "bank-ledgers") if engine.checkpoint_dir else None
        client = BankSettings(config=config, banks=banks, features=table, ledger_dir=ledgers)
        init_args: dict[str, Any] = {"address": engine.ray_address} if engine.ray_address else {}
        resources: dict[str, Any] = {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus}
        threads = torch.get_num_threads()
        run_simulation(
            server_app=make_server_app(server),
            client_app=make_client_app(client),
            num_supernodes=len(banks),
            backend_config={"client_resources": resources, "init_args": init_args},
        )
        torch.set_num_threads(threads)
    return federated_result(data, config, server.sink)


def federated_result(data: Prepared, config: FedFraudConfig, sink: dict[str, Any]) -> MethodResult:
    """Score the test rows with the sink's final global model; per-round curves and the entity release."""
    if "weights" not in sink or "spec_json" not in sink:
        raise FederationError("the federated run ended without a global model (see the log above)")
    spec = FeatureSpec.from_json(sink["spec_json"])
    x = _test_features(data, sink)
    details: dict[str, Any] = {
        "rounds": _round_curves(data, config, sink, spec, x),
        "feature_spec": json.loads(sink["spec_json"]),
    }
    if "entity_table" in sink:
        release = json.loads(sink["entity_release"])
        details["entity_release"] = {k: v for k, v in release.items() if k != "key"}
        details["entity_release"]["epsilon_achieved"] = sink["entity_epsilon"]
        details["entity_release"]["version"] = sink["entity_version"]
        details["entity_release"]["contributing"] = sink["entity_contributing"]
    served = list(sink.get("served_weights", sink["weights"]))  # the tail average (models/averaging.py)
    details["tail_average"] = config.federation.tail_average
    return MethodResult(
        scores=_scores(config, served, spec, x),
        details=details,
        weights=served,
        artifacts={k: v for k, v in sink.items() if k.startswith("entity")},
    )
