"""Reading certificates and keys back: loading with clear errors, fingerprints, `fedfraud certs inspect`."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.keyfiles import CertError, permissions, read_bytes

_PRIVATE_MARKERS = (b"PRIVATE KEY-----",)


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    """A PEM X.509 certificate; CertError naming the file when it is missing or unreadable."""
    data = read_bytes(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM certificate ({exc})") from exc


def load_private_key(path: Path, what: str = "private key") -> Any:
    """A private key in OpenSSH or PEM (PKCS#8 / SEC1) format; CertError naming the file otherwise."""
    data = read_bytes(path, what)
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            return serialization.load_ssh_private_key(data, password=None)
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{path}: unreadable {what} ({exc})") from exc


def load_public_key(path: Path, what: str = "public key") -> Any:
    """A public key from an OpenSSH `.pub`, a PEM public key, a private key or a certificate file."""
    data = read_bytes(path, what)
    if b"CERTIFICATE-----" in data:
        return load_certificate(path, what).public_key()
    if any(marker in data for marker in _PRIVATE_MARKERS):
        return load_private_key(path, what).public_key()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_public_key(data)
        return serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{path}: unreadable {what} ({exc})") from exc


def ssh_fingerprint(public_key: Any) -> str:
    """`SHA256:<base64>` of the key's OpenSSH wire blob, exactly as `ssh-keygen -l` prints it."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def fingerprint_pem(public_key_pem: bytes | str) -> str:
    """The `SHA256:` fingerprint of a PEM public key, the form in which the SuperLink stores node keys.

    Also accepts the PEM as the SuperLink logs a refused node's key (a repr with literal backslash-n).
    """
    text = public_key_pem.decode() if isinstance(public_key_pem, bytes) else public_key_pem
    text = text.replace("\\n", "\n")
    try:
        return ssh_fingerprint(serialization.load_pem_public_key(text.encode()))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertError(f"not a PEM public key ({exc})") from exc


def key_fingerprint(public_key: Path) -> str:
    """The `SHA256:...` fingerprint (as `ssh-keygen -l`) of the key in a public or private key file."""
    return ssh_fingerprint(load_public_key(public_key))


def _cert_fingerprint(cert: x509.Certificate) -> str:
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _key_type(key: Any) -> dict[str, str]:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return {"type": "EC", "curve": key.curve.name, "bits": str(key.curve.key_size)}
    return {
        "type": type(key).__name__.removeprefix("_"),
        "curve": "",
        "bits": str(getattr(key, "key_size", "")),
    }


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds")


def san_strings(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS and IP subject alternative names, in their order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(g.value) for g in san if isinstance(g, x509.DNSName | x509.IPAddress)]


def _inspect_cert(path: Path) -> dict[str, str]:
    cert = load_certificate(path)
    sans = san_strings(cert)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    remaining = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    key = _key_type(cert.public_key())
    return {
        "path": str(path),
        "kind": "certificate",
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": ", ".join(sans),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "days_left": str(remaining.days),
        "is_ca": str(is_ca).lower(),
        "serial": f"{cert.serial_number:x}",
        "key": f"{key['type']} {key['curve']}".strip(),
        "fingerprint": _cert_fingerprint(cert),
        "key_fingerprint": ssh_fingerprint(cert.public_key()),
    }


def inspect(path: Path) -> dict[str, str]:
    """What a certificate or key file holds: subject/issuer/SANs/validity or type/curve, and fingerprints."""
    data = read_bytes(path, "certificate or key")
    if b"CERTIFICATE-----" in data:
        return _inspect_cert(path)
    private = any(marker in data for marker in _PRIVATE_MARKERS)
    key = load_private_key(path) if private else load_public_key(path)
    info = {"path": str(path), "kind": "private key" if private else "public key"}
    info |= _key_type(key)
    info["format"] = "OpenSSH" if b"OPENSSH" in data or data.startswith(b"ecdsa-") else "PEM"
    info["fingerprint"] = ssh_fingerprint(key.public_key() if private else key)
    if not private and not data.lstrip().startswith(b"-----"):
        comment = data.split(maxsplit=2)[2:]
        info["comment"] = comment[0].decode(errors="replace").strip() if comment else ""
    info["permissions"] = permissions(path)
    return info
