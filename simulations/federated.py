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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clients.client_app import BankSettings, make_client_app
from models.config import FedFraudConfig
from models.metrics import fraud_metrics
from models.nets import build_model, set_weights
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


def _scores(
    data: Prepared, config: FedFraudConfig, weights: list[np.ndarray], spec: FeatureSpec
) -> np.ndarray:
    model = build_model(config.train.model, len(spec.names), hidden_sizes=config.train.hidden_sizes)
    set_weights(model, weights)
    return predict_scores(model, spec.transform(data.siloed[data.split.test]))


def _round_curves(
    data: Prepared, config: FedFraudConfig, sink: dict[str, Any], spec: FeatureSpec
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
                labels, _scores(data, config, weights, spec), card_ids=cards, days=days
            )
        curves.append(entry)
    return curves


def run_federated(
    data: Prepared,
    config: FedFraudConfig,
    *,
    engine: EngineOptions = EngineOptions(),
    progress: Callable[[str], None] | None = None,
) -> MethodResult:
    """Train federatedly on Flower's simulation engine; score the test rows with the final global model."""
    from flwr.simulation import run_simulation  # noqa: PLC0415 - imports Ray: only when federating

    split = dataclasses.replace(config.split, test_start=data.split.test_start or config.split.test_start)
    config = dataclasses.replace(config, split=split)
    if config.federation.secagg:  # refuse an overflowing configuration before starting Ray
        choose_secagg(max(1, round(config.federation.fraction_fit * len(data.banks))), config.federation)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="fedfraud-banks-") as tmp:
        banks = write_bank_files(data, Path(tmp))
        train_rows = [int((data.bank_mask(b) & data.split.train).sum()) for b, _ in banks.values()]
        table = data.feature_names if data.feature_version.startswith("table") else None
        server = ServerSettings(
            config=config,
            n_banks=len(banks),
            feature_names=data.feature_names,
            feature_version=data.feature_version,
            checkpoint_dir=engine.checkpoint_dir,
            max_weight=float(max(train_rows)),
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
    sink = server.sink
    if "weights" not in sink or "spec_json" not in sink:
        raise FederationError("the federated run ended without a global model (see the log above)")
    spec = FeatureSpec.from_json(sink["spec_json"])
    scores = _scores(data, config, sink["weights"], spec)
    return MethodResult(
        scores=scores,
        details={
            "rounds": _round_curves(data, config, sink, spec),
            "feature_spec": json.loads(sink["spec_json"]),
        },
        weights=list(sink["weights"]),
    )
