"""Score a bank's transactions file with a model package: features from the whole file, one output file.

The file holds history too, so that the card and merchant windows of the rows to score can be computed
(labels in `is_fraud`, where present, feed the merchant fraud rates under the label delay). `since` limits
the output to the rows at or after a date. The output (`transaction_id, score, decision`, and
`explanation` on request) is written to a temporary file and renamed: nothing half-written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.data import DataError, load_feature_table, load_transactions
from clients.entity import consortium_features
from clients.features import compute_local_features
from clients.scoring import Progress, Scorer, entity_inputs
from models.explain import explanation_text
from models.package import TABLE_VERSION, ModelPackage

logger = logging.getLogger(__name__)
OUTPUT_SUFFIXES = (".csv", ".parquet")
EXPLAIN_CHUNK = 4096


@dataclass(frozen=True)
class ScoreSummary:
    """What a scoring run did: rows read and scored, rows flagged, the threshold, the output file."""

    rows_read: int
    rows_scored: int
    flagged: int
    threshold: float
    out: Path


def _since_mask(frame: pd.DataFrame, since: str | None) -> np.ndarray:
    if since is None:
        return np.ones(len(frame), dtype=bool)
    try:
        start = pd.Timestamp(since)
    except ValueError:
        raise DataError(f"--since: {since!r} is not a date (YYYY-MM-DD)", path="--since") from None
    times = frame["timestamp"]
    if not pd.api.types.is_datetime64_any_dtype(times):
        raise DataError("--since needs a file with datetime timestamps", path="--since", column="timestamp")
    if isinstance(times.dtype, pd.DatetimeTZDtype):
        start = start.tz_localize("UTC") if start.tzinfo is None else start
    return np.asarray(times >= start)


def featurize(
    package: ModelPackage,
    data: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    entity_key: bytes | str | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Read and validate the file (DataError as in training) and compute the package's raw features."""
    spec = package.spec
    if spec.version.split("+")[0] == TABLE_VERSION:
        frame, _ = load_feature_table(data, features=list(spec.names), label=None, columns=columns)
        return frame, frame[list(spec.names)].to_numpy(np.float32)
    frame = load_transactions(data, columns=columns, require_label=False)
    if "is_fraud" not in frame.columns:
        logger.warning("%s: no is_fraud column: merchant fraud rates are computed as 0", data)
    x = compute_local_features(frame, delay_days=spec.delay_days).to_numpy(np.float32)
    consortium = entity_inputs(package, entity_key)
    if consortium is not None:
        table, table_spec, key = consortium
        if table_spec.column not in frame.columns:
            raise DataError(f"{data}: no column {table_spec.column!r} for the consortium features", path=data)
        extra = consortium_features(frame, table, table_spec, key=key).to_numpy(np.float32)
        x = np.hstack([x, extra])
    return frame, x


def _output(frame: pd.DataFrame, scores: np.ndarray, decisions: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"transaction_id": frame["transaction_id"].to_numpy(), "score": scores, "decision": decisions}
    )


def _explanations(scorer: Scorer, x: np.ndarray, top: int, progress: Progress | None) -> list[str]:
    texts: list[str] = []
    for start in range(0, len(x), EXPLAIN_CHUNK):
        texts += [
            explanation_text(items) for items in scorer.explain(x[start : start + EXPLAIN_CHUNK], top=top)
        ]
        if progress is not None:
            progress(len(texts), len(x))
    return texts


def write_atomically(table: pd.DataFrame, out: Path) -> None:
    """Write CSV or Parquet (by suffix) to a temporary sibling, then rename it over `out`."""
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DataError(f"--out {out}: unsupported output type; use {' or '.join(OUTPUT_SUFFIXES)}", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{suffix}")
    try:
        if suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def score_file(
    package: ModelPackage,
    data: str | Path,
    out: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    engine: str = "onnx",
    threads: int | None = None,
    since: str | None = None,
    explain: int = 0,
    entity_key: bytes | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ScoreSummary:
    """Score a transactions or feature-table file; write `transaction_id, score, decision[, explanation]`."""
    target = Path(out)
    if target.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(f"--out {target}: unsupported output type; use .csv or .parquet", path=target)
    if progress is not None:
        progress("reading and featurizing", 0, 1)
    frame, x = featurize(package, data, columns=columns, entity_key=entity_key)
    if progress is not None:
        progress("reading and featurizing", 1, 1)
    keep = _since_mask(frame, since)
    frame, x = frame.loc[keep], x[keep]
    scorer = Scorer(package, engine=engine, threads=threads)
    step = (lambda done, total: progress("scoring", done, total)) if progress else None
    scores = scorer.scores(x, progress=step)
    table = _output(frame, scores, scorer.decide(scores))
    if explain > 0:
        step = (lambda done, total: progress("explaining", done, total)) if progress else None
        table["explanation"] = _explanations(scorer, x, explain, step)
    write_atomically(table, target)
    flagged = int(table["decision"].sum())
    logger.info("scored %d of %d rows, %d flagged, written to %s", len(table), len(keep), flagged, target)
    return ScoreSummary(len(keep), len(table), flagged, scorer.threshold, target)
