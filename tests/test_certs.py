"""Certificates and bank identities: formats Flower loads, file modes, overwrite rules, rotation, TLS."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication
from typer.testing import CliRunner

from server import certs, certs_cli
from server.certs import CertError
from simulations import cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    certs.init_ca(tmp_path / "ca")
    return tmp_path / "ca"


def test_init_ca_writes_self_signed_ca_with_private_key_0600(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # a permissive umask must not widen the key's mode
    try:
        crt = certs.init_ca(tmp_path, name="Test CA", days=30)
    finally:
        os.umask(old_umask)
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=Test CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(cert)
    assert _mode(tmp_path / "ca.key") == 0o600
    assert _mode(crt) == 0o644
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]  # no temp files left


def test_existing_files_are_never_overwritten_silently(ca_dir: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(CertError, match=r"ca\.crt: already exists"):
        certs.init_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() == before
    certs.init_ca(ca_dir, overwrite=True)
    assert (ca_dir / "ca.key").read_bytes() != before

    certs.issue_server_cert(ca_dir, sans=["127.0.0.1"])
    with pytest.raises(CertError, match=r"server\.pem: already exists"):
        certs.issue_server_cert(ca_dir, sans=["127.0.0.1"])
    certs.create_bank_key(ca_dir, "bank-1")
    with pytest.raises(CertError, match="bank-1: already exists"):
        certs.create_bank_key(ca_dir, "bank-1")


def test_server_cert_has_ip_and_dns_sans_and_is_signed_by_the_ca(ca_dir: Path) -> None:
    cert_path, key_path = certs.issue_server_cert(ca_dir, sans=["10.1.2.3", "Link.Consortium.example", "::1"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("127.0.0.1"),  # the SuperLink's SuperExec connects over loopback
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.consortium.example", "localhost"}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(key_path) == 0o600
    assert certs.inspect(cert_path)["subject"] == "CN=10.1.2.3"


@pytest.mark.parametrize("san", ["bad_name!", "10.0.0.300", "-lead.example", "a..b", ""])
def test_bad_san_is_refused_before_anything_is_written(ca_dir: Path, san: str) -> None:
    with pytest.raises(CertError, match=r"SAN|at least one SAN"):
        certs.issue_server_cert(ca_dir, sans=[san], include_loopback=False)
    assert not (ca_dir / "server.pem").exists()
    assert not (ca_dir / "server.key").exists()


def test_missing_or_mismatched_ca_is_a_clear_error(tmp_path: Path, ca_dir: Path) -> None:
    with pytest.raises(CertError, match=r"ca\.crt: CA certificate .*not found"):
        certs.issue_server_cert(tmp_path / "empty", sans=["127.0.0.1"])
    other = tmp_path / "other"
    certs.init_ca(other)
    shutil.copy(other / "ca.key", ca_dir / "ca.key")
    with pytest.raises(CertError, match=r"ca\.key: does not match"):
        certs.issue_server_cert(ca_dir, sans=["127.0.0.1"])
    (ca_dir / "ca.key").write_text("garbage")
    with pytest.raises(CertError, match=r"ca\.key: unreadable"):
        certs.issue_server_cert(ca_dir, sans=["127.0.0.1"])


def test_bank_key_is_in_the_formats_flower_loads(tmp_path: Path) -> None:
    private, public = certs.create_bank_key(tmp_path, "bank-7")
    assert (private.name, public.name) == ("bank-7", "bank-7.pub")
    assert _mode(private) == 0o600
    # the exact loaders of `flower-supernode --auth-supernode-private-key` and `flwr supernode register`
    args = argparse.Namespace(auth_supernode_private_key=str(private), auth_supernode_public_key=None)
    loaded = _try_setup_client_authentication(args)
    assert loaded is not None
    key, derived_public = loaded
    assert isinstance(key.curve, ec.SECP384R1)
    registered_pem = try_load_public_key(public)
    assert certs.fingerprint_pem(registered_pem) == certs.key_fingerprint(public)
    assert certs.ssh_fingerprint(derived_public) == certs.key_fingerprint(public)
    # the SuperLink logs a refused node's key as a bytes repr: b'-----BEGIN PUBLIC KEY-----\\nMHY...'
    assert certs.fingerprint_pem(repr(registered_pem)[2:-1]) == certs.key_fingerprint(public)
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert public.read_text().rstrip().endswith("fedfraud:bank-7")


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    private, public = certs.create_bank_key(tmp_path, "b")
    assert certs.key_fingerprint(private) == certs.key_fingerprint(public)
    assert certs.key_fingerprint(public).startswith("SHA256:")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    out = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == certs.key_fingerprint(public)


@pytest.mark.parametrize("bank_id", ["", "../escape", "a/b", ".hidden", "x.pub", "a" * 65])
def test_bad_bank_id_is_refused(tmp_path: Path, bank_id: str) -> None:
    with pytest.raises(CertError, match="bank id"):
        certs.create_bank_key(tmp_path, bank_id)
    assert list(tmp_path.iterdir()) == []


def test_inspect_reports_certificates_and_keys(ca_dir: Path) -> None:
    cert_path, _ = certs.issue_server_cert(ca_dir, sans=["link.example"], days=10)
    info = certs.inspect(cert_path)
    assert info["kind"] == "certificate"
    assert info["issuer"] == "CN=fedfraud consortium CA"
    assert info["sans"].split(", ") == ["link.example", "127.0.0.1", "localhost"]
    assert info["days_left"] in {"9", "10"}
    assert info["key"] == "EC secp384r1"
    assert certs.inspect(ca_dir / "ca.crt")["is_ca"] == "true"
    private, public = certs.create_bank_key(ca_dir, "bank-1")
    priv_info, pub_info = certs.inspect(private), certs.inspect(public)
    assert (priv_info["kind"], priv_info["format"], priv_info["permissions"]) == (
        "private key",
        "OpenSSH",
        "0600",
    )
    assert (pub_info["kind"], pub_info["curve"], pub_info["comment"]) == (
        "public key",
        "secp384r1",
        "fedfraud:bank-1",
    )
    assert priv_info["fingerprint"] == pub_info["fingerprint"]
    (ca_dir / "junk").write_text("hello")
    with pytest.raises(CertError, match="junk: unreadable"):
        certs.inspect(ca_dir / "junk")
    with pytest.raises(CertError, match="nope: certificate or key not found"):
        certs.inspect(ca_dir / "nope")


def test_rotation_keeps_timestamped_backups(ca_dir: Path) -> None:
    with pytest.raises(CertError, match=r"server\.pem: server certificate to rotate not found"):
        certs.rotate_server_cert(ca_dir)
    cert_path, key_path = certs.issue_server_cert(ca_dir, sans=["link.example", "10.0.0.1"])
    old_cert, old_key = cert_path.read_bytes(), key_path.read_bytes()
    rotation = certs.rotate_server_cert(ca_dir)
    assert rotation.current == (cert_path, key_path)
    assert rotation.backups[0].read_bytes() == old_cert
    assert rotation.backups[1].read_bytes() == old_key
    assert _mode(rotation.backups[1]) == 0o600
    assert key_path.read_bytes() != old_key
    assert certs.inspect(cert_path)["sans"] == certs.inspect(rotation.backups[0])["sans"]
    assert certs.inspect(cert_path)["subject"] == "CN=link.example"

    _, public = certs.create_bank_key(ca_dir, "bank-2")
    old_fp = certs.key_fingerprint(public)
    bank_rotation = certs.rotate_bank_key(ca_dir, "bank-2")
    assert certs.key_fingerprint(public) != old_fp
    assert certs.key_fingerprint(bank_rotation.backups[1]) == old_fp
    assert _mode(bank_rotation.backups[0]) == 0o600
    assert bank_rotation.backups[0].name.startswith("bank-2.") and bank_rotation.backups[0].suffix == ".bak"


def _tls_handshake(cert: Path, key: Path, cafile: Path, host: str) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
                client_ctx.wrap_socket(sock, server_hostname=host),
            ):
                pass
        finally:
            thread.join(timeout=5)


def test_tls_with_the_consortium_ca_verifies_and_a_foreign_ca_does_not(tmp_path: Path, ca_dir: Path) -> None:
    cert, key = certs.issue_server_cert(ca_dir, sans=["link.example"])
    _tls_handshake(cert, key, ca_dir / "ca.crt", "127.0.0.1")
    _tls_handshake(cert, key, ca_dir / "ca.crt", "localhost")
    foreign = certs.init_ca(tmp_path / "foreign")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(cert, key, foreign, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|match"):
        _tls_handshake(cert, key, ca_dir / "ca.crt", "other.example")


def test_certs_cli_creates_inspects_and_refuses(tmp_path: Path) -> None:
    app = typer.Typer()
    certs_cli.register(app)
    runner = CliRunner()
    d = str(tmp_path)
    assert runner.invoke(app, ["certs", "init-ca", "--dir", d]).exit_code == 0
    result = runner.invoke(app, ["certs", "server", "--dir", d, "--san", "10.0.0.9", "--san", "link.example"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["certs", "bank", "--dir", d, "--bank-id", "b1"]).exit_code == 0
    result = runner.invoke(app, ["certs", "inspect", str(tmp_path / "b1.pub")])
    assert certs.key_fingerprint(tmp_path / "b1.pub") in result.output
    again = runner.invoke(app, ["certs", "init-ca", "--dir", d])
    assert isinstance(again.exception, CertError)
    refused = runner.invoke(app, ["certs", "rotate", "--dir", d, "--server"], input="n\n")
    assert refused.exit_code != 0
    assert not list(tmp_path.glob("*.bak"))
    assert runner.invoke(app, ["certs", "rotate", "--dir", d, "--server", "--yes"]).exit_code == 0
    assert len(list(tmp_path.glob("server.key.*.bak"))) == 1


def test_fedfraud_main_maps_cert_errors_to_exit_code_2(tmp_path: Path, monkeypatch, capsys) -> None:
    certs.init_ca(tmp_path)
    monkeypatch.setattr("sys.argv", ["fedfraud", "certs", "init-ca", "--dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err
