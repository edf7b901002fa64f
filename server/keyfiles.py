"""Writing key and certificate files safely: all-or-nothing, 0600 for secrets, never silently overwritten."""

from __future__ import annotations

import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


class CertError(Exception):
    """A certificate or key could not be created, read or rotated; the message names the file."""


def refuse_existing(paths: list[Path], *, overwrite: bool) -> None:
    """Raise CertError if any of the paths exists and overwriting was not asked for."""
    if overwrite:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise CertError(f"{path}: already exists; refusing to overwrite (pass overwrite / --force)")


def write_file(path: Path, data: bytes, *, mode: int) -> Path:
    """Write `data` to a temporary file created with `mode`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # the umask cannot widen or narrow it
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CertError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    return path


def write_private(path: Path, data: bytes) -> Path:
    """Write a secret (private key) readable by its owner only (0600)."""
    return write_file(path, data, mode=PRIVATE_MODE)


def write_public(path: Path, data: bytes) -> Path:
    """Write a public file (certificate, public key), world-readable (0644)."""
    return write_file(path, data, mode=PUBLIC_MODE)


def read_bytes(path: Path, what: str) -> bytes:
    """Read a file, raising CertError that names it (and what it should be) when it is missing."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise CertError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc


def backup(path: Path, *, mode: int, stamp: str | None = None) -> Path:
    """Copy `path` to `<path>.<UTC timestamp>.bak` with `mode` (0600 for keys)."""
    data = read_bytes(path, "file to rotate")
    stamp = stamp or datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.{stamp}.bak")
    refuse_existing([target], overwrite=False)
    write_file(target, data, mode=mode)
    logger.info("backed up %s -> %s", path, target)
    return target


def permissions(path: Path) -> str:
    """The file's permission bits as an octal string, e.g. '0600'."""
    return f"{stat.S_IMODE(path.stat().st_mode):04o}"
