"""Shared set-up of the scoring tests: a bank file, a model trained on it, the training side's predictions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.data import load_transactions
from clients.entity import EntityTableSpec, consortium_features, local_table
from clients.features import compute_local_features
from models.config import load_config
from models.feature_names import CONSORTIUM_FEATURES, CONSORTIUM_VERSION, FEATURE_VERSION, LOCAL_FEATURES
from models.package import EntityTable, ModelPackage, key_fingerprint
from models.spec import FeatureSpec, FeatureStats
from models.split import time_split
from models.threshold import threshold_for_fpr
from models.training import predict_scores, train_model
from simulations.generate import GeneratorConfig, generate_consortium

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
COLUMNS = ["transaction_id", "timestamp", "card_id", "merchant_id", "amount", "is_fraud"]


@dataclass(frozen=True)
class Trained:
    """A bank file, a package of a model trained on it, and the training side's test-window scores."""

    path: Path
    frame: pd.DataFrame
    package: ModelPackage
    test: np.ndarray
    x: np.ndarray
    expected: np.ndarray


def bank_file(directory: Path, *, seed: int = 1) -> Path:
    """One synthetic bank's transactions file (every bank of a small consortium, pooled)."""
    config = GeneratorConfig(banks=2, cards=300, merchants=80, days=45, seed=seed)
    frame = generate_consortium(config)
    path = directory / "bank.parquet"
    frame[COLUMNS].to_parquet(path, index=False)
    return path


def entity_table(frame: pd.DataFrame) -> tuple[np.ndarray, EntityTableSpec]:
    """A noised consortium table over the file's days (as a release would publish it)."""
    first = frame["timestamp"].min().normalize()
    days = int((frame["timestamp"].max().normalize() - first).days) + 1
    spec = EntityTableSpec(start=str(first.date()), days=days, buckets=256, delay_days=7)
    noise = np.random.default_rng(0).normal(0.0, 0.5, (2, days, 256))
    return np.clip(local_table(frame, spec, key=KEY) + noise, 0.0, None), spec


def train_package(path: Path, *, entity: bool = False, seed: int = 0) -> Trained:
    """Train a small MLP on the file's training window as the training side does; package it."""
    config = load_config({"central-epochs": 1})
    frame = load_transactions(path)
    x = compute_local_features(frame, delay_days=7)[list(LOCAL_FEATURES)].to_numpy(np.float32)
    names, version, table = LOCAL_FEATURES, FEATURE_VERSION, None
    if entity:
        table, table_spec = entity_table(frame)
        extra = consortium_features(frame, table, table_spec, key=KEY).to_numpy(np.float32)
        x = np.hstack([x, extra])
        names, version = names + CONSORTIUM_FEATURES, f"{FEATURE_VERSION}+{CONSORTIUM_VERSION}"
    split = time_split(frame["timestamp"], config.split)
    y = frame["is_fraud"].to_numpy(np.float32)
    spec = FeatureSpec.from_stats(names, FeatureStats.of(x[split.train]), version=version, delay_days=7)
    model = train_model(
        spec.transform(x[split.train]),
        y[split.train],
        kind="mlp",
        hidden_sizes=(16, 16),
        epochs=2,
        batch_size=256,
        lr=3e-3,
        seed=seed,
    )
    train_scores = predict_scores(model, spec.transform(x[split.train]))
    release = None
    if table is not None:
        release = {
            "column": "merchant_id",
            "buckets": table_spec.buckets,
            "start": table_spec.start,
            "days": table_spec.days,
            "delay": 7,
            "key_fingerprint": key_fingerprint(KEY),
        }
    package = ModelPackage(
        model_kind="mlp",
        hidden_sizes=(16, 16),
        weights=[t.detach().numpy().copy() for t in model.state_dict().values()],
        spec=spec,
        threshold=threshold_for_fpr(train_scores, y[split.train], source="training window"),
        config=config.to_dict(),
        metrics={"note": "test fixture"},
        entity=EntityTable(table=table, release=release) if table is not None else None,
        method="federated_entity" if entity else "federated",
    )
    expected = predict_scores(model, spec.transform(x[split.test]))
    return Trained(path, frame, package, split.test, x, expected)
