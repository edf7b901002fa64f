"""Shared helpers of the bank-data tests (test_data.py, test_feature_table.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write(tmp_path: Path, content: str | bytes, name: str = "bank.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def times(*stamps: str) -> list[pd.Timestamp]:
    return [pd.Timestamp(s) for s in stamps]
