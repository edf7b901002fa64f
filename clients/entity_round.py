"""A bank's part in the consortium entity release: its noised table share, the published table's features."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from clients import release_ledger
from clients.bank import BankData
from clients.entity import EntityTableSpec, consortium_features, local_table
from clients.ledger import BankLedger
from clients.release_ledger import ReleaseEntry
from models.feature_names import CONSORTIUM_FEATURES
from models.federation import CLIPPING_RANGE, ENTITY_LEDGER
from models.release_noise import (
    GAUSSIAN,
    LAYOUT_COUNTS,
    calibrate_release,
    layout_sensitivity,
    to_wire_layout,
)
from models.release_shares import noise_share

logger = logging.getLogger(__name__)


class EntityReleaseError(ValueError):
    """The bank cannot take part in the entity release (no transactions, or a share beyond the range)."""


def release_spec(release: dict[str, Any]) -> EntityTableSpec:
    """The table's shape from the release announced by the server."""
    return EntityTableSpec(
        start=str(release["start"]),
        days=int(release["days"]),
        column=str(release["column"]),
        buckets=int(release["buckets"]),
        delay_days=int(release["delay"]),
    )


def noise_banks(release: dict[str, Any]) -> int:
    """The number of shares the release's noise is split into (refused beyond the announced banks)."""
    banks = int(release["banks"])
    split = int(release.get("noise-banks", banks))
    if not 1 <= split <= banks:
        raise EntityReleaseError(
            f"entity release {release.get('id')}: noise split {split} ways is outside [1, {banks} banks]"
        )
    return split


def table_share(data: BankData, release_json: str) -> np.ndarray:
    """Return the bank's table plus its noise share, scaled for SecAgg+ (the server sees only the sum)."""
    if data.frame is None:
        raise EntityReleaseError("entity features need a transactions file (not a feature table)")
    release = json.loads(release_json)
    spec = release_spec(release)
    layout = str(release.get("layout", LAYOUT_COUNTS))
    mechanism = str(release.get("mechanism", GAUSSIAN))
    table = local_table(data.frame, spec, key=bytes.fromhex(release["key"]))
    noise = calibrate_release(
        epsilon=float(release["epsilon"]),
        delta=float(release["delta"]),
        sensitivity=layout_sensitivity(layout, mechanism=mechanism),  # the bank's own bound
        mechanism=mechanism,
    )
    noisy = to_wire_layout(table, layout) + noise_share(
        table.shape, noise=noise, n_banks=noise_banks(release)
    )
    encoded = noisy / float(release["scale"])
    if not np.isfinite(encoded).all() or np.abs(encoded).max(initial=0.0) > CLIPPING_RANGE:
        raise EntityReleaseError(
            f"entity table share exceeds the agreed bound {release['max_value']} per cell "
            f"(max {np.abs(noisy).max():.0f}): SecAgg+ would clip it silently"
        )
    logger.info(
        "entity share: %d transactions, %d frauds, noise sigma %.3g",
        int(table[0].sum()),
        int(table[1].sum()),
        noise.sigma,
    )
    return encoded.ravel()


def with_consortium(data: BankData, table: np.ndarray, release_json: str) -> BankData:
    """The bank's data with the consortium features (from the published table) appended to its local ones."""
    if data.frame is None or data.train_mask is None or data.test_mask is None:
        raise EntityReleaseError("entity features need a transactions file (not a feature table)")
    release = json.loads(release_json)
    spec = release_spec(release)
    extra = consortium_features(
        data.frame, table.reshape(2, spec.days, spec.buckets), spec, key=bytes.fromhex(release["key"])
    ).to_numpy(np.float32)
    return dataclasses.replace(
        data,
        x_train=np.hstack([data.x_train, extra[data.train_mask]]),
        x_test=np.hstack([data.x_test, extra[data.test_mask]]),
        feature_names=data.feature_names + CONSORTIUM_FEATURES,
    )


def joined_releases(state: RecordDict, ledger: BankLedger | None) -> list[ReleaseEntry]:
    """The entity releases this bank joined: from context.state, else from its ledger file."""
    record = state.config_records.get(ENTITY_LEDGER)
    if record is not None:
        return release_ledger.loads(str(record["releases"]))
    if ledger is not None:
        return [ReleaseEntry(**entry) for entry in ledger.releases()]
    return []


def _keep(state: RecordDict, ledger: BankLedger | None, entries: list[ReleaseEntry]) -> None:
    """Store the entries in context.state and in the bank's ledger file."""
    state.config_records[ENTITY_LEDGER] = ConfigRecord({"releases": release_ledger.dumps(entries)})
    if ledger is not None:
        ledger.save_releases([dataclasses.asdict(entry) for entry in entries])


def join(state: RecordDict, ledger: BankLedger | None, release_json: str, *, budget: float) -> None:
    """Record the bank's part in a release before it sends its share (refused over the bank's budget)."""
    known = joined_releases(state, ledger)
    entries = release_ledger.join_release(known, json.loads(release_json), budget=budget)
    _keep(state, ledger, entries)


def confirm(state: RecordDict, ledger: BankLedger | None, published_json: str) -> None:
    """Record what the server published: contributing banks (the achieved epsilon) and the table version."""
    published = json.loads(published_json)
    entries = release_ledger.confirm_release(
        joined_releases(state, ledger),
        release_id=str(published["id"]),
        contributing=int(published["contributing"]),
        version=str(published["version"]),
    )
    _keep(state, ledger, entries)


def spent(state: RecordDict, ledger: BankLedger | None, *, delta: float) -> float:
    """The bank's entity epsilon so far (its worst day over all releases it joined)."""
    return release_ledger.entity_epsilon(joined_releases(state, ledger), delta=delta)
