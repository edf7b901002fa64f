"""Scoring at the bank: a file through a loaded package reproduces training's predictions; online = batch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from clients.data import DataError
from clients.online import Transaction
from clients.score_file import score_file
from clients.scoring import OnlineScorer, Scorer
from models.nets import build_model, get_weights
from models.package import ModelPackage, PackageError, export_package, load_package
from models.spec import FeatureSpec, FeatureStats
from models.threshold import threshold_for_fpr
from models.training import predict_scores
from tests._helpers_scoring import KEY, bank_file, train_package


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_package(bank_file(tmp_path_factory.mktemp("bank")))


@pytest.fixture(scope="module")
def trained_entity(tmp_path_factory):
    return train_package(bank_file(tmp_path_factory.mktemp("bank-e"), seed=2), entity=True)


@pytest.fixture(scope="module")
def package_dir(trained, tmp_path_factory):
    return export_package(trained.package, tmp_path_factory.mktemp("pkg") / "model")


def _test_rows(trained, out):
    scored = pd.read_parquet(out) if out.suffix == ".parquet" else pd.read_csv(out)
    ids = trained.frame["transaction_id"].to_numpy()[trained.test]
    return scored.set_index("transaction_id").loc[ids]


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_round_trip_reproduces_the_training_side_test_predictions(trained, package_dir, tmp_path, engine):
    out = tmp_path / "scores.parquet"
    summary = score_file(load_package(package_dir), trained.path, out, engine=engine)
    scored = pd.read_parquet(out)
    assert list(scored.columns) == ["transaction_id", "score", "decision"]
    assert summary.rows_scored == len(scored) == len(trained.frame)
    rows = _test_rows(trained, out)
    assert np.abs(rows["score"].to_numpy() - trained.expected).max() < (1e-5 if engine == "onnx" else 1e-6)
    threshold = trained.package.threshold.value
    np.testing.assert_array_equal(rows["decision"].to_numpy(), (rows["score"] >= threshold).astype(int))
    assert summary.flagged == int(scored["decision"].sum()) > 0


def test_since_keeps_history_for_the_windows_but_writes_only_later_rows(trained, package_dir, tmp_path):
    first_test_day = trained.frame.loc[trained.test, "timestamp"].min().normalize()
    out = tmp_path / "scores.csv"
    summary = score_file(load_package(package_dir), trained.path, out, since=str(first_test_day.date()))
    rows = pd.read_csv(out)
    assert summary.rows_read == len(trained.frame) and summary.rows_scored == len(rows)
    assert set(rows["transaction_id"]) == set(trained.frame.loc[trained.test, "transaction_id"])
    scores = rows.set_index("transaction_id").loc[trained.frame.loc[trained.test, "transaction_id"], "score"]
    assert np.abs(scores.to_numpy() - trained.expected).max() < 1e-5


def test_consortium_package_needs_the_right_key(trained_entity, tmp_path, monkeypatch):
    package = load_package(export_package(trained_entity.package, tmp_path / "model"))
    out = tmp_path / "scores.parquet"
    monkeypatch.delenv("FEDFRAUD_ENTITY_KEY", raising=False)
    with pytest.raises(PackageError, match="consortium key"):
        score_file(package, trained_entity.path, out)
    with pytest.raises(PackageError, match="does not match"):
        score_file(package, trained_entity.path, out, entity_key=b"another key")
    with pytest.raises(PackageError, match="hexadecimal"):
        score_file(package, trained_entity.path, out, entity_key="not hex")
    assert not out.exists()
    monkeypatch.setenv("FEDFRAUD_ENTITY_KEY", KEY.hex())
    score_file(package, trained_entity.path, out)
    assert np.abs(_test_rows(trained_entity, out)["score"].to_numpy() - trained_entity.expected).max() < 1e-5


@pytest.mark.parametrize("entity", [False, True])
def test_online_scores_equal_batch_scores_on_the_test_window(trained, trained_entity, entity):
    case = trained_entity if entity else trained
    scorer = OnlineScorer(case.package, entity_key=KEY if entity else None)
    first = int(np.argmax(case.test))
    assert scorer.warm_up(case.frame.iloc[:first]) == first
    online = []
    for row in case.frame.iloc[first:].itertuples(index=False):
        result = scorer.score(
            Transaction(row.transaction_id, row.timestamp, row.card_id, row.merchant_id, row.amount)
        )
        online.append(result.score)
        assert result.decision == (result.score >= case.package.threshold.value)
    # labels of test-window rows are never old enough to count within the test window, so no label feed
    batch = Scorer(case.package).scores(case.x[first:])
    assert np.abs(np.asarray(online) - batch).max() < 1e-6
    assert np.abs(np.asarray(online)[case.test[first:]] - case.expected).max() < 1e-5


def test_online_explanation_and_mapping_input(trained):
    scorer = OnlineScorer(trained.package)
    scorer.warm_up(trained.frame.iloc[:5000])
    row = trained.frame.iloc[5000].to_dict()
    result = scorer.score(row, explain=3, observe=False)
    assert len(result.explanation) == 3
    assert all(set(c.features) <= set(trained.package.spec.names) for c in result.explanation)
    assert scorer.score(row).score == result.score  # observe=False left the state unchanged


def test_explain_column_in_plain_words(trained, package_dir, tmp_path):
    small = tmp_path / "small.csv"
    trained.frame.iloc[-300:].to_csv(small, index=False)
    out = tmp_path / "explained.csv"
    score_file(load_package(package_dir), small, out, explain=2)
    text = pd.read_csv(out)["explanation"]
    assert text.str.count(";").eq(1).all()  # two contributions per row
    assert text.str.contains(r"\([+-]\d+\.\d\d\)").all()


def test_bad_input_is_refused_like_training_and_nothing_is_written(trained, package_dir, tmp_path):
    bad = trained.frame.copy()
    bad.loc[bad.index[7], "amount"] = -5.0
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    out = tmp_path / "scores.csv"
    with pytest.raises(DataError, match=r"bad\.csv.*amount"):
        score_file(load_package(package_dir), path, out)
    with pytest.raises(DataError, match="unsupported output type"):
        score_file(load_package(package_dir), trained.path, tmp_path / "scores.xlsx")
    assert not out.exists() and not list(tmp_path.glob(".scores*"))


def fedfraud(*args):
    cmd = [sys.executable, "-c", "from simulations.cli import main; main()", *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    result.stderr = " ".join(result.stderr.split())  # rich wraps long lines
    return result


def test_score_command(trained, package_dir, tmp_path):
    out = tmp_path / "scores.csv"
    ok = fedfraud("score", "--model", package_dir, "--data", trained.path, "--out", out, "--threads", 1)
    assert ok.returncode == 0, ok.stderr
    assert "flagged" in ok.stderr and list(pd.read_csv(out).columns) == [
        "transaction_id",
        "score",
        "decision",
    ]
    renamed = trained.frame.rename(columns={"amount": "AMT"})
    renamed.to_csv(tmp_path / "renamed.csv", index=False)
    missing = fedfraud(
        "score", "--model", package_dir, "--data", tmp_path / "renamed.csv", "--out", tmp_path / "x.csv"
    )
    assert missing.returncode == 2 and "missing required column 'amount'" in missing.stderr
    assert "--columns amount=" in missing.stderr and not (tmp_path / "x.csv").exists()
    broken = fedfraud("score", "--model", tmp_path, "--data", trained.path, "--out", tmp_path / "y.csv")
    assert broken.returncode == 2 and "not a model package" in broken.stderr


def test_feature_table_package_scores_its_named_columns(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    spec = FeatureSpec.from_stats(["V1", "V2", "V3"], FeatureStats.of(x), version="table-v1", delay_days=0)
    model = build_model("logreg", 3, seed=1)
    labels = (x[:, 0] > 1).astype(int)
    threshold = threshold_for_fpr(predict_scores(model, spec.transform(x)), labels, source="rows")
    package = ModelPackage("logreg", (), get_weights(model), spec, threshold, method="federated")
    loaded = load_package(export_package(package, tmp_path / "model"))
    frame = pd.DataFrame(x, columns=["V2", "V1", "V3"][::-1]).assign(TXID=np.arange(400) + 7)
    frame.to_csv(tmp_path / "table.csv", index=False)
    out = tmp_path / "scores.csv"
    score_file(loaded, tmp_path / "table.csv", out, columns={"transaction_id": "TXID"})
    scored = pd.read_csv(out)
    assert scored["transaction_id"].tolist() == list(range(7, 407))
    expected = predict_scores(model, spec.transform(frame[["V1", "V2", "V3"]].to_numpy()))
    assert np.abs(scored["score"].to_numpy() - expected).max() < 1e-6
