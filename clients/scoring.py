"""Scoring at the bank with a model package: batches of feature rows, and one transaction at a time online.

`Scorer` runs the package's ONNX graph with onnxruntime (raw features in; standardization is inside the
graph) or the torch module (the training side's exact path: `FeatureSpec.transform`, then the network).
Scores are sigmoid(logit) in float64; a transaction is flagged when its score reaches the package's
threshold. `OnlineScorer` keeps the per-card and per-merchant state (`clients.online`) and scores one
transaction from it in well under a millisecond.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch

from clients.entity import EntityTableSpec
from clients.online import OnlineFeatures, Transaction
from models.explain import Contribution, contributions, integrated_gradients
from models.onnx_export import INPUT_NAME, OUTPUT_NAME
from models.package import ModelPackage, PackageError, key_fingerprint

logger = logging.getLogger(__name__)

ENGINES = ("onnx", "torch")
KEY_ENV = "FEDFRAUD_ENTITY_KEY"
Progress = Callable[[int, int], None]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function in float64 (no overflow, no saturation below ~37)."""
    x = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def available_cpus() -> int:
    """CPUs this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def onnx_session(model: bytes, *, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session; `threads` intra-op threads (default: the CPUs this process may use)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


class Scorer:
    """Scores raw feature rows (in the package's feature order) with onnxruntime or torch."""

    def __init__(self, package: ModelPackage, *, engine: str = "onnx", threads: int | None = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.package, self.spec, self.engine = package, package.spec, engine
        self.threshold = package.threshold.value
        self.model = package.build_model()
        self.session = onnx_session(package.onnx_bytes(), threads=threads) if engine == "onnx" else None

    def _matrix(self, x: np.ndarray) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != len(self.spec.names):
            raise ValueError(f"features must have shape (rows, {len(self.spec.names)}), got {arr.shape}")
        return np.ascontiguousarray(arr)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The model's logits (float32) for raw feature rows."""
        arr = self._matrix(x)
        if self.session is not None:
            return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0])
        with torch.no_grad():
            return self.model(torch.from_numpy(self.spec.transform(arr))).reshape(-1).numpy()

    def scores(self, x: np.ndarray, *, chunk: int = 65_536, progress: Progress | None = None) -> np.ndarray:
        """Fraud probabilities (float64) of raw feature rows, in chunks (progress(done, total) after each)."""
        arr = self._matrix(x)
        out = np.empty(len(arr), dtype=np.float64)
        for start in range(0, len(arr), chunk):
            stop = min(start + chunk, len(arr))
            out[start:stop] = sigmoid(self.logits(arr[start:stop]))
            if progress is not None:
                progress(stop, len(arr))
        return out

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """1 where a score reaches the package's threshold (flag for review), else 0."""
        return (np.asarray(scores) >= self.threshold).astype(np.int8)

    def explain(self, x: np.ndarray, *, top: int = 3, steps: int = 64) -> list[list[Contribution]]:
        """Each row's top contributions (integrated gradients of the logit, in plain words)."""
        arr = self._matrix(x)
        attributions, _ = integrated_gradients(self.model, self.spec.transform(arr), steps=steps)
        return [contributions(self.spec.names, r, a, top=top) for r, a in zip(arr, attributions, strict=True)]


def entity_inputs(
    package: ModelPackage, key: bytes | str | None
) -> tuple[np.ndarray, EntityTableSpec, bytes] | None:
    """The published table, its shape and the consortium key for a package with consortium features."""
    if package.entity is None:
        return None
    key = key if key is not None else os.environ.get(KEY_ENV) or None
    if key is None:
        raise PackageError(
            f"model {package.method!r} uses consortium features: give the consortium key (--entity-key or "
            f"the {KEY_ENV} environment variable)",
            path=KEY_ENV,
        )
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
    except ValueError:
        raise PackageError(
            "the consortium key must be hexadecimal (as the release gives it)", path=KEY_ENV
        ) from None
    release = package.entity.release
    if key_fingerprint(raw) != release.get("key_fingerprint"):
        raise PackageError(
            "the consortium key does not match the one the entity table was built with (fingerprint "
            f"{key_fingerprint(raw)} != {release.get('key_fingerprint')})",
            path=KEY_ENV,
        )
    spec = EntityTableSpec(
        start=str(release["start"]),
        days=int(release["days"]),
        column=str(release["column"]),
        buckets=int(release["buckets"]),
        delay_days=int(release["delay"]),
    )
    return package.entity.table, spec, raw


@dataclass(frozen=True)
class ScoredTransaction:
    """One scored transaction: score, decision (True: flag for review), features, optional explanation."""

    transaction_id: Hashable
    score: float
    decision: bool
    features: np.ndarray
    explanation: list[Contribution] = field(default_factory=list)


class OnlineScorer:
    """Scores one transaction at a time from incrementally kept card and merchant state."""

    def __init__(
        self, package: ModelPackage, *, entity_key: bytes | str | None = None, engine: str = "onnx"
    ) -> None:
        self.scorer = Scorer(package, engine=engine, threads=1)
        self.state = OnlineFeatures(
            delay_days=package.spec.delay_days, consortium=entity_inputs(package, entity_key)
        )
        if self.state.names != package.spec.names:
            raise PackageError(
                "online scoring computes transaction features from card and merchant state; this package's "
                f"features are version {package.spec.version!r} (a feature table: score rows with Scorer)",
                path=package.method or "model package",
            )
        self.threshold = package.threshold.value

    def _logit(self, x: np.ndarray) -> float:
        session = self.scorer.session
        if session is not None:
            return float(session.run([OUTPUT_NAME], {INPUT_NAME: x.reshape(1, -1)})[0][0])
        return float(self.scorer.logits(x.reshape(1, -1))[0])

    def score(
        self, tx: Transaction | dict[str, Any], *, observe: bool = True, explain: int = 0
    ) -> ScoredTransaction:
        """Score one transaction from the current state, then (by default) add it to the state."""
        tx = tx if isinstance(tx, Transaction) else Transaction.of(tx)
        x = self.state.features(tx)
        logit = self._logit(x)
        score = 0.5 * (1.0 + math.tanh(0.5 * logit))
        why = self.scorer.explain(x.reshape(1, -1), top=explain)[0] if explain > 0 else []
        if observe:
            self.state.observe(tx)
        return ScoredTransaction(tx.transaction_id, score, score >= self.threshold, x, why)

    def record_fraud(self, merchant_id: Hashable, timestamp: Any) -> None:
        """A fraud label arrived (counts in merchant fraud rates once older than the label delay)."""
        self.state.record_fraud(merchant_id, timestamp)

    def warm_up(self, history: pd.DataFrame) -> int:
        """Build the state from the bank's recent history (canonical columns, labels when known)."""
        return self.state.warm_up(history)
