"""The bank data contract: clients.data reads, maps and validates transactions files."""

from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients import validation
from clients.data import (
    CANONICAL,
    DataError,
    load_feature_table,
    load_transactions,
    parse_columns,
    read_table,
    warn_no_training_frauds,
)
from tests._helpers_data import times, write

BASE: dict[str, list[str]] = {
    "transaction_id": ["t1", "t2", "t3"],
    "timestamp": ["2024-01-02 10:00:00", "2024-01-01 09:00:00", "2024-01-03 11:30:00"],
    "card_id": ["c1", "c2", "c1"],
    "merchant_id": ["m1", "m1", "m2"],
    "amount": ["10.5", "3.0", "99.99"],
    "is_fraud": ["0", "1", "0"],
}


def table_text(table: dict[str, list[str]], sep: str = ",") -> str:
    """CSV text for a table of string cells, written as is (no quoting)."""
    rows = zip(*table.values(), strict=True)
    return "\n".join([sep.join(table), *(sep.join(r) for r in rows)]) + "\n"


def csv_text(drop: tuple[str, ...] = (), sep: str = ",", **columns: list[str]) -> str:
    """A small transactions CSV: BASE with some columns replaced, added or dropped."""
    return table_text({k: v for k, v in {**BASE, **columns}.items() if k not in drop}, sep)


def raises(path: Path, *fragments: str, **kwargs: object) -> DataError:
    """Assert load_transactions fails and its message names the file and every fragment."""
    with pytest.raises(DataError) as info:
        load_transactions(path, **kwargs)  # type: ignore[arg-type]
    for fragment in (path.name, *fragments):
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
    return info.value


# ---------- good paths ----------


def test_csv_with_mapping_into_canonical_columns(tmp_path: Path) -> None:
    text = (
        "ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_FRAUD,channel\n7,2024-01-02,100,5,10.5,0,web\n"
    )
    spec = "transaction_id=ID,timestamp=TX_DATETIME,card_id=CUSTOMER_ID,merchant_id=TERMINAL_ID"
    mapping = parse_columns(spec + ",amount=TX_AMOUNT,is_fraud=TX_FRAUD")
    df = load_transactions(write(tmp_path, text + "3,2024-01-01 09:00,101,5,3,1,pos\n"), columns=mapping)
    assert isinstance(df.index, pd.RangeIndex)
    dtypes = ["int64", "datetime64[ns]", "int64", "int64", "float64", "int8", "str"]
    assert [str(d) for d in df.dtypes] == dtypes  # ids keep their type
    assert df.to_dict("list") == {  # sorted by time
        "transaction_id": [3, 7],
        "timestamp": times("2024-01-01 09:00", "2024-01-02"),
        "card_id": [101, 100],
        "merchant_id": [5, 5],
        "amount": [3.0, 10.5],
        "is_fraud": [1, 0],
        "channel": ["pos", "web"],
    }


def test_parquet_keeps_bank_id_and_extras_and_converts_tz_to_utc(tmp_path: Path) -> None:
    local = pd.DatetimeIndex(times("2024-03-01 12:00", "2024-03-01 09:00", "2024-03-02")).tz_localize("CET")
    frame = pd.DataFrame({**BASE, "timestamp": local, "bank_id": ["a", "a", "b"], "mcc": [5411, 5812, 5411]})
    frame.to_parquet(tmp_path / "bank.pq")
    df = load_transactions(tmp_path / "bank.pq")
    assert list(df.columns) == [*CANONICAL, "bank_id", "mcc"]
    assert df["timestamp"].dtype == "datetime64[ns]"
    assert df["timestamp"].tolist() == times("2024-03-01 08:00", "2024-03-01 11:00", "2024-03-01 23:00")
    assert df["transaction_id"].tolist() == ["t2", "t1", "t3"]
    assert df["bank_id"].tolist() == ["a", "a", "b"] and df["mcc"].tolist() == [5812, 5411, 5411]


@pytest.mark.parametrize(
    ("stamps", "expected"),
    [  # offsets, even across DST, are converted to UTC; formats may vary from row to row
        (
            ["2024-03-30T10:00:00+01:00", "2024-04-01T10:00+02:00", "2024-04-02 10:00:00Z"],
            ["2024-03-30 09:00", "2024-04-01 08:00", "2024-04-02 10:00"],
        ),
        (
            ["2024-01-02 10:00:00", "2024-01-01", "Jan 3 2024 11:30"],
            ["2024-01-01", "2024-01-02 10:00", "2024-01-03 11:30"],
        ),
    ],
)
def test_timestamp_strings(tmp_path: Path, stamps: list[str], expected: list[str]) -> None:
    df = load_transactions(write(tmp_path, csv_text(timestamp=stamps)))
    assert df["timestamp"].tolist() == times(*expected)


def test_utf8_bom_gzip_and_read_table(tmp_path: Path) -> None:
    df = load_transactions(write(tmp_path, "\ufeff" + csv_text()))
    assert list(df.columns) == list(CANONICAL)
    gz = write(tmp_path, gzip.compress(("\ufeff" + csv_text()).encode()), "bank.csv.gz")
    pd.testing.assert_frame_equal(load_transactions(gz), df)
    assert read_table(write(tmp_path, "a,b\n1,x\n", "t.csv")).to_dict("list") == {"a": [1], "b": ["x"]}


def test_scoring_file_without_labels_keeps_order_of_ties(tmp_path: Path) -> None:
    path = write(tmp_path, csv_text(drop=("is_fraud",), timestamp=["2024-01-01"] * 3))
    raises(path, "missing required column 'is_fraud'")
    df = load_transactions(path, require_label=False)
    assert "is_fraud" not in df.columns and df["transaction_id"].tolist() == ["t1", "t2", "t3"]


def test_mapping_replaces_the_files_own_column_and_readers_write_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, csv_text(amount_eur=["1", "2", "3"]))
    df = load_transactions(path, columns={"amount": "amount_eur"})
    assert df["amount"].tolist() == [2.0, 1.0, 3.0] and "amount_eur" not in df.columns
    load_feature_table(path, features=["amount"], label="is_fraud")
    assert [p.name for p in tmp_path.iterdir()] == ["bank.csv"]


# ---------- unreadable files, missing columns ----------

TX = {"columns": {"timestamp": "TX_DATETIME"}}
TWICE = {"columns": {"card_id": "card_id", "merchant_id": "card_id"}}
FILE_ERRORS = [
    ("nope.csv", None, {}, ["no such file"]),
    ("bank.parquet", np.random.default_rng(0).bytes(200), {}, ["cannot read as Parquet"]),
    ("bank.parquet", b"", {}, ["empty"]),
    ("bank.csv", b"", {}, ["empty"]),
    ("bank.csv", b"transaction_id,timestamp\n", {}, ["no rows", "'timestamp'"]),
    ("bank.csv", b"a,b\n1,2\n1,2,3\n", {}, ["cannot read as CSV", "line 3"]),
    ("bank.csv.gz", b"not gzip at all", {}, ["cannot read as CSV"]),
    ("bank.xlsx", b"whatever", {}, ["unsupported file type", ".parquet"]),
    (
        "bank.csv",
        csv_text(sep=";", amount=["1,5", "3", "1"]),
        {},
        ["semicolon", "comma-separated", "Parquet"],
    ),
    ("bank.csv", csv_text(sep="\t"), {}, ["tab", "comma-separated"]),
    ("bank.csv", csv_text(sep="|"), {}, ["pipe", "comma-separated"]),
    ("bank.csv", csv_text().encode("utf-16"), {}, ["not valid UTF-8", "byte 0", "iconv -f utf-16"]),
    ("bank.csv", csv_text(drop=("timestamp",)), {}, ["'timestamp'", "'card_id'", "--columns timestamp="]),
    ("bank.csv", csv_text(), TX, ["'TX_DATETIME'", "'timestamp'", "'amount'"]),
    ("bank.csv", csv_text(), TWICE, ["'card_id'", "more than one"]),
]


@pytest.mark.parametrize(("name", "content", "kwargs", "fragments"), FILE_ERRORS)
def test_file_errors(
    tmp_path: Path, name: str, content: str | bytes | None, kwargs: dict[str, object], fragments: list[str]
) -> None:
    path = tmp_path / name if content is None else write(tmp_path, content, name)
    assert raises(path, *fragments, **kwargs).path.endswith(name)


def test_truncated_and_empty_parquet(tmp_path: Path) -> None:
    pd.DataFrame(BASE).to_parquet(tmp_path / "full.parquet")
    data = (tmp_path / "full.parquet").read_bytes()
    raises(write(tmp_path, data[: len(data) // 2], "cut.parquet"), "cannot read as Parquet")
    pd.DataFrame({c: pd.Series([], dtype="str") for c in BASE}).to_parquet(tmp_path / "none.parquet")
    raises(tmp_path / "none.parquet", "no rows")


def test_wrong_encoding_names_the_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = csv_text(merchant_id=["m1", "Caf\u00e9", "m2"]).encode("latin-1")
    raises(write(tmp_path, data), f"UTF-8: invalid continuation byte at byte {data.index(233)}, line 3")
    monkeypatch.setattr(validation, "_CHUNK", 7)  # a character split between two reads is not an error
    good = "ab\nc\u00e9\u20acx\n".encode() * 3
    raises(write(tmp_path, good + b"zz\n\xe9q\n"), f"byte {len(good) + 3}, line 8", "re-encode")
    raises(write(tmp_path, good + "\u20ac".encode()[:2]), f"end of data at byte {len(good)}, line 7")


# ---------- bad values ----------

BAD_VALUES = [
    ("transaction_id", ["t1", "t2", "t1"], ["duplicate", "row 1: 't1'", "row 3: 't1'"]),
    ("card_id", ["c1", "", "c3"], ["missing or blank", "row 2: nan"]),
    ("merchant_id", ["m1", "m2", "  "], ["missing or blank", "row 3: '  '"]),
    ("timestamp", ["2024-01-01", "not a date", "2024-01-03"], ["unparsable", "row 2: 'not a date'"]),
    ("timestamp", ["2024-01-01", "", "2024-01-03"], ["unparsable or missing", "row 2: nan"]),
    ("timestamp", ["", "", ""], ["3 unparsable or missing", "row 1: nan"]),
    ("timestamp", ["2024-01-01", "9999-12-31", "2024-01-03"], ["outside the years", "row 2: '9999-12-31'"]),
    ("timestamp", ["2024-01-01T10:00+01:00", "2024-01-02T10:00", "2024-01-03"], ["mixed time zones"]),
    ("timestamp", ["1", "2", "3"], ["holds numbers"]),
    ("amount", ["1.0", "12 EUR", "3"], ["non-numeric", "row 2: '12 EUR'"]),
    ("amount", ["1.0", "-5", "3"], ["negative", "row 2: -5"]),
    ("amount", ["1.0", "", "3"], ["missing or infinite", "row 2: nan"]),
    ("amount", ["inf", "2", "3"], ["missing or infinite", "row 1: inf"]),
    ("is_fraud", ["0", "2", "1"], ["not 0 or 1", "row 2: 2"]),
    ("is_fraud", ["0", "-1", "1"], ["not 0 or 1", "row 2: -1"]),
    ("is_fraud", ["0", "", "1"], ["not 0 or 1", "row 2: nan"]),
    ("is_fraud", ["0", "yes", "1"], ["not 0 or 1", "row 2: 'yes'"]),
]


@pytest.mark.parametrize(("column", "values", "fragments"), BAD_VALUES)
def test_bad_values_name_file_column_and_rows(
    tmp_path: Path, column: str, values: list[str], fragments: list[str]
) -> None:
    err = raises(write(tmp_path, table_text({**BASE, column: values})), f"column '{column}'", *fragments)
    assert err.column == column


def test_mixed_time_zones_show_both_kinds(tmp_path: Path) -> None:
    stamps = ["2024-01-01T10:00+01:00", "2024-01-02T10:00", "2024-01-03T10:00+01:00"]
    raises(
        write(tmp_path, csv_text(timestamp=stamps)),
        "row 2: '2024-01-02T10:00'",
        "row 1: '2024-01-01T10:00+01:00'",
    )


def test_bad_value_names_the_source_column_when_mapped(tmp_path: Path) -> None:
    text = csv_text(drop=("amount",), TX_AMOUNT=["1", "-2", "3"])
    raises(write(tmp_path, text), "column 'TX_AMOUNT'", "row 2: -2", columns={"amount": "TX_AMOUNT"})


def test_at_most_five_rows_are_shown(tmp_path: Path) -> None:
    table = {k: [v[0]] * 8 for k, v in BASE.items()} | {
        "transaction_id": list("abcdefgh"),
        "amount": ["-1"] * 8,
    }
    err = raises(write(tmp_path, table_text(table)), "8 negative", "row 5: -1", "(3 more)")
    assert "row 6:" not in str(err) and err.rows == [1, 2, 3, 4, 5]


# ---------- parse_columns, DataError, warn_no_training_frauds ----------


def test_parse_columns_good() -> None:
    assert parse_columns(None) == parse_columns("") == {}
    spec = " timestamp = TX_DATETIME , card_id=CUSTOMER_ID,bank_id=BANK,"
    assert parse_columns(spec) == {"timestamp": "TX_DATETIME", "card_id": "CUSTOMER_ID", "bank_id": "BANK"}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("timestamp", "malformed part 'timestamp'"),
        ("timestamp=", "malformed part 'timestamp='"),
        ("=TX", "malformed part '=TX'"),
        ("card_id=A,when=TX_DATETIME", "unknown column 'when'"),
        ("card_id=A,card_id=B", "mapped twice"),
    ],
)
def test_parse_columns_malformed(spec: str, fragment: str) -> None:
    with pytest.raises(DataError, match="--columns") as info:
        parse_columns(spec)
    assert fragment in str(info.value) and info.value.path == "--columns"


def test_data_error_pickles() -> None:
    back = pickle.loads(pickle.dumps(DataError("f.csv: bad", path="f.csv", column="amount", rows=[2])))
    assert (str(back), back.path, back.column, back.rows) == ("f.csv: bad", "f.csv", "amount", [2])


def test_warn_no_training_frauds(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="clients.data"):
        assert warn_no_training_frauds(pd.Series([0, 0], dtype="int8"), source="bank_a") is True
        assert warn_no_training_frauds(pd.Series([], dtype="int8"), source="bank_b") is True
        assert warn_no_training_frauds(pd.Series([0, 1], dtype="int8"), source="bank_c") is False
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2 and "bank_a" in messages[0] and "no fraud" in messages[0]
    assert "bank_b" in messages[1]
