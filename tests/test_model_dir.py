"""The harness writes `model/`: a bank scoring its own file with it reproduces the run's predictions."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from clients.score_file import score_file
from models.config import load_config
from models.package import load_package
from simulations.baselines import BASELINES
from simulations.dataset import DataSource
from simulations.federated import run_federated
from simulations.generate import GeneratorConfig, generate_consortium, write_consortium
from simulations.harness import simulate


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("model-dir") / "banks"
    config = GeneratorConfig(banks=3, cards=450, merchants=150, days=45, seed=11)
    write_consortium(generate_consortium(config), out, config=config)
    return out


def test_no_federated_model_no_model_dir(consortium, tmp_path, caplog):
    config = load_config({"central-epochs": 1})
    with caplog.at_level(logging.INFO, logger="simulations.export"):
        simulate(DataSource(path=consortium), config, tmp_path / "res", methods={"local": BASELINES["local"]})
    assert not (tmp_path / "res" / "model").exists()
    assert "no federated model was trained" in caplog.text


@pytest.mark.slow
def test_federated_entity_package_reproduces_the_runs_predictions(consortium, tmp_path):
    config = load_config(
        {
            "rounds": 2,
            "dp": False,
            "entity-features": "merchant_id",
            "entity-buckets": 1024,
            "central-epochs": 1,
        }
    )
    out = tmp_path / "res"
    simulate(DataSource(path=consortium), config, out, methods={"federated_entity": run_federated})
    package = load_package(out / "model")
    assert package.method == "federated_entity" and package.spec.version == "local-v1+consortium-v1"
    assert (
        package.threshold.source.startswith("training window") and 0 < package.threshold.achieved_fpr <= 0.01
    )
    assert json.loads((out / "model" / "training_config.json").read_text())["rounds"] == 2
    key = (out / "consortium-key.hex").read_text().strip()
    assert key not in (out / "model" / "entity_release.json").read_text()
    expected = pd.read_parquet(out / "predictions" / "federated_entity.parquet")
    manifest = json.loads((consortium / "manifest.json").read_text())
    for bank in manifest["banks"][:2]:
        scored = tmp_path / f"scored_{bank['bank_id']}.parquet"
        score_file(package, consortium / bank["file"], scored, entity_key=key)
        mine = expected[expected["bank_id"] == bank["bank_id"]]
        scores = pd.read_parquet(scored).set_index("transaction_id").loc[mine["transaction_id"], "score"]
        assert np.abs(scores.to_numpy() - mine["score"].to_numpy()).max() < 1e-5
