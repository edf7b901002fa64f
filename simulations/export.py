"""The results directory's `model/`: the best federated model as a package a bank can score with.

The package holds `federated_entity`'s model when the run has it, else `federated`'s; a run without
federated training (`--engine none`) writes no `model/` (and logs why). The decision threshold is chosen
for a 1% false-positive rate on the training window's scores (labelled rows the test metrics do not use;
the model has seen them, so the test window's false-positive rate tends to come out a little higher).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.config import FedFraudConfig
from models.nets import federated_model, set_weights
from models.package import EntityTable, ModelPackage, export_package, key_fingerprint
from models.spec import FeatureSpec
from models.threshold import DEFAULT_TARGET_FPR, threshold_for_fpr
from models.training import predict_scores
from simulations.baselines import MethodResult
from simulations.dataset import Prepared
from simulations.federated import method_features

logger = logging.getLogger(__name__)

PACKAGED_METHODS = ("federated_entity", "federated")
KEY_FILE = "consortium-key.hex"


def _entity(artifacts: Mapping[str, Any]) -> tuple[EntityTable | None, str | None]:
    """The published table with its public release (the key replaced by its fingerprint), and the key."""
    if "entity_table" not in artifacts:
        return None, None
    release = json.loads(artifacts["entity_release"])
    key = str(release.pop("key"))
    release["key_fingerprint"] = key_fingerprint(bytes.fromhex(key))
    release["epsilon_achieved"] = artifacts.get("entity_epsilon")
    release["published_version"] = artifacts.get("entity_version")  # as the banks' ledgers record it
    release["contributing"] = artifacts.get("entity_contributing")
    return EntityTable(table=artifacts["entity_table"], release=release), key


def build_package(
    name: str, result: MethodResult, data: Prepared, config: FedFraudConfig, metrics: Mapping[str, Any]
) -> tuple[ModelPackage, str | None]:
    """The package of one federated method's final model, threshold chosen on the training window."""
    if result.weights is None:
        raise ValueError(f"method {name!r} returned no weights")
    spec = FeatureSpec.from_json(json.dumps(result.details["feature_spec"]))
    kind, hidden = config.train.model, config.federated_hidden_sizes
    model = federated_model(config, len(spec.names))
    set_weights(model, result.weights)
    train = data.split.train
    scores = predict_scores(model, spec.transform(method_features(data, result.artifacts, train)))
    labels = data.rows["is_fraud"].to_numpy()[train]
    window = data.split.description.get("train", "train rows")
    threshold = threshold_for_fpr(
        scores, labels, target_fpr=DEFAULT_TARGET_FPR, source=f"training window {window}, {len(labels)} rows"
    )
    method_metrics = metrics["methods"].get(name, {})
    summary = {
        "method": name,
        "test": method_metrics.get("global"),
        "banks": method_metrics.get("banks"),
        "split": metrics.get("split"),
        "feature_version": spec.version,
    }
    entity, key = _entity(result.artifacts)
    package = ModelPackage(
        model_kind=kind,
        hidden_sizes=hidden,
        weights=list(result.weights),
        spec=spec,
        threshold=threshold,
        config=config.to_dict(),
        metrics=summary,
        entity=entity,
        method=name,
    )
    return package, key


def write_model_dir(
    results: Path,
    data: Prepared,
    config: FedFraudConfig,
    outcomes: Mapping[str, MethodResult],
    metrics: Mapping[str, Any],
) -> Path | None:
    """Write `results/model/` for the best federated model (and the simulated consortium's key, if any)."""
    name = next((m for m in PACKAGED_METHODS if m in outcomes and outcomes[m].weights is not None), None)
    if name is None:
        logger.info("no model/ package: no federated model was trained (engine none)")
        return None
    try:
        package, key = build_package(name, outcomes[name], data, config, metrics)
    except (KeyError, ValueError) as exc:  # e.g. no genuine row for a threshold: keep the other results
        logger.warning("no model/ package for %s: %s", name, exc)
        return None
    path = export_package(package, results / "model")
    if key is not None:  # the simulated consortium's key: needed to score with consortium features
        key_path = results / KEY_FILE
        key_path.write_text(key + "\n")
        os.chmod(key_path, 0o600)
    return path
