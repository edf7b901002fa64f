"""Tests of the synthetic consortium generator (simulations/generate.py, simulations/scenarios.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulations.generate import GeneratorConfig, bank_shares, generate_consortium, write_consortium
from simulations.scenarios import SCENARIOS

SMALL = GeneratorConfig(banks=5, cards=3_000, merchants=400, days=30, seed=1)
DTYPES = {
    "transaction_id": "int64",
    "timestamp": "datetime64[ns]",
    "card_id": "int64",
    "merchant_id": "int64",
    "amount": "float64",
    "is_fraud": "int8",
    "bank_id": "int64",
}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate_consortium(SMALL)


def test_same_seed_same_frame_and_other_seed_differs(frame):
    pd.testing.assert_frame_equal(frame, generate_consortium(SMALL))
    other = generate_consortium(GeneratorConfig(banks=5, cards=3_000, merchants=400, days=30, seed=2))
    assert len(other) != len(frame) or not other["amount"].equals(frame["amount"])


def test_schema_and_dtypes(frame):
    assert list(frame.columns) == [*DTYPES, "scenario"]
    for column, dtype in DTYPES.items():
        assert str(frame[column].dtype) == dtype, column
    assert pd.api.types.is_string_dtype(frame["scenario"])
    assert frame["timestamp"].dt.tz is None
    assert frame["timestamp"].is_monotonic_increasing
    assert frame["transaction_id"].is_unique
    assert frame["timestamp"].min() >= pd.Timestamp("2024-01-01")
    assert frame["timestamp"].max() < pd.Timestamp("2024-01-01") + pd.Timedelta(days=SMALL.days)
    assert set(frame["bank_id"].unique()) == set(range(SMALL.banks))
    assert frame["merchant_id"].between(0, SMALL.merchants - 1).all()


def test_amounts_positive_in_cents(frame):
    amount = frame["amount"].to_numpy()
    assert (amount > 0).all()
    np.testing.assert_allclose(amount, np.round(amount, 2), atol=1e-9)


def test_size_tracks_cards_days_and_rate(frame):
    expected = SMALL.cards * SMALL.days * SMALL.tx_per_day
    assert 0.85 * expected < len(frame) < 1.15 * expected


def test_each_card_in_one_bank_and_banks_unequal(frame):
    assert (frame.groupby("card_id")["bank_id"].nunique() == 1).all()
    cards = frame.groupby("bank_id")["card_id"].nunique()
    assert cards.max() > 2 * cards.min()
    assert cards.idxmax() == 0


def test_bank_shares_zipf_with_floor():
    share = bank_shares(10, 1.1)
    assert share.sum() == pytest.approx(1.0)
    assert (np.diff(share) <= 1e-12).all()
    floored = bank_shares(40, 3.0)
    assert floored.min() == pytest.approx(0.01)
    assert floored.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="banks"):
        bank_shares(101, 1.1)


def test_merchants_shared_across_banks(frame):
    banks_per_merchant = frame.groupby("merchant_id")["bank_id"].nunique()
    assert (banks_per_merchant >= 2).mean() > 0.8


def test_merchant_popularity_heavy_tailed(frame):
    volume = frame["merchant_id"].value_counts()
    top = volume.iloc[: len(volume) // 10].sum() / volume.sum()
    assert top > 0.3  # the busiest 10% of merchants carry a large share of the volume


def test_daily_and_weekly_cycles(frame):
    hour = frame["timestamp"].dt.hour
    assert (hour < 5).mean() < 0.05
    assert hour.between(10, 19).mean() > 0.5
    per_day = frame.groupby(frame["timestamp"].dt.normalize()).size()
    sundays = per_day[per_day.index.day_of_week == 6].mean()
    fridays = per_day[per_day.index.day_of_week == 4].mean()
    assert sundays < 0.85 * fridays


def test_scenarios_labelled(frame):
    assert set(frame["scenario"].unique()) == set(SCENARIOS)
    fraud = frame["scenario"] != "none"
    assert (frame.loc[fraud, "is_fraud"] == 1).all()
    assert (frame.loc[~fraud, "is_fraud"] == 0).all()
    assert 0.002 <= frame["is_fraud"].mean() <= 0.01


def test_compromised_merchants_are_the_largest_share(frame):
    share = frame.loc[frame["is_fraud"] == 1, "scenario"].value_counts(normalize=True)
    assert share.idxmax() == "compromised_merchant"
    assert 0.35 <= share["compromised_merchant"] <= 0.7


def test_compromised_merchant_frauds_come_from_several_banks(frame):
    cm = frame[frame["scenario"] == "compromised_merchant"]
    per_merchant = cm.groupby("merchant_id")["bank_id"].nunique()
    assert per_merchant.median() >= 2
    assert per_merchant.max() >= 3


def test_compromised_merchants_are_small_shops_each_bank_sees_a_handful(frame):
    months = SMALL.days / 30
    compromised = frame.loc[frame["scenario"] == "compromised_merchant", "merchant_id"].unique()
    rows = frame[frame["merchant_id"].isin(compromised)]
    monthly = rows.groupby("merchant_id").size() / months
    assert monthly.between(5, 100).mean() > 0.9
    per_bank = rows.groupby(["merchant_id", "bank_id"]).size().unstack(fill_value=0) / months
    assert per_bank[SMALL.banks - 1].median() <= 5  # the smallest bank: a handful a month
    assert per_bank.sum(axis=1).median() > 3 * per_bank[SMALL.banks - 1].median()


def test_compromised_merchant_frauds_look_ordinary(frame):
    cm = frame[frame["scenario"] == "compromised_merchant"]
    legit = frame[(frame["scenario"] == "none") & frame["merchant_id"].isin(cm["merchant_id"])]
    ratio = cm["amount"].median() / legit["amount"].median()
    assert 0.7 < ratio < 1.4
    assert abs(cm["timestamp"].dt.hour.mean() - legit["timestamp"].dt.hour.mean()) < 1.5


def test_other_scenarios_have_their_signatures(frame):
    testing = frame[frame["scenario"] == "card_testing"]
    assert testing["amount"].between(0.5, 5.0).all()
    assert (testing.groupby("card_id").size() >= 8).all()
    assert (frame.loc[frame["scenario"] == "high_amount", "amount"] >= 1500).all()
    spree = frame[frame["scenario"] == "compromised_card"]
    assert spree["amount"].median() > 2 * frame.loc[frame["scenario"] == "none", "amount"].median()
    assert (spree["timestamp"].dt.hour < 6).mean() > 0.3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("banks", 0),
        ("banks", 101),
        ("cards", 3),
        ("merchants", 5),
        ("days", 0),
        ("seed", -1),
        ("zipf_exponent", -1.0),
        ("tx_per_day", 0.0),
        ("merchant_fraud_rate", 0.9),
        ("start", "not-a-date"),
        ("compromise_max_days", 5),
        ("compromise_max_share", 0.1),
        ("banks", 2.5),
        ("card_testing_rate", "x"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GeneratorConfig(**{"banks": 5, **{field: value}})


def test_disabled_scenarios_give_no_fraud():
    config = GeneratorConfig(
        banks=2,
        cards=200,
        merchants=50,
        days=5,
        merchant_fraud_rate=0.0,
        card_compromise_rate=0.0,
        card_testing_rate=0.0,
        high_amount_rate=0.0,
    )
    assert generate_consortium(config)["is_fraud"].sum() == 0


def test_write_consortium_files_and_manifest(frame, tmp_path):
    out = tmp_path / "consortium"
    manifest_path = write_consortium(frame, out, pooled=True, config=SMALL)
    assert manifest_path == out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["generator"] == "fedfraud"
    assert manifest["config"]["cards"] == SMALL.cards
    assert manifest["rows"] == len(frame)
    assert manifest["fraud_rate"] == pytest.approx(frame["is_fraud"].mean())
    assert manifest["pooled"] == "pooled.parquet"
    assert [b["file"] for b in manifest["banks"]] == [f"bank_{b:02d}.parquet" for b in range(SMALL.banks)]
    for entry in manifest["banks"]:
        bank = pd.read_parquet(out / entry["file"])
        assert len(bank) == entry["rows"]
        assert (bank["bank_id"] == entry["bank_id"]).all()
        assert bank["card_id"].nunique() == entry["cards"]
        assert bank["is_fraud"].sum() == entry["frauds"]
    assert sum(b["rows"] for b in manifest["banks"]) == len(frame)
    assert len(pd.read_parquet(out / "pooled.parquet")) == len(frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consortium"]


def test_write_consortium_csv_into_empty_dir(frame, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    manifest = json.loads(write_consortium(frame.head(500), out, fmt="csv").read_text())
    assert manifest["pooled"] is None and manifest["config"] is None
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([b["file"] for b in manifest["banks"]] + ["manifest.json"])
    assert all(name.endswith(".csv") for name in files if name != "manifest.json")
    back = pd.read_csv(out / manifest["banks"][0]["file"])
    assert len(back) == manifest["banks"][0]["rows"]


def test_write_consortium_refuses_non_empty_dir_and_bad_format(frame, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_consortium(frame, tmp_path)
    with pytest.raises(ValueError, match="fmt"):
        write_consortium(frame, tmp_path / "new", fmt="xlsx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_write_consortium_leaves_nothing_on_failure(frame, tmp_path, monkeypatch):
    calls = []

    def failing(self, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        Path(path).write_bytes(b"partial")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing)
    with pytest.raises(OSError, match="disk full"):
        write_consortium(frame, tmp_path / "out", config=SMALL)
    assert list(tmp_path.iterdir()) == []
