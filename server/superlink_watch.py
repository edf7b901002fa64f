"""Reads the SuperLink's output: keeps it in a log file and writes refused bank keys to the audit log.

Flower 1.42 logs a refused SuperNode as `[/v1/fleet/activate-node][ApiError:2004] Attempted to register
SuperNode with public key: b'-----BEGIN PUBLIC KEY-----...', exception: No SuperNode found ...` (an unknown or
revoked key) and answers a bad signature with HTTP 401; both become `auth_failed` events with the key's
fingerprint (when logged) and the reason.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import IO, Any

from server.audit import AuditLog
from server.keyinfo import fingerprint_pem

logger = logging.getLogger(__name__)
_REFUSED = re.compile(
    r"\[(?P<path>/v1/fleet/[\w-]+)\]\[ApiError:(?P<code>\d+)\] Attempted to register SuperNode with "
    r"public key: (?P<key>b'[^']*')(?:, exception: (?P<why>.*))?"
)
_UNAUTHORIZED = re.compile(r'(?P<peer>[\d.:\[\]a-fA-F]+) - "POST (?P<path>/v1/fleet/[\w-]+) HTTP/[\d.]+" 401')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_auth_failure(line: str) -> dict[str, Any] | None:
    """The `auth_failed` fields for a SuperLink log line that reports a refused node, else None."""
    text = _ANSI.sub("", line)
    if (match := _REFUSED.search(text)) is not None:
        fingerprint = ""
        try:
            fingerprint = fingerprint_pem(ast.literal_eval(match["key"]))
        except Exception:  # a key that does not parse is still a refusal worth logging
            logger.debug("unparsable public key in the SuperLink log: %s", match["key"][:80])
        return {
            "api": match["path"],
            "error_code": int(match["code"]),
            "key_fingerprint": fingerprint,
            "reason": (match["why"] or "").strip() or "refused",
        }
    if (match := _UNAUTHORIZED.search(text)) is not None:
        return {
            "api": match["path"],
            "peer": match["peer"],
            "reason": "invalid SuperNode authentication (401)",
        }
    return None


class AuthWatcher:
    """Feed it the SuperLink's output line by line: it appends each line to `log_file` and audits refusals."""

    def __init__(self, audit: AuditLog, *, log_file: Path) -> None:
        self.audit = audit
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = log_file.open("a", buffering=1)

    def feed(self, line: str) -> dict[str, Any] | None:
        """Keep one line; returns the audit record when it reported a refused node."""
        self._log.write(line if line.endswith("\n") else line + "\n")
        fields = parse_auth_failure(line)
        return self.audit.write("auth_failed", **fields) if fields is not None else None

    def close(self) -> None:
        """Close the log file."""
        self._log.close()
