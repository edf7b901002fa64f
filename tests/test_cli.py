"""End-to-end: the installed `fedfraud` command on small synthetic data, as a user runs it."""

import json
import subprocess
import sys

import pandas as pd
import pytest

CONTRACT = ["transaction_id", "bank_id", "card_id", "timestamp", "score", "label"]


def fedfraud(*args, check=True):
    cmd = [sys.executable, "-c", "from simulations.cli import main; main()", *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"fedfraud {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "banks"
    fedfraud(
        "generate",
        "--banks",
        4,
        "--cards",
        600,
        "--merchants",
        200,
        "--days",
        50,
        "--seed",
        3,
        "--out",
        out,
        "--pooled",
    )
    return out


def test_generate_writes_bank_files_and_manifest(consortium):
    manifest = json.loads((consortium / "manifest.json").read_text())
    assert [b["bank_id"] for b in manifest["banks"]] == [0, 1, 2, 3]
    total = sum(len(pd.read_parquet(consortium / b["file"])) for b in manifest["banks"])
    assert total == manifest["rows"] == len(pd.read_parquet(consortium / "pooled.parquet"))


def test_simulate_writes_the_results_directory(consortium, tmp_path):
    out = tmp_path / "res"
    result = fedfraud("simulate", "--data", consortium, "--out", out, "--epochs", 1, "--rounds", 2)
    assert "central, pooled features" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["train-days"] == 7 and config["central-epochs"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"central_pooled", "central_siloed", "local"}
    assert [r["round"] for r in metrics["methods"]["federated"]["rounds"]] == [1, 2]
    assert (out / "ap_per_round.png").exists() and (out / "epsilon_per_round.png").exists()
    for name in ("central_pooled", "central_siloed", "local", "federated"):
        pred = pd.read_parquet(out / "predictions" / f"{name}.parquet")
        assert list(pred.columns) == CONTRACT
        assert pred["score"].between(0, 1).all()
        assert set(metrics["methods"][name]["banks"]) == {"0", "1", "2", "3"}
        assert {"ap", "roc_auc", "cp_at_100", "recall_at_1pct_fpr", "loss"} <= set(
            metrics["methods"][name]["global"]
        )
    sizes = {len(pd.read_parquet(p)) for p in (out / "predictions").glob("*.parquet")}
    assert len(sizes) == 1
    assert "| central, pooled features |" in (out / "report.md").read_text()
    assert (out / "pr_curves.png").stat().st_size > 0
    again = fedfraud("simulate", "--data", consortium, "--out", out, "--engine", "none", check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_pooled_file_with_column_mapping(consortium, tmp_path):
    pooled = pd.read_parquet(consortium / "pooled.parquet")
    odd = pooled.rename(columns={"timestamp": "WHEN", "card_id": "CARD", "bank_id": "BANK"})
    odd.to_csv(tmp_path / "odd.csv", index=False)
    out = tmp_path / "res"
    fedfraud(
        "simulate",
        "--data",
        tmp_path / "odd.csv",
        "--columns",
        "timestamp=WHEN,card_id=CARD,bank_id=BANK",
        "--partition",
        "column:bank_id",
        "--out",
        out,
        "--epochs",
        1,
        "--model",
        "logreg",
        "--engine",
        "none",
    )
    pred = pd.read_parquet(out / "predictions" / "local.parquet")
    assert sorted(pred["bank_id"].unique()) == [0, 1, 2, 3]


def test_bad_input_is_refused_and_nothing_is_written(consortium, tmp_path):
    pooled = pd.read_parquet(consortium / "pooled.parquet")
    pooled.loc[pooled.index[5], "amount"] = -3.0
    pooled.to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "res"
    result = fedfraud(
        "simulate", "--data", tmp_path / "bad.csv", "--out", out, "--engine", "none", check=False
    )
    assert result.returncode == 2
    assert "amount" in result.stderr and "bad.csv" in result.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".res*"))


def test_bad_config_value_names_the_flag_key(consortium, tmp_path):
    result = fedfraud(
        "simulate", "--data", consortium, "--out", tmp_path / "r", "--train-days", 0, check=False
    )
    assert result.returncode == 2 and "'train-days'" in result.stderr
