"""A bank's own privacy ledger on its disk: what it spent, round by round, kept across runs and restarts."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class BankLedger:
    """JSON file: the bank's DP accountant state, its training rounds and the entity releases it joined."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        """The saved accountant state (empty when the bank has not trained yet)."""
        try:
            return dict(self._document().get("state", {}))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{self.path}: unreadable privacy ledger ({exc}); refusing to reset the budget"
            ) from exc

    def _document(self) -> dict[str, Any]:
        """The whole ledger file (empty when there is none yet)."""
        if not self.path.exists():
            return {}
        try:
            return dict(json.loads(self.path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{self.path}: unreadable privacy ledger ({exc}); refusing to overwrite it"
            ) from exc

    def _write(self, document: dict[str, Any]) -> None:
        """Replace the file atomically: a crash never leaves half a ledger."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(document, indent=1))
        os.replace(tmp, self.path)

    def save(self, state: dict[str, Any], *, declined: bool) -> None:
        """Record the DP-SGD accountant state after a training round (other sections are kept)."""
        document = self._document()
        entries = list(document.get("rounds", []))
        entries.append(
            {"time": time.time(), "declined": declined, "epsilon": float(state.get("dp-epsilon-spent", 0.0))}
        )
        self._write({**document, "state": state, "rounds": entries})

    def releases(self) -> list[dict[str, Any]]:
        """The entity releases this bank contributed to (see clients/release_ledger.py)."""
        return [dict(entry) for entry in self._document().get("releases", [])]

    def save_releases(self, releases: list[dict[str, Any]]) -> None:
        """Record the bank's entity releases (other sections are kept)."""
        self._write({**self._document(), "releases": releases})
