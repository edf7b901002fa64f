"""Simulation throughput: client-updates per second of the Flower and the vectorized engine, side by side.

Both engines train the same synthetic feature table (20 features, as many as the local features; random
banks of about --rows-per-bank rows, test on the latest 20% of each bank's rows) with the same configuration
(SecAgg+ on; --dp adds record-level DP-SGD). Client-updates/s = sampled banks x rounds / the seconds of the
training rounds from round 2 on (sampling to aggregate, as the Flower strategy records them; evaluation, Ray
start-up and round 1, where every bank calibrates its DP noise once for the whole run, excluded); the rate
over all training rounds and the end-to-end rate (the whole engine call) are printed beside it. Peak
memory: the RSS of this
process and its child processes (Ray's workers), sampled every 0.2 s, and torch.cuda.max_memory_allocated.

Usage: .venv/bin/python benchmarks/sim_throughput.py --banks 100 --dp
       .venv/bin/python benchmarks/sim_throughput.py --banks 10,100,1000 --engines vectorized --dp
The last line reads `ratio vectorized/flower: X` (training-round throughput) when both engines ran.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.config import load_config
from simulations.dataset import DataSource, prepare
from simulations.federated import run_federated
from simulations.vectorized import VectorizedOptions, run_vectorized


def feature_table(path: Path, rows: int, seed: int) -> None:
    """A feature table with 20 features, a label that depends on some of them, and a time column."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 20)).astype(np.float32)
    logit = -5.0 + 1.5 * x[:, 0] - 1.0 * x[:, 1] + 0.8 * x[:, 2] * x[:, 3]
    frame = pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(20)])
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    frame["time"] = np.arange(rows, dtype=np.int64)
    frame.to_parquet(path, index=False)


def _tree_rss() -> int:
    """RSS in bytes of this process and all its descendants (from /proc)."""
    me, parents, rss = os.getpid(), {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(stat[1])
            rss[int(entry.name)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue

    def descends(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == me:
                return True
            pid, seen = parents.get(pid, 0), seen + 1
        return False

    return sum(size for pid, size in rss.items() if descends(pid))


class PeakMemory:
    """Samples the process tree's RSS in a background thread; `peak` is the largest sample."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss())
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss())


def run_engine(engine: str, data: Any, config: Any, chunk: int) -> dict[str, float]:
    """One engine on the prepared data: seconds of training rounds, end to end, peak memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with PeakMemory() as memory:
        if engine == "flower":
            result = run_federated(data, config)
        else:
            result = run_vectorized(data, config, options=VectorizedOptions(chunk=chunk))
    wall = time.perf_counter() - started
    rounds = result.details["rounds"]
    fit = [float(r.get("seconds", 0.0)) for r in rounds]
    updates = [int(r.get("results", 0)) for r in rounds]
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {
        "wall": wall,
        "all": sum(updates) / sum(fit),
        "steady": sum(updates[1:]) / sum(fit[1:]) if sum(fit[1:]) else float("nan"),
        "updates": sum(updates),
        "rss": memory.peak,
        "cuda": cuda,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--banks", default="100", help="comma-separated bank counts, e.g. 10,100,1000")
    parser.add_argument("--rounds", type=int, default=3, help="at least 2 (round 1 is set-up)")
    parser.add_argument("--dp", action="store_true", help="record-level DP-SGD at each bank")
    parser.add_argument("--engines", default="flower,vectorized")
    parser.add_argument("--rows-per-bank", type=int, default=400)
    parser.add_argument("--chunk", type=int, default=0, help="vectorized banks per chunk (0: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("FEDFRAUD_TORCH_THREADS", "1")))  # as `fedfraud`
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    print(f"device: {device}; rounds {args.rounds}; dp {args.dp}; ~{args.rows_per_bank} rows per bank")
    ratio = None
    for banks in [int(b) for b in args.banks.split(",")]:
        overrides = {"rounds": args.rounds, "dp": args.dp, "local-epochs": 1, "seed": args.seed}
        config = load_config({**overrides, "test-fraction": 0.2})
        with tempfile.TemporaryDirectory(prefix="fedfraud-bench-") as tmp:
            path = Path(tmp) / "table.parquet"
            feature_table(path, banks * args.rows_per_bank, args.seed)
            source = DataSource(
                path=path, features="auto", label="label", time="time", partition="random", banks=banks
            )
            data = prepare(source, config.split)
            rates = {}
            for engine in engines:
                m = run_engine(engine, data, config, args.chunk)
                rates[engine] = m["steady"]
                print(
                    f"{engine:>10} banks={banks:<6} updates/s={m['steady']:10.1f} (all rounds "
                    f"{m['all']:9.1f}, end-to-end {m['updates'] / m['wall']:8.1f}, wall {m['wall']:7.1f} s) "
                    f"peak_rss={m['rss'] / 2**20:6.0f} MiB"
                    + (f" cuda_peak={m['cuda'] / 2**20:.0f} MiB" if m["cuda"] else ""),
                    flush=True,
                )
            if {"flower", "vectorized"} <= rates.keys():
                ratio = rates["vectorized"] / rates["flower"]
                print(f"  banks={banks}: vectorized/flower {ratio:.1f}x", flush=True)
    if ratio is not None:
        print(f"ratio vectorized/flower: {ratio:.1f}")


if __name__ == "__main__":
    main()
