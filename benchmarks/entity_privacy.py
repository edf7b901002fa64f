"""Where the consortium features' average precision goes under privacy: record DP x entity-release noise.

Trains `federated_entity` (vectorized engine, the same math as the Flower path) on one data set for each
combination of record-level DP-SGD (on at `--dp-epsilon`, or off) and entity-release noise (on at
`--entity-epsilon`, or off: the exact consortium table), over several seeds, and prints the average precision
of each cell with its share of the central pooled baseline (`--pooled`, from a `fedfraud simulate` run's
metrics.json, or measured here with `--measure-pooled`).

    python benchmarks/entity_privacy.py --data results/demo-data --seeds 0 1 2
    python benchmarks/entity_privacy.py --data results/demo-data --set entity-epsilon=8 --only both
    python benchmarks/entity_privacy.py --data results/demo-data --one-bank --set batch-size=4096

`--one-bank` puts every row in one bank: record-level DP-SGD over the pooled rows, with pooled merchant
features, is the reference that a record-DP federation cannot beat at the same epsilon (it would be reached
by noise split among the banks under SecAgg+ with all rows in every step).

`--paired` seeds every random draw of a run from its seed (DP-SGD noise and Poisson sampling, the entity
key, the release's noise shares), so that two variants of the same seed see the same draws and their
difference is measured with far less spread: run the benchmark once per variant with `--paired` and compare
seed by seed. For research comparisons only: the library itself always draws its noise from OS entropy.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from clients import entity_round
from models.config import load_config
from models.release_shares import noise_share
from simulations import vectorized_federation
from simulations.baselines import central_pooled
from simulations.dataset import DataSource, prepare
from simulations.results import method_metrics, predictions_frame
from simulations.vectorized import VectorizedOptions, run_vectorized

CELLS: dict[str, dict[str, Any]] = {
    "none": {"dp": False, "entity-epsilon": float("inf")},
    "record only": {"dp": True, "entity-epsilon": float("inf")},
    "entity only": {"dp": False},
    "both": {"dp": True},
}


def seed_the_noise(seed: int) -> dict[str, Any]:
    """Seed the run's DP-SGD noise, sampling and release shares (`--paired`); return the entity key to use."""
    release = np.random.default_rng([seed, 1])

    def seeded(device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def share(*args: Any, **kwargs: Any) -> np.ndarray:
        return noise_share(*args, **{**kwargs, "rng": release})

    vectorized_federation.entropy_generator = seeded
    entity_round.noise_share = share
    return {"entity-key": hashlib.sha256(f"paired-{seed}".encode()).hexdigest()}


def average_precision(data: Any, overrides: dict[str, Any], *, paired: bool = False) -> float:
    """Global AP of federated_entity trained with these config overrides (`paired`: seeded noise)."""
    if paired:
        overrides = {**overrides, **seed_the_noise(int(overrides["seed"]))}
    config = load_config(overrides)
    result = run_vectorized(data, config, options=VectorizedOptions())
    return float(method_metrics(predictions_frame(data, result.scores))["global"]["ap"])


def pooled_ap(data: Any, overrides: dict[str, Any]) -> float:
    """Global AP of the central pooled baseline (no privacy, all rows in one place)."""
    scores = central_pooled(data, load_config(overrides))
    return float(method_metrics(predictions_frame(data, scores))["global"]["ap"])


def main() -> None:
    """Print the AP grid (mean over seeds, each seed's value) and its share of central pooled."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a directory of bank files or a pooled file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dp-epsilon", type=float, default=3.0)
    parser.add_argument("--entity-epsilon", type=float, default=3.0)
    parser.add_argument("--set", action="append", default=[], help="another config key=value (repeatable)")
    parser.add_argument("--only", choices=list(CELLS), action="append", help="run only these cells")
    parser.add_argument("--pooled", type=float, default=None, help="central pooled AP to compare with")
    parser.add_argument("--measure-pooled", action="store_true", help="train central pooled here per seed")
    parser.add_argument("--one-bank", action="store_true", help="all rows in one bank: central DP-SGD")
    parser.add_argument("--paired", action="store_true", help="seed all noise from the seed (comparisons)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the per-bank "no DP" notes of the noise-free cells
    warnings.filterwarnings("ignore")  # Opacus' "optimal order" notes at large epsilons
    extra = dict(item.split("=", 1) for item in args.set)
    base = {"entity-features": "merchant_id", "dp-epsilon": args.dp_epsilon}
    base |= {"entity-epsilon": args.entity_epsilon}
    if args.one_bank:  # SecAgg+ needs 3 banks; one bank sums nothing
        base |= {"secagg": False, "min-fit-banks": 1}
    base |= extra
    partition = {"partition": "card-hash", "banks": 1} if args.one_bank else {}
    source = DataSource(path=args.data, **partition)
    results: dict[str, list[float]] = {name: [] for name in args.only or CELLS}
    pooled: list[float] = []
    for seed in args.seeds:
        data = prepare(source, load_config({**base, "seed": seed}).split)
        if args.measure_pooled:
            pooled.append(pooled_ap(data, {**base, "seed": seed}))
        for name, values in results.items():
            cell = {**base, **CELLS[name], "seed": seed}
            values.append(average_precision(data, cell, paired=args.paired))
            print(f"seed {seed} {name:12s} AP {values[-1]:.4f}", flush=True)
    reference = statistics.mean(pooled) if pooled else args.pooled
    print(f"\nfederated_entity, record eps {args.dp_epsilon:g}, entity eps {args.entity_epsilon:g}, {extra}")
    print(f"{'privacy':12s} {'mean AP':>8s} {'of pooled':>10s}  per seed")
    for name, values in results.items():
        share = f"{statistics.mean(values) / reference:10.0%}" if reference else f"{'-':>10s}"
        print(f"{name:12s} {statistics.mean(values):8.4f} {share}  {[round(v, 3) for v in values]}")
    if pooled:
        print(f"{'pooled':12s} {reference:8.4f} {'100%':>10s}  {[round(v, 3) for v in pooled]}")


if __name__ == "__main__":
    main()
