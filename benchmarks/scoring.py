"""Benchmark scoring at the bank: batch throughput (features precomputed) and single-transaction latency.

Batch: raw feature rows -> the package's ONNX graph on onnxruntime (standardization inside) -> sigmoid ->
decision, timed from feature matrix to decisions (best of --repeat). Single: `OnlineScorer.score` on one
transaction at a time after warming the card/merchant state up on history: incremental features, one-row
inference and the decision (the state update included), per-call latency percentiles.
The model is the default MLP (64, 64) with seeded weights (the cost does not depend on training).

Usage: .venv/bin/python benchmarks/scoring.py --rows 1000000 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from clients.features import compute_local_features
from clients.scoring import OnlineScorer, Scorer, available_cpus
from models.feature_names import FEATURE_VERSION, LOCAL_FEATURES
from models.nets import build_model, get_weights
from models.package import ModelPackage
from models.spec import FeatureSpec, FeatureStats
from models.threshold import threshold_for_fpr


def make_transactions(rows: int, cards: int, merchants: int, days: int, seed: int) -> pd.DataFrame:
    """Random canonical transactions in time order, skewed card and merchant popularity, 0.5% fraud."""
    rng = np.random.default_rng(seed)
    seconds = np.sort(rng.integers(0, days * 86400, rows))
    card_w = rng.pareto(1.5, cards) + 1.0
    merchant_w = rng.pareto(1.2, merchants) + 1.0
    return pd.DataFrame(
        {
            "transaction_id": np.arange(rows, dtype=np.int64),
            "timestamp": np.datetime64("2024-01-01T00:00:00", "ns") + seconds.astype("timedelta64[s]"),
            "card_id": rng.choice(cards, rows, p=card_w / card_w.sum()),
            "merchant_id": rng.choice(merchants, rows, p=merchant_w / merchant_w.sum()),
            "amount": np.round(rng.lognormal(3.5, 1.2, rows), 2),
            "is_fraud": (rng.random(rows) < 0.005).astype(np.int8),
        }
    )


def make_package(x: np.ndarray, labels: np.ndarray, hidden: tuple[int, ...]) -> ModelPackage:
    """A package of a seeded MLP with the features' statistics and a threshold from its own scores."""
    spec = FeatureSpec.from_stats(LOCAL_FEATURES, FeatureStats.of(x), version=FEATURE_VERSION, delay_days=7)
    model = build_model("mlp", len(LOCAL_FEATURES), hidden_sizes=hidden, seed=0)
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.from_numpy(spec.transform(x[:100_000])))).numpy()
    threshold = threshold_for_fpr(scores, labels[:100_000], source="benchmark rows")
    return ModelPackage("mlp", hidden, get_weights(model), spec, threshold, method="benchmark")


def batch_throughput(scorer: Scorer, x: np.ndarray, repeat: int, chunk: int) -> float:
    """Best transactions per second from raw features to decisions."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        started = time.perf_counter()
        decisions = scorer.decide(scorer.scores(x, chunk=chunk))
        best = min(best, time.perf_counter() - started)
    assert len(decisions) == len(x)
    return len(x) / best


def single_latency(scorer: OnlineScorer, frame: pd.DataFrame) -> np.ndarray:
    """Milliseconds of each `score` call, one transaction at a time."""
    rows = frame.to_dict("records")
    timings = np.empty(len(rows))
    for i, row in enumerate(rows):
        started = time.perf_counter_ns()
        scorer.score(row)
        timings[i] = (time.perf_counter_ns() - started) / 1e6
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="batch rows (features precomputed)")
    parser.add_argument("--history", type=int, default=300_000, help="rows that warm up the online state")
    parser.add_argument("--online", type=int, default=20_000, help="transactions scored one at a time")
    parser.add_argument("--cards", type=int, default=50_000)
    parser.add_argument("--merchants", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--threads", type=int, default=available_cpus(), help="batch threads")
    parser.add_argument("--chunk", type=int, default=65_536, help="rows per onnxruntime call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    frame = make_transactions(args.history + args.online, args.cards, args.merchants, args.days, args.seed)
    x_hist = compute_local_features(frame).to_numpy(np.float32)
    package = make_package(x_hist, frame["is_fraud"].to_numpy(), (64, 64))
    x = np.resize(x_hist, (args.rows, x_hist.shape[1]))  # precomputed features, repeated to --rows
    onnx_rate = batch_throughput(Scorer(package, threads=args.threads), x, args.repeat, args.chunk)
    torch.set_num_threads(args.threads)
    torch_rate = batch_throughput(Scorer(package, engine="torch"), x, args.repeat, args.chunk)
    torch.set_num_threads(1)

    online = OnlineScorer(package)
    online.warm_up(frame.iloc[: args.history])
    ms = single_latency(online, frame.iloc[args.history :])
    p50, p99, worst = np.percentile(ms, [50, 99, 100])
    print(
        f"rows={args.rows} features={x.shape[1]} model=mlp(64,64) threads={args.threads} chunk={args.chunk}"
    )
    print(f"torch batch tx/s: {torch_rate:,.0f}")
    print(f"online: history={args.history} scored={args.online} p50 ms: {p50:.4f} max ms: {worst:.3f}")
    print(f"batch tx/s: {onnx_rate:,.0f}")
    print(f"single p99 ms: {p99:.4f}")


if __name__ == "__main__":
    main()
