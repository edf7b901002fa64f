"""Feature tables: clients.data.load_feature_table reads, maps and validates ready-made features."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.data import DataError, load_feature_table
from tests._helpers_data import times, write

FEATURES = "Time,V1,V2,Amount,Class,note\n0,0.5,1.5,10,0,a\n20,1.5,-2,3,1,b\n10,2.5,0,7,0,c\n"


def test_feature_table_auto(tmp_path: Path) -> None:
    df, names = load_feature_table(write(tmp_path, FEATURES), features="auto", label="Class", time="Time")
    assert names == ["V1", "V2", "Amount"]
    assert list(df.columns) == ["transaction_id", "timestamp", "is_fraud", *names]
    assert [str(d) for d in df.dtypes] == ["int64", "float64", "int8", "float32", "float32", "float32"]
    assert df["transaction_id"].tolist() == [0, 2, 1] and df["timestamp"].tolist() == [0.0, 10.0, 20.0]
    assert df["is_fraud"].tolist() == [0, 0, 1] and df["V2"].tolist() == [1.5, 0.0, -2.0]


def test_feature_table_explicit_list_mapping_and_no_label(tmp_path: Path) -> None:
    text = "id,bank_id,when,V1,V2\nx,b1,2024-01-02,1,2\ny,b2,2024-01-01,3,4\n"
    mapping = {"transaction_id": "id"}
    df, names = load_feature_table(
        write(tmp_path, text), features=["V2", "V1"], label=None, time="when", columns=mapping
    )
    assert names == ["V2", "V1"]
    assert list(df.columns) == ["transaction_id", "timestamp", "bank_id", "V2", "V1"]
    assert df["transaction_id"].tolist() == ["y", "x"] and df["bank_id"].tolist() == ["b2", "b1"]
    assert df["timestamp"].tolist() == times("2024-01-01", "2024-01-02")


def test_feature_table_without_time_uses_row_order(tmp_path: Path) -> None:
    df, names = load_feature_table(write(tmp_path, FEATURES), features="V1, V2", label="Class")
    assert names == ["V1", "V2"]
    assert df["timestamp"].tolist() == [0.0, 1.0, 2.0] and df["transaction_id"].tolist() == [0, 1, 2]


def test_feature_table_mapping_and_time_zones(tmp_path: Path) -> None:
    path = write(tmp_path, "BANK,when,V1\nb1,2024-01-01T10:00:00+01:00,1\nb2,2024-01-01T08:30:00Z,2\n")
    df, _ = load_feature_table(
        path, features="auto", label=None, columns={"bank_id": "BANK", "timestamp": "when"}
    )
    assert df["bank_id"].tolist() == ["b2", "b1"]
    assert df["timestamp"].tolist() == times("2024-01-01 08:30", "2024-01-01 09:00")
    with pytest.raises(DataError, match="'card_id'"):
        load_feature_table(path, features="auto", label=None, columns={"card_id": "BANK"})


@pytest.mark.parametrize(
    ("features", "label", "text", "fragments"),
    [
        (["V1", "V9"], "Class", FEATURES, ["'V9'", "'V1'", "'Amount'"]),
        (["V1"], "Label", FEATURES, ["'Label'", "'Class'"]),
        (["V1", "note"], "Class", FEATURES, ["column 'note'", "non-numeric", "row 1: 'a'"]),
        (["V1"], "Class", "V1,Class\n1,0\n,1\n", ["column 'V1'", "missing or infinite", "row 2: nan"]),
        (["V1"], "Class", "V1,Class\n1e39,0\n2,1\n", ["column 'V1'", "float32", "row 1: 1e+39"]),
        (["V1"], "Class", "V1,Class\n1,0\n2,3\n", ["column 'Class'", "not 0 or 1", "row 2: 3"]),
        (["V1", "Class"], "Class", FEATURES, ["'Class'", "label"]),
        ("auto", "Class", "Class,note\n0,a\n", ["no numeric feature"]),
    ],
)
def test_feature_table_errors(
    tmp_path: Path, features: list[str] | str, label: str, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DataError) as info:
        load_feature_table(path, features=features, label=label)
    for fragment in (path.name, *fragments):
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
