"""Entity statistics round: time and bytes per bank for 10/100 banks and 2^14..2^20 buckets.

Measures the work of one release with the code the real round runs: the bank builds its day x bucket table
(`clients.entity.local_table`), adds its noise share, encodes it for the exact sum (`server.exact_sum`), then
does what Flower's `secaggplus_mod` does in its masking stage (quantize, private mask, one pairwise mask per
neighbour, mod M, serialize; Flower's own functions); the server removes the private masks and sums
(`pseudo_rand_gen` per bank plus the modular sum, as `SecAggPlusWorkflow` does). Key agreement and Shamir
shares are a few kB per bank and independent of the table size, so they are left out.

    python benchmarks/entity_round.py                      # daily release (--days 1), 10 and 100 banks
    python benchmarks/entity_round.py --days 7 --banks 10  # a week per release
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from clients.entity import EntityTableSpec, local_table
from models.config import load_config
from models.release_noise import DISCRETE_LAPLACE, MECHANISMS, calibrate_release
from models.release_shares import noise_share, share_bound
from server.entity_release import MAX_CELL_COUNT
from server.exact_sum import plan_exact_sum
from server.secagg import SecAggConfigError, choose_secagg


def _bank_frame(rows: int, days: int, merchants: int, rng: np.random.Generator) -> pd.DataFrame:
    """A bank's transactions over `days` days at Zipf-popular merchants, 0.5% fraud."""
    start = np.datetime64("2024-01-01T00:00:00", "ns")
    offsets = rng.integers(0, days * 86_400, size=rows).astype("timedelta64[s]")
    return pd.DataFrame(
        {
            "timestamp": start + offsets,
            "merchant_id": rng.zipf(1.3, size=rows) % merchants,
            "is_fraud": (rng.random(rows) < 0.005).astype(np.int8),
        }
    )


def _mask(encoded: np.ndarray, plan_kwargs: dict[str, float], neighbours: int) -> tuple[float, int]:
    """Flower's bank-side masking stage on one vector: seconds and bytes sent."""
    t0 = time.perf_counter()
    q = int(plan_kwargs["quantization_range"])
    m = int(plan_kwargs["modulus_range"])
    vector = quantize([encoded], float(plan_kwargs["clipping_range"]), q)
    vector = factor_combine(q, vector)
    shapes = [a.shape for a in vector]
    for seed in range(neighbours + 1):  # the private mask and one pairwise mask per neighbour
        vector = parameters_addition(vector, pseudo_rand_gen(seed.to_bytes(4, "little") * 8, m, shapes))
    vector = parameters_mod(vector, m)
    sent = sum(len(ndarray_to_bytes(a)) for a in vector)
    return time.perf_counter() - t0, sent


def _server_unmask(cells: int, banks: int, modulus: int) -> float:
    """Server: regenerate each bank's private mask, subtract it, sum mod M (seconds per bank)."""
    acc = np.zeros(cells + 1, dtype=np.int64)
    t0 = time.perf_counter()
    reps = min(banks, 5)
    for bank in range(reps):
        mask = pseudo_rand_gen(bank.to_bytes(4, "little") * 8, modulus, [(cells + 1,)])[0]
        acc = np.mod(acc + mask, modulus)
    return (time.perf_counter() - t0) / reps


def measure(banks: int, buckets: int, days: int, rows_per_day: int, *, epsilon: float, mechanism: str) -> str:
    """One configuration's line: bank seconds (table, noise, mask), server seconds per bank, MB per bank."""
    rng = np.random.default_rng(0)
    spec = EntityTableSpec(start="2024-01-01", days=days, buckets=buckets)
    noise = calibrate_release(epsilon=epsilon, delta=1e-6, mechanism=mechanism)
    split = load_config({"entity-mechanism": mechanism}).entity.min_banks(banks)
    try:
        plan = plan_exact_sum(n_banks=banks, max_value=MAX_CELL_COUNT + share_bound(noise, n_banks=split))
    except SecAggConfigError as exc:
        return f"{banks:>5} {buckets:>8} {days:>4}  refused: {exc}"
    neighbours = choose_secagg(banks, load_config({}).federation).num_shares - 1
    frame = _bank_frame(rows_per_day * days, days, 50_000, rng)
    t0 = time.perf_counter()
    table = local_table(frame, spec, key=b"k" * 32)
    t_table = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoded = plan.encode(table + noise_share(table.shape, noise=noise, n_banks=split, rng=rng)).ravel()
    t_noise = time.perf_counter() - t0
    t_mask, sent = _mask(encoded, plan.workflow_kwargs(), neighbours)
    t_server = _server_unmask(encoded.size, banks, plan.modulus_range)
    return (
        f"{banks:>5} {buckets:>8} {days:>4} {table.size:>10,} {t_table:>8.3f} {t_noise:>8.3f} "
        f"{t_mask:>8.3f} {t_table + t_noise + t_mask:>9.3f} {t_server:>10.3f} {sent / 1e6:>9.2f}"
    )


def main() -> None:
    """Print one line per (banks, buckets)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--banks", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--log2-buckets", type=int, nargs="+", default=[14, 16, 18, 20])
    parser.add_argument("--days", type=int, default=1, help="days per release (a daily release: 1)")
    parser.add_argument("--rows-per-day", type=int, default=20_000, help="one bank's transactions per day")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--mechanism", choices=MECHANISMS, default=DISCRETE_LAPLACE, help="release noise")
    args = parser.parse_args()
    print(
        f"cpus: {os.cpu_count()}, epsilon {args.epsilon} ({args.mechanism}), "
        f"{args.rows_per_day:,} transactions/bank/day"
    )
    print("banks  buckets days      cells  table_s  noise_s   mask_s  bank_tot_s  server_s/bank  MB/bank")
    for banks in args.banks:
        for log2 in args.log2_buckets:
            line = measure(
                banks, 2**log2, args.days, args.rows_per_day, epsilon=args.epsilon, mechanism=args.mechanism
            )
            print(line, flush=True)
    print("server total per release = server_s/bank x banks; bank_tot_s runs in parallel at the banks")


if __name__ == "__main__":
    main()
