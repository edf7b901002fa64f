"""A bank's record of the entity releases it joined, and the epsilon they compose to on its transactions.

One transaction lands in exactly one day cell of a release, so releases over disjoint days compose in
parallel (no extra cost), and releases that cover the same day compose sequentially: Opacus' RDP accountant
over the Gaussian ones' noise multipliers, plus the pure (Laplace, discrete Laplace) ones' epsilons
(`models.release_noise.composed_epsilon`). A bank's entity epsilon is the worst day: the composition of
every release that covered that day. Releases of different entity columns (merchant, device, ...) count the
same transactions, so they compose too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from models.release_noise import GAUSSIAN, LAYOUT_COUNTS, composed_epsilon, is_pure, layout_sensitivity

logger = logging.getLogger(__name__)


class EntityBudgetError(RuntimeError):
    """Joining this release would take the bank's entity epsilon over its budget."""


@dataclass(frozen=True)
class ReleaseEntry:
    """One entity release as the bank saw it: days covered, noise, target and achieved epsilon."""

    release_id: str
    column: str
    start: str
    days: int
    noise_multiplier: float
    delta: float
    epsilon: float
    banks: int
    contributing: int | None = None
    achieved: float | None = None
    version: str | None = None
    mechanism: str = GAUSSIAN
    noise_banks: int | None = None
    """The fewest contributing banks its noise is calibrated for (None: all `banks`)."""

    @classmethod
    def announced(cls, release: dict[str, Any]) -> ReleaseEntry:
        """The entry for a release announced by the server (before the bank sends its share)."""
        sigma = float(release["sigma"])
        mechanism = str(release.get("mechanism", GAUSSIAN))
        layout = str(release.get("layout", LAYOUT_COUNTS))
        sensitivity = layout_sensitivity(layout, mechanism=mechanism)  # as the bank encodes
        return cls(
            release_id=str(release["id"]),
            column=str(release["column"]),
            start=str(release["start"]),
            days=int(release["days"]),
            noise_multiplier=sigma / sensitivity,
            delta=float(release["delta"]),
            epsilon=float(release["epsilon"]),
            banks=int(release["banks"]),
            mechanism=mechanism,
            noise_banks=int(release.get("noise-banks", release["banks"])),
        )

    def pure_epsilon(self) -> float:
        """A pure-DP release's epsilon: the target, or inf when fewer banks than calibrated contributed."""
        short = self.contributing is not None and self.contributing < (self.noise_banks or self.banks)
        return math.inf if short else self.epsilon

    def effective_multiplier(self) -> float:
        """The noise multiplier the release really had: fewer contributing banks added less noise."""
        calibrated = self.noise_banks or self.banks
        if self.contributing is None or self.contributing >= calibrated:
            return self.noise_multiplier  # extra shares only add noise: the target stays the bound
        return self.noise_multiplier * math.sqrt(self.contributing / calibrated)

    def day_range(self) -> tuple[int, int]:
        """Covered days as [first, last) in days since the epoch."""
        first = int(pd.Timestamp(self.start).value // (24 * 3600 * 10**9))
        return first, first + self.days


def entity_epsilon(entries: Sequence[ReleaseEntry], *, delta: float) -> float:
    """The bank's entity epsilon: over its worst day, the composition of every release covering that day."""
    if not entries:
        return 0.0
    ranges = [entry.day_range() for entry in entries]
    worst = 0.0
    for point in sorted({first for first, _ in ranges}):  # a coverage change happens only at a start
        pairs = zip(entries, ranges, strict=True)
        covering = [e for e, (a, b) in pairs if a <= point < b]
        if covering:
            worst = max(worst, _composed(covering, delta=delta))
    return worst


def _composed(entries: Sequence[ReleaseEntry], *, delta: float) -> float:
    """Epsilon of releases covering the same day (Gaussian by RDP, pure ones added)."""
    gaussian = [e.effective_multiplier() for e in entries if not is_pure(e.mechanism)]
    pure = [e.pure_epsilon() for e in entries if is_pure(e.mechanism)]
    return composed_epsilon(gaussian, delta=delta, pure_epsilons=pure)


def join_release(
    entries: Sequence[ReleaseEntry], release: dict[str, Any], *, budget: float
) -> list[ReleaseEntry]:
    """Add an announced release to the bank's entries, refusing it if the bank's budget would be exceeded."""
    entry = ReleaseEntry.announced(release)
    known = [e for e in entries if e.release_id != entry.release_id]
    spent = entity_epsilon([*known, entry], delta=entry.delta)
    if spent > budget:
        raise EntityBudgetError(
            f"entity release {entry.release_id} ({entry.column}, {entry.start} + {entry.days} days) would "
            f"take this bank's entity epsilon to {spent:.3g} > its budget {budget:.3g} "
            "(config key 'entity-bank-epsilon'); the bank sends nothing"
        )
    logger.info("entity release %s joined: entity epsilon now %.3g", entry.release_id, spent)
    return [*known, entry]


def confirm_release(
    entries: Sequence[ReleaseEntry], *, release_id: str, contributing: int, version: str
) -> list[ReleaseEntry]:
    """Record what the server published for a release: how many banks contributed, the table version."""
    out = []
    for entry in entries:
        if entry.release_id != release_id:
            out.append(entry)
            continue
        known = dataclasses.replace(entry, contributing=contributing, version=version)
        achieved = _composed([known], delta=known.delta)
        out.append(dataclasses.replace(known, achieved=max(achieved, known.epsilon)))
    return out


def dumps(entries: Sequence[ReleaseEntry]) -> str:
    """Entries as JSON (for context.state and the ledger file)."""
    return json.dumps([dataclasses.asdict(e) for e in entries])


def loads(text: str) -> list[ReleaseEntry]:
    """Entries from JSON written by `dumps`."""
    return [ReleaseEntry(**item) for item in json.loads(text or "[]")]
