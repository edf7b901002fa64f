"""Round latency of a real deployment: SuperLink (TLS + node auth) and N bank SuperNodes on 127.0.0.1.

For each ClientApp mode (`warm`: the default of `fedfraud bank start`, one long-lived ClientApp process per
bank; `subprocess`: Flower's stock SuperNode, a fresh ClientApp process per message) it runs a SecAgg+ and
DP training run and prints, per round, the wall time (audit log), the banks' own compute (their sent logs:
time inside the ClientApp, the slowest bank) and the difference: what the deployment adds to a round.

    .venv/bin/python benchmarks/deploy_latency.py --banks 10 --rounds 3
    .venv/bin/python benchmarks/deploy_latency.py --banks 10 --rounds 2 --mode subprocess
    .venv/bin/python benchmarks/deploy_latency.py --banks 10 --rounds 6 --run-config evaluate-in-fit=false
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.sent_log import read_sent_log
from simulations.generate import GeneratorConfig, generate_consortium, write_consortium
from tests._deploy import Consortium

ROLES = {
    "flower-superlink": "superlink",
    "server.fast_superlink": "superlink",
    "flwr-serverapp": "serverapp",
    "clients.fast_supernode": "supernodes",
    "flower-supernode": "supernodes",
    "clients.warm_runner": "clientapps",
    "flwr-clientapp": "clientapps",
    "flower-superexec": "superexec",
}


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each kind of Flower process on this machine."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = next((r for key, r in ROLES.items() if key in cmdline), None)
        if role is not None:
            totals[role] = totals.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def _t(record: dict) -> float:
    return dt.datetime.fromisoformat(record["time"]).timestamp()


def measure(
    consortium: Consortium, mode: str, banks: list[str], rounds: int, run_config: str = ""
) -> list[dict]:
    """Run `rounds` rounds with the banks in `mode`; per-round wall, compute and overhead seconds."""
    since = len(consortium.audit())
    extra = ("--mode", mode)
    procs = {b: consortium.start_bank(b, i, *extra, state=mode) for i, b in enumerate(banks)}
    try:
        consortium.wait_online(banks, timeout=600)
        started = time.perf_counter()
        keys = f"min-fit-banks={len(banks)} {run_config}".strip()
        run = consortium.run(mode, rounds=rounds, run_config=keys)
        cpu = _cpu_during_last_rounds(consortium, since, rounds)
        code = run.wait(timeout=7200)
        total = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"run failed ({mode}): {run.log}")
    finally:
        for proc in procs.values():
            proc.stop()
    events = consortium.audit(since)
    run_id = next(e["run_id"] for e in events if e["event"] == "run_start")
    marks = [e for e in events if e["event"] in ("stats_round", "round")]
    sent = {
        b: [r for r in read_sent_log(consortium.bank_state(b, mode) / "sent.jsonl") if r["run_id"] == run_id]
        for b in banks
    }
    rows = []
    for before, after in itertools.pairwise(marks):
        round_no = after["round"]
        compute = max(
            sum(r["seconds"] for r in records if r["round"] == str(round_no)) for records in sent.values()
        )
        wall = _t(after) - _t(before)
        rows.append({"round": round_no, "wall": wall, "compute": compute, "overhead": wall - compute})
    print(
        f"\n{mode}: {len(banks)} banks, {rounds} rounds, whole run {total:.1f} s "
        "(with start-up and the statistics round)"
    )
    print(f"{'round':>5} {'wall s':>8} {'bank compute s':>15} {'overhead s':>11}")
    for row in rows:
        print(f"{row['round']:>5} {row['wall']:>8.2f} {row['compute']:>15.2f} {row['overhead']:>11.2f}")
    if rounds >= 2:  # live processes only: a subprocess-mode ClientApp is gone before it is counted
        per_round = {role: round(seconds / (rounds - 1), 2) for role, seconds in sorted(cpu.items())}
        print(f"CPU seconds per round (rounds 2..{rounds}) by process kind: {per_round}")
    return rows


def _cpu_during_last_rounds(consortium: Consortium, since: int, rounds: int) -> dict[str, float]:
    """CPU seconds per process kind from the end of round 1 to the end of the last round."""

    def reached(round_no: int) -> bool:
        return any(e["event"] == "round" and e["round"] == round_no for e in consortium.audit(since))

    while not reached(1):
        time.sleep(0.05)
    first = cpu_snapshot()
    while not reached(rounds):
        time.sleep(0.05)
    last = cpu_snapshot()
    return {role: last[role] - first.get(role, 0.0) for role in last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", action="append", choices=["warm", "subprocess"], help="default: warm")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument("--in-memory", action="store_true", help="SuperLink without its database")
    parser.add_argument("--run-config", default="", help="more run-config keys, e.g. 'evaluate-in-fit=false'")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="deploy-latency-"))
    gen = GeneratorConfig(banks=args.banks, cards=120 * args.banks, merchants=150, days=30, seed=0)
    write_consortium(generate_consortium(gen), root / "data", config=gen)
    names = [f"bank{i}" for i in range(args.banks)]
    consortium = Consortium(root=root, data=root / "data")
    try:
        consortium.make_certs(names)
        consortium.start_server(*(["--in-memory"] if args.in_memory else []))
        for name in names:
            consortium.register(name)
        summary = {}
        for mode in args.mode or ["warm"]:
            rows = measure(consortium, mode, names, args.rounds, args.run_config)
            steady = [r for r in rows if r["round"] >= 2] or rows  # round 1 loads the data (warm mode)
            summary[mode] = (
                statistics.median(r["wall"] for r in steady),
                statistics.median(r["overhead"] for r in steady),
            )
        for mode, (wall, overhead) in summary.items():
            print(f"{mode}: median round {wall:.2f} s, of which {overhead:.2f} s beyond the banks' compute")
    finally:
        consortium.close()
        if args.keep:
            print(f"logs: {root}/logs")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
