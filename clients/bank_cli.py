"""`fedfraud bank start`: a bank's SuperNode over TLS with its key, pointed at its own transactions file.

By default (`--mode warm`) it runs Flower's SuperNode with `--isolation process`, polling promptly, and the
bank's ClientApp warm in a thread of the same process, woken as each message arrives (see
clients/fast_supernode.py and clients/warm_runner.py): one process per bank, imports and data loaded once.
`--mode subprocess` runs the stock `flower-supernode`, a fresh ClientApp process per message (much slower
rounds). The bank's ledger (privacy spend across runs and restarts) and its log of what it sent live in
`--state`. Plain HTTP only with an explicit `--insecure` (local trials).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)
Opt = typer.Option
bank_app = typer.Typer(no_args_is_help=True, help="A bank's SuperNode (its node in the consortium).")
MODES = ("warm", "subprocess")
RESTART_PAUSE_S = 10.0


class BankSetupError(Exception):
    """The bank's node cannot start as asked (missing file or key, no TLS without --insecure)."""


def node_config(
    *,
    data: Path,
    bank_id: int,
    state: Path,
    columns: str = "",
    features: str = "",
    limits: dict[str, float] | None = None,
) -> str:
    """The `--node-config` string: data-path, bank-id, ledger-path, sent-log (+ columns, features, limits)."""
    values: dict[str, str | int] = {
        "data-path": str(data.resolve()),
        "bank-id": bank_id,
        "ledger-path": str((state / "ledger.json").resolve()),
        "sent-log": str((state / "sent.jsonl").resolve()),
    }
    if columns:
        values["columns"] = columns
    if features:
        values["features"] = features
    values.update({k: str(v) for k, v in (limits or {}).items()})  # clients/node_policy.py
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_command(
    *,
    superlink: str,
    config: str,
    ca: Path | None,
    key: Path | None,
    runtime_port: int,
    mode: str = "warm",
    insecure: bool = False,
    max_retries: int | None = None,
) -> list[str]:
    """The SuperNode command line: TLS with the CA and the bank's key, or `--insecure` when asked."""
    if mode not in MODES:
        raise BankSetupError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "warm":
        command = [
            sys.executable,
            "-m",
            "clients.fast_supernode",
            "--warm-clientapp",
            "--isolation",
            "process",
        ]
    else:
        command = [str(Path(sys.executable).with_name("flower-supernode")), "--isolation", "subprocess"]
    command += ["--superlink", superlink, "--port", str(runtime_port), "--node-config", config]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if insecure:
        return [*command, "--insecure"]
    for path, what, flag in (
        (ca, "the consortium CA certificate", "--ca"),
        (key, "the bank's private key", "--key"),
    ):
        if path is None:
            raise BankSetupError(
                f"{flag} is required ({what}); pass --insecure for a local trial without TLS"
            )
        if not path.is_file():
            raise BankSetupError(f"{path}: missing ({what}, {flag})")
    return [*command, "--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def _env() -> dict[str, str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_node(command: list[str], stopping: list[int]) -> int:
    """Run the node until it exits or SIGTERM/Ctrl-C asks it to stop; its exit code."""
    proc = subprocess.Popen(command, env=_env())  # a fixed executable, no shell
    try:
        while not stopping and proc.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        stopping.append(0)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return int(proc.returncode or 0)


def supervise(command: list[str], *, restarts: int = 0, pause_s: float = RESTART_PAUSE_S) -> int:
    """Run the node, starting it again after a failed exit up to `restarts` times; the last exit code.

    The SuperLink refuses a key whose previous session has not expired yet (~20 s after a crash).
    """
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(0))
    code = run_node(command, stopping)
    for attempt in range(1, restarts + 1):
        if stopping or code == 0:
            break
        console.print(f"node exited with code {code}; restart {attempt}/{restarts} in {pause_s:.0f} s")
        deadline = time.monotonic() + pause_s
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)
        if not stopping:
            code = run_node(command, stopping)
    return code


@bank_app.command("start")
def start(  # noqa: PLR0917 - typer: one parameter per flag
    data: Annotated[Path, Opt(help="The bank's transactions file (CSV or Parquet).")],
    superlink: Annotated[str, Opt(help="The consortium's SuperLink, host:port.")],
    state: Annotated[Path, Opt(help="The bank's state: privacy ledger, sent log.")],
    bank_id: Annotated[int, Opt(help="The bank's number in the consortium.")] = 0,
    ca: Annotated[Path | None, Opt(help="The consortium CA certificate (ca.crt).")] = None,
    key: Annotated[Path | None, Opt(help="The bank's private key (from `fedfraud certs bank`).")] = None,
    columns: Annotated[str, Opt(help="Column mapping canonical=SOURCE,... for this file.")] = "",
    features: Annotated[
        str, Opt(help="Feature-table columns (comma-separated) instead of transactions.")
    ] = "",
    runtime_port: Annotated[int, Opt(help="Local port of the SuperNode's Runtime API.")] = 9094,
    mode: Annotated[
        str, Opt(help="warm (the ClientApp stays loaded) or subprocess (a process per message).")
    ] = "warm",
    insecure: Annotated[bool, Opt("--insecure", help="No TLS, no node key: local trials only.")] = False,
    max_retries: Annotated[int | None, Opt(help="Give up after this many failed connections.")] = None,
    restarts: Annotated[
        int, Opt(help="Start the node again this many times after it fails (10 s apart).")
    ] = 5,
    max_epsilon: Annotated[
        float | None, Opt(help="Refuse runs whose DP-SGD budget dp-epsilon is above this.")
    ] = None,
    entity_budget: Annotated[
        float | None, Opt(help="Cap on this bank's composed entity-release epsilon.")
    ] = None,
) -> None:
    """Start the bank's node in the foreground (Ctrl-C stops it)."""
    if not data.is_file():
        raise BankSetupError(f"{data}: the bank's transactions file does not exist (--data)")
    limits = {
        k: v for k, v in (("max-epsilon", max_epsilon), ("entity-budget", entity_budget)) if v is not None
    }
    config = node_config(
        data=data, bank_id=bank_id, state=state, columns=columns, features=features, limits=limits
    )
    command = supernode_command(
        superlink=superlink,
        config=config,
        ca=ca,
        key=key,
        runtime_port=runtime_port,
        mode=mode,
        insecure=insecure,
        max_retries=max_retries,
    )
    state.mkdir(parents=True, exist_ok=True)
    if insecure:
        console.print("[yellow]warning:[/yellow] SuperNode without TLS or node key (--insecure)")
    console.print(f"bank {bank_id}: {data} -> {superlink} ({mode} ClientApp); ledger and sent log in {state}")
    raise typer.Exit(supervise(command, restarts=restarts))


def register(app: typer.Typer) -> None:
    """Add the `bank` command group to the `fedfraud` command."""
    app.add_typer(bank_app, name="bank")
