"""`fedfraud certs`: the consortium CA, the server certificate, bank keys, and bank registration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server import certs, registry

console = Console(stderr=True)
out_console = Console()
Opt = typer.Option

DirOpt = Annotated[Path, Opt("--dir", help="Directory holding ca.crt/ca.key, server.pem/server.key.")]
ForceOpt = Annotated[bool, Opt("--force", help="Overwrite existing files (no backup; see `rotate`).")]
ConnOpt = Annotated[str, Opt(help="SuperLink connection name in $FLWR_HOME/config.toml.")]
HomeOpt = Annotated[
    Path | None, Opt("--flwr-home", help="Flower's config directory (default: $FLWR_HOME or ~/.flwr).")
]

certs_app = typer.Typer(
    no_args_is_help=True, help="Consortium CA, server certificate, bank keys, registration."
)


@certs_app.command("init-ca")
def init_ca(
    directory: DirOpt,
    name: Annotated[str, Opt(help="The CA's common name.")] = "fedfraud consortium CA",
    days: Annotated[int, Opt(help="Validity in days.")] = 3650,
    force: ForceOpt = False,
) -> None:
    """Create the consortium CA: ca.crt (give it to every bank) and ca.key (0600; keep it offline)."""
    path = certs.init_ca(directory, name=name, days=days, overwrite=force)
    console.print(f"CA certificate {path}, key {directory / certs.CA_KEY} (0600)")


@certs_app.command("server")
def server(
    directory: DirOpt,
    san: Annotated[list[str], Opt(help="Host name or IP address the banks connect to (repeat).")],
    days: Annotated[int, Opt(help="Validity in days.")] = 397,
    loopback: Annotated[
        bool, Opt(help="Also add 127.0.0.1 and localhost (the SuperLink needs them).")
    ] = True,
    force: ForceOpt = False,
) -> None:
    """Issue the SuperLink's TLS certificate (server.pem, server.key 0600), signed by the CA in --dir."""
    cert, key = certs.issue_server_cert(
        directory, sans=san, days=days, overwrite=force, include_loopback=loopback
    )
    console.print(f"server certificate {cert} ({certs.inspect(cert)['sans']}), key {key} (0600)")


@certs_app.command("bank")
def bank(
    directory: Annotated[Path, Opt("--dir", help="Directory for the bank's key pair.")],
    bank_id: Annotated[str, Opt(help="The bank's name; the files are <bank-id> and <bank-id>.pub.")],
    force: ForceOpt = False,
) -> None:
    """Create a bank's SuperNode key pair (EC P-384, OpenSSH); send only the .pub to the consortium."""
    private, public = certs.create_bank_key(directory, bank_id, overwrite=force)
    console.print(f"private key {private} (0600, stays at the bank), public key {public}")
    console.print(f"fingerprint {certs.key_fingerprint(public)} (confirm it with the consortium out of band)")


@certs_app.command("inspect")
def inspect(path: Annotated[Path, typer.Argument(help="A certificate or key file.")]) -> None:
    """Show a certificate's subject, issuer, SANs, validity, fingerprint; or a key's type and fingerprint."""
    table = Table(show_header=False)
    for key, value in certs.inspect(path).items():
        table.add_row(key, value)
    out_console.print(table)


@certs_app.command("rotate")
def rotate(
    *,
    directory: DirOpt,
    server_cert: Annotated[bool, Opt("--server", help="Rotate server.pem/server.key.")] = False,
    bank_id: Annotated[str | None, Opt(help="Rotate this bank's key pair instead.")] = None,
    san: Annotated[
        list[str] | None, Opt(help="New SANs for --server (default: keep the current ones).")
    ] = None,
    days: Annotated[int, Opt(help="Validity of the new server certificate in days.")] = 397,
    yes: Annotated[bool, Opt("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Replace the server certificate or a bank key, keeping the old files as timestamped backups."""
    if server_cert == (bank_id is not None):
        raise typer.BadParameter("give exactly one of --server or --bank-id")
    what = "the server certificate" if server_cert else f"the key of bank {bank_id}"
    if not yes:
        typer.confirm(f"Replace {what} in {directory}?", abort=True)
    if server_cert:
        rotation = certs.rotate_server_cert(directory, sans=san or None, days=days)
        console.print("restart the SuperLink to serve the new certificate")
    else:
        rotation = certs.rotate_bank_key(directory, str(bank_id))
        fingerprint = certs.key_fingerprint(rotation.current[1])
        console.print(
            f"new fingerprint {fingerprint}: register {rotation.current[1]}, restart the SuperNode with "
            f"{rotation.current[0]}, then revoke the old node id"
        )
    console.print(
        f"wrote {', '.join(map(str, rotation.current))}; backups {', '.join(map(str, rotation.backups))}"
    )


@certs_app.command("register")
def register_(
    public_key: Annotated[Path, Opt(help="The bank's OpenSSH public key (<bank-id>.pub).")],
    connection: ConnOpt,
    flwr_home: HomeOpt = None,
) -> None:
    """Register a bank's public key with the running SuperLink; prints the node id."""
    fingerprint = registry.check_public_key(public_key)
    node_id = registry.register_bank(public_key, connection=connection, flwr_home=flwr_home)
    console.print(f"registered {public_key} ({fingerprint}) as node")
    out_console.print(node_id)


@certs_app.command("revoke")
def revoke(
    node_id: Annotated[str, Opt(help="The node id printed by `register`.")],
    connection: ConnOpt,
    flwr_home: HomeOpt = None,
) -> None:
    """Revoke a bank: the SuperLink refuses its key from now on (that key can never be registered again)."""
    registry.revoke_bank(node_id, connection=connection, flwr_home=flwr_home)
    console.print(f"revoked node {node_id}")


@certs_app.command("list")
def list_(
    connection: ConnOpt,
    flwr_home: HomeOpt = None,
    revoked: Annotated[bool, Opt("--revoked/--no-revoked", help="Include revoked nodes.")] = True,
) -> None:
    """List the nodes registered with the SuperLink and their status."""
    banks = registry.list_banks(connection=connection, flwr_home=flwr_home, include_revoked=revoked)
    table = Table("node id", "status", "registered", "online since", "revoked")
    for b in banks:
        table.add_row(b["node_id"], b["status"], b["registered_at"], b["online_at"], b["revoked_at"])
    out_console.print(table)


def register(app: typer.Typer) -> None:
    """Add the `certs` command group to the `fedfraud` command."""
    app.add_typer(certs_app, name="certs")
