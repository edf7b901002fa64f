"""The results directory of DESIGN.md: predictions, metrics and an atomic write of the whole directory."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

from models.metrics import fraud_metrics
from simulations.dataset import Prepared

logger = logging.getLogger(__name__)
PREDICTION_COLUMNS = ["transaction_id", "bank_id", "card_id", "timestamp", "score", "label"]


def predictions_frame(data: Prepared, scores: np.ndarray) -> pd.DataFrame:
    """Every test row with its score, in the contract's columns."""
    rows = data.rows.loc[data.split.test]
    if len(scores) != len(rows):
        raise ValueError(f"scores: {len(scores)} values for {len(rows)} test rows")
    return pd.DataFrame(
        {
            "transaction_id": rows["transaction_id"].to_numpy(),
            "bank_id": rows["bank_id"].to_numpy(),
            "card_id": rows["card_id"].to_numpy(),
            "timestamp": rows["timestamp"].to_numpy(),
            "score": np.asarray(scores, dtype=np.float64),
            "label": rows["is_fraud"].to_numpy().astype(np.int8),
        }
    )


def _metrics_of(pred: pd.DataFrame) -> dict[str, float]:
    labels, scores = pred["label"].to_numpy(), pred["score"].to_numpy()
    has_days = pd.api.types.is_datetime64_any_dtype(pred["timestamp"]) and pred["card_id"].notna().all()
    days = pred["timestamp"].dt.floor("D").to_numpy() if has_days else None
    cards = pred["card_id"].to_numpy() if has_days else None
    out = fraud_metrics(labels, scores, card_ids=cards, days=days)
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    out["loss"] = float(log_loss(labels, clipped, labels=[0, 1])) if len(labels) else math.nan
    return out


def method_metrics(pred: pd.DataFrame) -> dict[str, Any]:
    """Global and per-bank fraud metrics of one method's predictions."""
    banks = {str(bank): _metrics_of(part) for bank, part in pred.groupby("bank_id", sort=True)}
    return {"global": _metrics_of(pred), "banks": banks}


def bank_summary(data: Prepared) -> dict[str, dict[str, int]]:
    """Rows and frauds per bank in the train and test windows."""
    out = {}
    fraud = data.rows["is_fraud"].to_numpy()
    for bank in data.banks:
        mask = data.bank_mask(bank)
        train, test = mask & data.split.train, mask & data.split.test
        out[str(bank)] = {
            "rows": int(mask.sum()),
            "train_rows": int(train.sum()),
            "train_frauds": int(fraud[train].sum()),
            "test_rows": int(test.sum()),
            "test_frauds": int(fraud[test].sum()),
        }
    return out


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: NaN/inf become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write JSON with NaN/inf as null."""
    path.write_text(json.dumps(_clean(payload), indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block completes (nothing half-written)."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("results written to %s", out)
