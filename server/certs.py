"""The consortium's certificates and the banks' identities: CA, server TLS certificate, SuperNode keys.

Formats are the ones Flower 1.42 loads: `flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`
take PEM files (uvicorn); `flower-supernode --auth-supernode-private-key` takes an EC private key in
OpenSSH format (`load_ssh_private_key`), and `flwr supernode register` an OpenSSH EC public key on a
NIST curve (`load_ssh_public_key`). Private keys are written 0600, all-or-nothing, never overwritten
unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.keyfiles import (
    PRIVATE_MODE,
    PUBLIC_MODE,
    CertError,
    backup,
    read_bytes,
    refuse_existing,
    write_private,
    write_public,
)
from server.keyinfo import (
    fingerprint_pem,
    inspect,
    key_fingerprint,
    load_certificate,
    load_private_key,
    san_strings,
    ssh_fingerprint,
)

__all__ = [
    "CertError",
    "Rotation",
    "create_bank_key",
    "fingerprint_pem",
    "init_ca",
    "inspect",
    "issue_server_cert",
    "key_fingerprint",
    "rotate_bank_key",
    "rotate_server_cert",
    "ssh_fingerprint",
]

logger = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
LOOPBACK_SANS = ("127.0.0.1", "localhost")  # the SuperLink's own SuperExec connects over loopback
_CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_BANK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Rotation(NamedTuple):
    """The files written by a rotation and the timestamped backups of the files they replaced."""

    current: tuple[Path, Path]
    backups: tuple[Path, Path]


def _curve() -> ec.EllipticCurve:
    return ec.SECP384R1()  # the curve Flower's examples and docs use for node keys


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int, what: str) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise CertError(f"{what}: days must be at least 1, got {days}")
    now = dt.datetime.now(dt.UTC)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=days)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def parse_san(value: str) -> x509.GeneralName:
    """One SAN: an IP address becomes an IP SAN, a valid host name a DNS SAN; anything else is refused."""
    text = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    host = text[2:] if text.startswith("*.") else text
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise CertError(f"SAN {value!r}: not an IP address or a valid DNS name")
    if labels[-1].isdigit():
        raise CertError(f"SAN {value!r}: looks like an IP address but is not a valid one")
    return x509.DNSName(text.lower())


def init_ca(
    directory: Path, *, name: str = "fedfraud consortium CA", days: int = 3650, overwrite: bool = False
) -> Path:
    """Create the consortium CA (`ca.crt` PEM, `ca.key` 0600) in `directory`; returns the ca.crt path."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    refuse_existing([cert_path, key_path], overwrite=overwrite)
    not_before, not_after = _validity(days, str(cert_path))
    key = ec.generate_private_key(_curve())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(key_path, _pem_key(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    logger.info("created CA %r -> %s (key %s, valid until %s)", name, cert_path, key_path, not_after.date())
    return cert_path


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key in `directory`, checked to belong together."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    cert = load_certificate(cert_path, "CA certificate (run `fedfraud certs init-ca` first)")
    key = load_private_key(key_path, "CA private key (run `fedfraud certs init-ca` first)")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: CA key is not an EC key")
    if cert.public_key() != key.public_key():
        raise CertError(f"{key_path}: does not match the CA certificate {cert_path}")
    return cert, key


def issue_server_cert(
    directory: Path,
    *,
    sans: Sequence[str],
    days: int = 397,
    overwrite: bool = False,
    include_loopback: bool = True,
) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS certificate (`server.pem`, `server.key` 0600) signed by `directory`'s CA."""
    cert_path, key_path = directory / SERVER_CERT, directory / SERVER_KEY
    names = list(dict.fromkeys([s.strip() for s in sans if s.strip()]))
    if not names:
        raise CertError(f"{cert_path}: at least one SAN (the address banks connect to) is required")
    names += [s for s in LOOPBACK_SANS if include_loopback and s not in names]
    general = [parse_san(s) for s in names]
    refuse_existing([cert_path, key_path], overwrite=overwrite)
    ca_cert, ca_key = load_ca(directory)
    not_before, not_after = _validity(days, str(cert_path))
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(_curve())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private(key_path, _pem_key(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    logger.info("issued %s for %s (valid until %s)", cert_path, ", ".join(names), not_after)
    return cert_path, key_path


def bank_key_paths(directory: Path, bank_id: str) -> tuple[Path, Path]:
    """Where a bank's private key and public key live: `directory/<bank_id>` and `<bank_id>.pub`."""
    if not _BANK_ID.match(bank_id) or bank_id.endswith(".pub"):
        raise CertError(
            f"bank id {bank_id!r}: use 1-64 letters, digits, '.', '_', '-' (first a letter or digit)"
        )
    return directory / bank_id, directory / f"{bank_id}.pub"


def create_bank_key(directory: Path, bank_id: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a bank's SuperNode identity: an EC P-384 key pair in OpenSSH format (private 0600)."""
    private_path, public_path = bank_key_paths(directory, bank_id)
    refuse_existing([private_path, public_path], overwrite=overwrite)
    key = ec.generate_private_key(_curve())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_private(private_path, private)
    write_public(public_path, public + f" fedfraud:{bank_id}\n".encode())
    logger.info("created key for bank %s: %s (%s)", bank_id, public_path, ssh_fingerprint(key.public_key()))
    return private_path, public_path


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


def rotate_server_cert(
    directory: Path, *, sans: Sequence[str] | None = None, days: int = 397, include_loopback: bool = True
) -> Rotation:
    """Back up `server.pem`/`server.key` and issue a new pair (same SANs by default)."""
    cert_path, key_path = directory / SERVER_CERT, directory / SERVER_KEY
    old = load_certificate(cert_path, "server certificate to rotate")
    read_bytes(key_path, "server private key to rotate")
    load_ca(directory)  # fail before touching anything
    if sans is None:
        sans = san_strings(old)
    stamp = _stamp()
    backups = (
        backup(cert_path, mode=PUBLIC_MODE, stamp=stamp),
        backup(key_path, mode=PRIVATE_MODE, stamp=stamp),
    )
    current = issue_server_cert(
        directory, sans=sans, days=days, overwrite=True, include_loopback=include_loopback
    )
    return Rotation(current, backups)


def rotate_bank_key(directory: Path, bank_id: str) -> Rotation:
    """Back up a bank's key pair (timestamped, private 0600) and create a new one; register it again."""
    private_path, public_path = bank_key_paths(directory, bank_id)
    load_private_key(private_path, f"private key of bank {bank_id} to rotate")
    read_bytes(public_path, f"public key of bank {bank_id} to rotate")
    stamp = _stamp()
    backups = (
        backup(private_path, mode=PRIVATE_MODE, stamp=stamp),
        backup(public_path, mode=PUBLIC_MODE, stamp=stamp),
    )
    current = create_bank_key(directory, bank_id, overwrite=True)
    return Rotation(current, backups)
