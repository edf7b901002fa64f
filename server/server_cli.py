"""`fedfraud server`: start the consortium's SuperLink (TLS + node authentication) and launch training runs.

Thin wrappers around Flower's own commands, which stay usable directly (docs/consortium-operator.md):
`start` runs `flower-superlink` with the consortium's certificates and node authentication required (plain
HTTP only with an explicit `--insecure`, for local trials), keeps its database, log and a Flower connection
(`<state>/flwr/config.toml`, connection `fedfraud`) in a state directory, and writes each refused bank key to
the audit log; `run` runs `flwr run` against that connection with checkpoints and the audit log in the state
directory, so that running it again after a crash resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server import registry
from server.audit import AUDIT_FILE, AuditLog
from server.superlink_watch import AuthWatcher

logger = logging.getLogger(__name__)
console = Console(stderr=True)
Opt = typer.Option
CONNECTION = "fedfraud"
PROJECT = Path(__file__).resolve().parent.parent

StateOpt = Annotated[Path, Opt("--state", help="Server state: database, log, checkpoints, audit.jsonl.")]
server_app = typer.Typer(no_args_is_help=True, help="The consortium's SuperLink and training runs.")


class ServerSetupError(Exception):
    """The SuperLink cannot be started as asked (missing certificate, no TLS without --insecure)."""


def flower_bin(name: str) -> str:
    """A Flower command next to this interpreter (the project's venv), else the bare name (PATH)."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def superlink_command(
    *, certs: Path | None, state: Path, host: str, port: int, insecure: bool = False, in_memory: bool = False
) -> list[str]:
    """The `flower-superlink` command line (server/fast_superlink.py): TLS and node auth, or `--insecure`."""
    command = [sys.executable, "-m", "server.fast_superlink"]  # flower-superlink, its state indexed
    command += ["--disable-runtime-dependency-installation"]
    command += ["--host", host, "--port", str(port)]
    if not in_memory:  # registered (and revoked) bank keys survive a restart
        command += ["--database", str(state / "superlink.db")]
    if insecure:
        return [*command, "--insecure"]
    if certs is None:
        raise ServerSetupError("--certs DIR is required (TLS); pass --insecure for a local trial without TLS")
    files = [certs / "ca.crt", certs / "server.pem", certs / "server.key"]
    for path in files:
        if not path.is_file():
            raise ServerSetupError(f"{path}: missing (create it with `fedfraud certs init-ca/server`)")
    command += ["--ssl-ca-certfile", str(files[0]), "--ssl-certfile", str(files[1])]
    return [*command, "--ssl-keyfile", str(files[2]), "--enable-supernode-auth"]


def flwr_env(state: Path) -> dict[str, str]:
    """Environment for Flower commands: FLWR_HOME in the state directory, the venv's bin on PATH."""
    env = dict(os.environ, FLWR_HOME=str(state / "flwr"), FLWR_TELEMETRY_ENABLED="0")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_command(
    *, state: Path, app: Path, rounds: int | None, run_config: str, checkpoint_dir: Path | None = None
) -> list[str]:
    """`flwr run` on the `fedfraud` connection; checkpoints and the audit log in the state directory."""
    checkpoints = (checkpoint_dir or state / "checkpoints").resolve()
    keys = f'checkpoint-dir="{checkpoints}" audit-log="{(state / AUDIT_FILE).resolve()}"'
    if rounds is not None:
        keys += f" rounds={rounds}"
    if run_config.strip():
        keys += f" {run_config.strip()}"
    return [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", keys]


@server_app.command("start")
def start(  # noqa: PLR0917 - typer: one parameter per flag
    state: StateOpt,
    certs: Annotated[Path | None, Opt(help="Directory with ca.crt, server.pem, server.key.")] = None,
    host: Annotated[str, Opt(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, Opt(help="The SuperLink's port (Fleet, Control and Runtime APIs).")] = 9092,
    insecure: Annotated[bool, Opt("--insecure", help="No TLS, no node auth: local trials only.")] = False,
    in_memory: Annotated[
        bool,
        Opt("--in-memory", help="No database: faster rounds, but bank registrations end with the process."),
    ] = False,
) -> None:
    """Start the SuperLink in the foreground (Ctrl-C stops it); refused bank keys go to the audit log."""
    command = superlink_command(
        certs=certs, state=state, host=host, port=port, insecure=insecure, in_memory=in_memory
    )
    state.mkdir(parents=True, exist_ok=True)
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    registry.write_connection(
        state / "flwr",
        CONNECTION,
        address,
        root_certificates=certs / "ca.crt" if certs and not insecure else None,
    )
    if insecure:
        console.print("[yellow]warning:[/yellow] SuperLink without TLS or node authentication (--insecure)")
    console.print(f"SuperLink on {host}:{port}; Flower connection '{CONNECTION}' in {state / 'flwr'}")
    watcher = AuthWatcher(AuditLog(state / AUDIT_FILE), log_file=state / "superlink.log")
    proc = subprocess.Popen(  # a fixed executable and arguments, no shell
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=flwr_env(state), text=True, bufsize=1
    )
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            watcher.feed(line)
    except KeyboardInterrupt:
        proc.terminate()
    finally:
        watcher.close()
        code = proc.wait()
    raise typer.Exit(code if code > 0 else 0)


@server_app.command("run")
def run(
    state: StateOpt,
    app: Annotated[Path, Opt(help="The Flower app (this project).")] = PROJECT,
    rounds: Annotated[int | None, Opt(help="Training rounds (default: the app's config).")] = None,
    run_config: Annotated[str, Opt(help='More run-config keys, e.g. "dp-epsilon=3 min-fit-banks=3".')] = "",
    checkpoint_dir: Annotated[
        Path | None, Opt(help="Checkpoints of this run (default <state>/checkpoints; same dir: resume).")
    ] = None,
) -> None:
    """Launch a training run on the SuperLink of `start`; rerun it after a crash to resume."""
    if not (state / "flwr" / "config.toml").is_file():
        raise ServerSetupError(
            f"{state / 'flwr' / 'config.toml'}: missing; start the server with this --state"
        )
    command = run_command(
        state=state, app=app, rounds=rounds, run_config=run_config, checkpoint_dir=checkpoint_dir
    )
    code = subprocess.call(command, env=flwr_env(state))  # a fixed executable, no shell
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the `server` command group to the `fedfraud` command."""
    app.add_typer(server_app, name="server")
