"""Registering and revoking banks' SuperNode keys with a running SuperLink, through the `flwr` CLI.

`flwr supernode register|unregister|list CONNECTION --format json` talk to the SuperLink's Control API;
the connection (address, `root-certificates`) is read from `$FLWR_HOME/config.toml`. In JSON mode the
CLI exits 0 even on failure, so the `success` field decides. A revoked (unregistered) key can never be
registered again: the SuperLink answers "Public key already in use"; readmitting a bank takes a new key.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from server.keyfiles import CertError, read_bytes, write_public
from server.keyinfo import load_public_key, ssh_fingerprint

logger = logging.getLogger(__name__)

_TIMEOUT_S = 60.0
_NIST = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_NODE_ID = re.compile(r"^[0-9]{1,20}$")


class RegistryError(Exception):
    """The SuperLink refused a registration request, or could not be reached; the message says why."""


def flwr_executable() -> str:
    """The `flwr` CLI next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name("flwr")
    found = str(local) if local.exists() else shutil.which("flwr")
    if not found:
        raise RegistryError("the `flwr` command was not found next to Python or on PATH")
    return found


def write_connection(
    flwr_home: Path, name: str, address: str, *, root_certificates: Path | None, default: bool = True
) -> Path:
    """Write `$FLWR_HOME/config.toml` with one TLS SuperLink connection (`root_certificates`: the CA)."""
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise RegistryError(f"connection name {name!r}: use letters, digits, '_' or '-'")
    lines = ["[superlink]", f"default = {json.dumps(name)}"] if default else []
    lines += [f"[superlink.{name}]", f"address = {json.dumps(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates.resolve()))}")
    return write_public(flwr_home / "config.toml", ("\n".join(lines) + "\n").encode())


def _env(flwr_home: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def config_path(flwr_home: Path | None = None) -> Path:
    """Flower's `config.toml`: under `flwr_home`, else `$FLWR_HOME`, else `~/.flwr`."""
    home = flwr_home or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    return home / "config.toml"


def _connection(name: str, flwr_home: Path | None) -> dict[str, Any]:
    try:
        config = tomllib.loads(config_path(flwr_home).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    conn = config.get("superlink", {}).get(name, {})
    return conn if isinstance(conn, dict) else {}


def diagnose(connection: str, flwr_home: Path | None = None) -> str:
    """Why a connection fails at the transport level: refused, TLS verification, or '' when it connects."""
    conn = _connection(connection, flwr_home)
    host, _, port = str(conn.get("address", "")).rpartition(":")
    if not host or not port.isdigit():
        return f"connection {connection!r} has no usable 'address' in config.toml"
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or exc})"
    with sock:
        if conn.get("insecure"):
            return ""
        context = ssl.create_default_context(cafile=conn.get("root-certificates"))
        try:
            with context.wrap_socket(sock, server_hostname=host.strip("[]")):
                return ""
        except (ssl.SSLError, ssl.CertificateError) as exc:
            return f"TLS to {host}:{port} failed ({exc}); is `root-certificates` the consortium CA?"
        except OSError as exc:
            return f"TLS to {host}:{port} failed ({exc})"


def _require_connection(name: str, flwr_home: Path | None) -> None:
    path = config_path(flwr_home)
    if not path.is_file():
        raise RegistryError(f"{path}: Flower configuration not found (it names the SuperLink connections)")
    if not _connection(name, flwr_home).get("address"):
        raise RegistryError(f"{path}: no [superlink.{name}] connection with an 'address'")


def _run_flwr(args: list[str], *, connection: str, flwr_home: Path | None) -> dict[str, Any]:
    _require_connection(connection, flwr_home)
    command = [flwr_executable(), "supernode", *args, connection, "--format", "json"]
    try:
        done = subprocess.run(  # a fixed executable, no shell
            command, capture_output=True, text=True, env=_env(flwr_home), timeout=_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RegistryError(f"`{' '.join(command)}` timed out after {_TIMEOUT_S:.0f} s") from exc
    start = done.stdout.find("{")
    try:
        answer = json.loads(done.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if answer.get("success") is True:
        return dict(answer)
    message = answer.get("error-message") or done.stderr.strip() or done.stdout.strip()
    message = " ".join(line for line in str(message).split("\n") if not line.startswith("Using SuperLink"))
    if "unavailable" in message and (why := diagnose(connection, flwr_home)):
        message = f"{message.strip()} ({why})"
    raise RegistryError(f"flwr supernode {args[0]} via {connection!r}: {message.strip()}")


def check_public_key(public_key: Path) -> str:
    """Check a file is an OpenSSH EC public key on a NIST curve (what Flower accepts); its fingerprint."""
    key = load_public_key(public_key)
    if not read_bytes(public_key, "public key").lstrip().startswith(b"ecdsa-sha2-nistp"):
        raise CertError(f"{public_key}: not an OpenSSH public key (`ecdsa-sha2-nistp384 AAAA...`)")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST):
        raise CertError(f"{public_key}: not an EC public key on a NIST curve (P-256/384/521)")
    return ssh_fingerprint(key)


def register_bank(public_key: Path, *, connection: str, flwr_home: Path | None = None) -> str:
    """Register a bank's SuperNode public key with the SuperLink; returns the node id Flower assigned."""
    fingerprint = check_public_key(public_key)
    answer = _run_flwr(["register", str(public_key.resolve())], connection=connection, flwr_home=flwr_home)
    node_id = str(answer["node-id"])
    logger.info("registered %s (%s) as node %s", public_key, fingerprint, node_id)
    return node_id


def revoke_bank(node_id: str, *, connection: str, flwr_home: Path | None = None) -> None:
    """Unregister a node: the SuperLink refuses its key from now on (and never registers that key again)."""
    if not _NODE_ID.match(str(node_id)):
        raise RegistryError(f"node id {node_id!r}: expected the decimal id that `register` printed")
    _run_flwr(["unregister", str(node_id)], connection=connection, flwr_home=flwr_home)
    logger.info("revoked node %s", node_id)


def list_banks(
    *, connection: str, flwr_home: Path | None = None, include_revoked: bool = True
) -> list[dict[str, Any]]:
    """The SuperLink's nodes: node_id, status (registered/online/offline/unregistered) and timestamps."""
    answer = _run_flwr(["list"], connection=connection, flwr_home=flwr_home)
    banks = [
        {
            "node_id": str(node["node-id"]),
            "status": node.get("status", ""),
            "owner": node.get("owner-name", ""),
            "registered_at": node.get("created-at", ""),
            "online_at": node.get("online-at", ""),
            "offline_at": node.get("offline-at", ""),
            "revoked_at": node.get("deleted-at", ""),
        }
        for node in answer.get("nodes", [])
    ]
    return [b for b in banks if include_revoked or b["status"] != "unregistered"]
