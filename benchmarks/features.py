"""Benchmark local feature engineering on random transactions.

Usage: .venv/bin/python benchmarks/features.py --rows 1750000 --cards 100000 --merchants 10000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from clients.features import LOCAL_FEATURES, compute_local_features


def make_transactions(rows: int, cards: int, merchants: int, days: int, seed: int) -> pd.DataFrame:
    """Random canonical transactions: second-resolution times over `days`, skewed entity popularity."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-01-01T00:00:00", "ns")
    seconds = rng.integers(0, days * 86400, rows)
    card_weights = rng.pareto(1.5, cards) + 1.0
    merchant_weights = rng.pareto(1.2, merchants) + 1.0
    return pd.DataFrame(
        {
            "transaction_id": np.arange(rows, dtype=np.int64),
            "timestamp": start + seconds.astype("timedelta64[s]").astype("timedelta64[ns]"),
            "card_id": rng.choice(cards, rows, p=card_weights / card_weights.sum()),
            "merchant_id": rng.choice(merchants, rows, p=merchant_weights / merchant_weights.sum()),
            "amount": np.round(rng.lognormal(3.5, 1.2, rows), 2),
            "is_fraud": (rng.random(rows) < 0.005).astype(np.int8),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_750_000)
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--merchants", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best time is reported")
    args = parser.parse_args()

    frame = make_transactions(args.rows, args.cards, args.merchants, args.days, args.seed)
    frame = frame.sample(frac=1.0, random_state=args.seed)  # rows in arbitrary order, as in real files
    timings, cpu = [], []
    for _ in range(max(1, args.repeat)):
        started, cpu_started = time.perf_counter(), time.process_time()
        features = compute_local_features(frame)
        timings.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    assert list(features.columns) == list(LOCAL_FEATURES)
    best = min(timings)
    print(f"rows={args.rows} cards={args.cards} merchants={args.merchants} days={args.days}")
    print(f"seconds={best:.3f} (runs: {', '.join(f'{t:.3f}' for t in timings)}; best cpu {min(cpu):.3f})")
    print(f"rows_per_s={args.rows / best:,.0f}")


if __name__ == "__main__":
    main()
