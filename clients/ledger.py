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
    """JSON file with the bank's DP accountant state and an append-only list of its training rounds."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        """The saved accountant state (empty when the bank has not trained yet)."""
        if not self.path.exists():
            return {}
        try:
            return dict(json.loads(self.path.read_text())["state"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{self.path}: unreadable privacy ledger ({exc}); refusing to reset the budget"
            ) from exc

    def save(self, state: dict[str, Any], *, declined: bool) -> None:
        """Record the state after a round (atomically: a crash never leaves half a ledger)."""
        entries = []
        if self.path.exists():
            entries = json.loads(self.path.read_text()).get("rounds", [])
        entries.append(
            {"time": time.time(), "declined": declined, "epsilon": float(state.get("dp-epsilon-spent", 0.0))}
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"state": state, "rounds": entries}, indent=1))
        os.replace(tmp, self.path)
