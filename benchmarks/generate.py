"""Time the synthetic consortium generator and writer; print size, speed and the mix of the data.

.venv/bin/python benchmarks/generate.py --cards 40000 --days 40   # about 2M rows
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from simulations.generate import GeneratorConfig, generate_consortium, write_consortium


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--cards", type=int, default=40_000)
    parser.add_argument("--merchants", type=int, default=8_000)
    parser.add_argument("--days", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="fmt", choices=("parquet", "csv"), default="parquet")
    args = parser.parse_args(argv)
    config = GeneratorConfig(
        banks=args.banks, cards=args.cards, merchants=args.merchants, days=args.days, seed=args.seed
    )

    started = time.perf_counter()
    frame = generate_consortium(config)
    generate_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="fedfraud-bench-") as tmp:
        started = time.perf_counter()
        write_consortium(frame, Path(tmp) / "banks", fmt=args.fmt, config=config)
        write_s = time.perf_counter() - started

    rows = len(frame)
    print(f"rows               {rows:,}  ({rows / (args.cards * args.days):.2f} per card-day)")
    print(f"generate           {generate_s:.2f} s  ({rows / generate_s:,.0f} rows/s)")
    print(f"write ({args.fmt:7s})  {write_s:.2f} s  ({rows / write_s:,.0f} rows/s)")
    print(f"fraud rate         {frame['is_fraud'].mean():.4%}")
    frauds = frame.loc[frame["is_fraud"] == 1, "scenario"].value_counts(normalize=True)
    print("fraud scenarios    " + ", ".join(f"{name} {share:.1%}" for name, share in frauds.items()))
    banks = frame["bank_id"].value_counts(normalize=True).sort_index()
    print("bank row shares    " + " ".join(f"{share:.3f}" for share in banks))
    per_merchant_bank = frame.groupby(["merchant_id", "bank_id"]).size()
    print(f"rows per merchant and bank (median over pairs seen): {per_merchant_bank.median():.0f}")


if __name__ == "__main__":
    main()
