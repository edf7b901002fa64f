"""The simulation harness: prepare the data once, run each method on the same split, write the results."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from models.config import FedFraudConfig
from simulations.baselines import BASELINES, Method, MethodResult
from simulations.dataset import DataSource, Prepared, prepare
from simulations.export import write_model_dir
from simulations.report import write_report
from simulations.results import (
    atomic_directory,
    bank_summary,
    method_metrics,
    predictions_frame,
    write_json,
)

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """Progress sink that does nothing."""


def run_methods(
    data: Prepared,
    config: FedFraudConfig,
    methods: Mapping[str, Method],
    progress: Progress = _quiet,
    outcomes: dict[str, MethodResult] | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, float], dict[str, Any]]:
    """Run each method on the prepared data; return its predictions, wall seconds and per-round details."""
    predictions, seconds, details = {}, {}, {}
    for name, method in methods.items():
        progress(f"training {name}")
        start = time.perf_counter()
        result = method(data, config)
        seconds[name] = round(time.perf_counter() - start, 2)
        if isinstance(result, MethodResult):
            details[name] = result.details
            if outcomes is not None:
                outcomes[name] = result  # weights and artifacts, for the model package
            result = result.scores
        predictions[name] = predictions_frame(data, result)
        logger.info("%s done in %.1f s", name, seconds[name])
    return predictions, seconds, details


def collect_metrics(
    data: Prepared,
    source: DataSource,
    predictions: Mapping[str, pd.DataFrame],
    seconds: Mapping[str, float],
    details: Mapping[str, Any],
) -> dict[str, Any]:
    """metrics.json: split, banks, and global and per-bank metrics of every method."""
    methods = {
        name: {**method_metrics(pred), "seconds": seconds.get(name), **details.get(name, {})}
        for name, pred in predictions.items()
    }
    return {
        "data": str(source.path),
        "feature_version": data.feature_version,
        "features": list(data.feature_names),
        "split": data.split.description,
        "banks": bank_summary(data),
        "methods": methods,
        "baselines": {name: methods[name]["global"] for name in BASELINES if name in methods},
        "final": {name: m["global"] for name, m in methods.items()},
    }


def simulate(
    source: DataSource,
    config: FedFraudConfig,
    out: Path,
    *,
    overwrite: bool = False,
    methods: Mapping[str, Method] | None = None,
    progress: Progress = _quiet,
) -> dict[str, Any]:
    """Run the whole experiment and write the results directory atomically; return metrics.json's content."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    progress("loading and featurizing data")
    data = prepare(source, config.split)
    outcomes: dict[str, MethodResult] = {}
    predictions, seconds, details = run_methods(data, config, methods or BASELINES, progress, outcomes)
    metrics = collect_metrics(data, source, predictions, seconds, details)
    progress("writing results")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        resolved = {**config.to_dict(), "data": {k: str(v) for k, v in asdict(source).items()}}
        write_json(tmp / "config.json", resolved)
        write_json(tmp / "metrics.json", metrics)
        (tmp / "predictions").mkdir()
        for name, pred in predictions.items():
            pred.to_parquet(tmp / "predictions" / f"{name}.parquet", index=False)
        write_report(tmp, metrics, predictions)
        write_model_dir(tmp, data, config, outcomes, metrics)  # model/: the best federated model
    return metrics
