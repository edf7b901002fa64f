"""Bank registration and revocation against a real SuperLink (TLS + SuperNode authentication)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server import certs, registry
from server.certs import CertError
from server.registry import RegistryError

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Link:
    """A running SuperLink, its PKI directory and a FLWR_HOME with a `consortium` TLS connection."""

    pki: Path
    flwr_home: Path
    port: int


def _wait_until_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"SuperLink exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.3)
            continue
        if "Uvicorn running" in log.read_text():
            return
        time.sleep(0.3)
    pytest.fail(f"SuperLink did not start within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the SuperLink and everything it started (its own process group, e.g. flower-superexec)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    root = tmp_path_factory.mktemp("superlink")
    pki = root / "pki"
    certs.init_ca(pki)
    certs.issue_server_cert(pki, sans=["127.0.0.1"])
    port = _free_port()
    flwr_home = root / "flwr-home"
    registry.write_connection(flwr_home, "consortium", f"127.0.0.1:{port}", root_certificates=pki / "ca.crt")
    log = root / "superlink.log"
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(root),
    }
    command = [
        str(VENV_BIN / "flower-superlink"),
        *("--ssl-ca-certfile", str(pki / "ca.crt")),
        *("--ssl-certfile", str(pki / "server.pem")),
        *("--ssl-keyfile", str(pki / "server.key")),
        "--enable-supernode-auth",
        *("--database", str(root / "superlink.db")),
        *("--host", "127.0.0.1", "--port", str(port)),
        "--disable-runtime-dependency-installation",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_until_listening(proc, port, log)
        yield Link(pki=pki, flwr_home=flwr_home, port=port)
    finally:
        _stop(proc)


pytestmark = pytest.mark.deployment


def test_register_list_revoke_a_bank(link: Link, tmp_path: Path) -> None:
    _, public = certs.create_bank_key(tmp_path, "bank-a")
    conn = {"connection": "consortium", "flwr_home": link.flwr_home}
    node_id = registry.register_bank(public, **conn)
    assert node_id.isdigit()
    listed = {b["node_id"]: b for b in registry.list_banks(**conn)}
    assert listed[node_id]["status"] == "registered"

    with pytest.raises(RegistryError, match="already in use"):
        registry.register_bank(public, **conn)

    registry.revoke_bank(node_id, **conn)
    listed = {b["node_id"]: b for b in registry.list_banks(**conn)}
    assert listed[node_id]["status"] == "unregistered"
    assert listed[node_id]["revoked_at"] not in {"", "N/A"}
    assert node_id not in {b["node_id"] for b in registry.list_banks(**conn, include_revoked=False)}
    # a revoked key stays revoked: Flower refuses to register it again; readmission takes a new key
    with pytest.raises(RegistryError, match="already in use"):
        registry.register_bank(public, **conn)
    with pytest.raises(RegistryError, match="not found"):
        registry.revoke_bank(node_id, **conn)


def test_revoke_checks_the_node_id(link: Link) -> None:
    with pytest.raises(RegistryError, match="decimal id"):
        registry.revoke_bank("bank-a", connection="consortium", flwr_home=link.flwr_home)


def test_wrong_ca_is_reported_as_a_tls_failure(link: Link, tmp_path: Path) -> None:
    foreign = certs.init_ca(tmp_path / "foreign")
    home = tmp_path / "home"
    registry.write_connection(home, "consortium", f"127.0.0.1:{link.port}", root_certificates=foreign)
    with pytest.raises(RegistryError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        registry.list_banks(connection="consortium", flwr_home=home)


def test_bad_key_or_config_fails_before_calling_flower(link: Link, tmp_path: Path) -> None:
    pem_pub = tmp_path / "key.pem"
    pem_pub.write_bytes((link.pki / "server.pem").read_bytes())
    with pytest.raises(CertError, match=r"key\.pem: not an OpenSSH public key"):
        registry.register_bank(pem_pub, connection="consortium", flwr_home=link.flwr_home)
    with pytest.raises(CertError, match=r"missing\.pub: public key not found"):
        registry.register_bank(tmp_path / "missing.pub", connection="consortium", flwr_home=link.flwr_home)
    with pytest.raises(RegistryError, match="Flower configuration not found"):
        registry.list_banks(connection="consortium", flwr_home=tmp_path / "nohome")
    assert not (tmp_path / "nohome").exists()  # flwr would have created a default config there
    with pytest.raises(RegistryError, match=r"no \[superlink\.other\] connection"):
        registry.list_banks(connection="other", flwr_home=link.flwr_home)


def test_unreachable_superlink_is_reported(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry.write_connection(home, "gone", f"127.0.0.1:{_free_port()}", root_certificates=None)
    with pytest.raises(RegistryError, match="cannot reach"):
        registry.list_banks(connection="gone", flwr_home=home)
