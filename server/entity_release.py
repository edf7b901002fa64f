"""The consortium entity release: banks' day x bucket tables summed under SecAgg+ with distributed DP noise.

Each bank adds its own noise share before masking, so no party ever sees un-noised totals; the server decodes
the masked sum exactly (an `ExactSumPlan` proves that it cannot overflow), post-processes it and publishes it
back to the banks, which derive their consortium features from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid

from models.feature_names import CONSORTIUM_VERSION
from models.federation import KEY_ENTITY, KEY_PUBLISHED, TASK, TASK_ENTITY, TASK_PUBLISH
from models.release_noise import (
    DISCRETE_LAPLACE,
    LAYOUT_DISJOINT,
    achieved_epsilon,
    calibrate_release,
    check_table,
    from_wire_layout,
    layout_sensitivity,
)
from models.release_shares import share_bound
from server.exact_sum import plan_exact_sum
from server.rounds import run_round
from server.secagg import choose_secagg
from server.strategy import SecureMeanStrategy

logger = logging.getLogger(__name__)
MAX_CELL_COUNT = 100_000
"""Public bound on one bank's transactions at one bucket on one day (the release's encoding range)."""


class EntityReleaseError(RuntimeError):
    """The entity release produced no table (too few banks answered)."""


def table_version(release_json: str, table: np.ndarray) -> str:
    """The published table's version: a digest of the release and the table (ships with the model)."""
    digest = hashlib.sha256(release_json.encode("utf-8"))
    digest.update(np.ascontiguousarray(table, dtype=np.float64).tobytes())
    return f"{CONSORTIUM_VERSION}:{digest.hexdigest()[:16]}"


def announce(settings: Any) -> dict[str, Any]:
    """The release every bank is told about: table shape, consortium key, privacy and encoding."""
    cfg, n = settings.config.entity, settings.n_banks
    start, days = cfg.entity_start or settings.entity_start, cfg.entity_days or settings.entity_days
    if not start or days < 1:
        raise EntityReleaseError(
            "config keys 'entity-start' and 'entity-days' are needed for entity features"
        )
    mechanism = cfg.entity_mechanism
    sensitivity = layout_sensitivity(LAYOUT_DISJOINT, mechanism=mechanism)
    noise = calibrate_release(
        epsilon=cfg.entity_epsilon, delta=cfg.entity_delta, sensitivity=sensitivity, mechanism=mechanism
    )
    noise_banks = cfg.min_banks(n)
    plan = plan_exact_sum(n_banks=n, max_value=MAX_CELL_COUNT + share_bound(noise, n_banks=noise_banks))
    return {
        "id": secrets.token_hex(8),
        "column": cfg.entity_features,
        "buckets": cfg.entity_buckets,
        "start": start,
        "days": days,
        "delay": settings.config.split.delay_days,
        "key": cfg.entity_key or secrets.token_hex(32),
        "epsilon": cfg.entity_epsilon,
        "delta": cfg.entity_delta,
        "banks": n,
        "mechanism": mechanism,
        "noise-banks": noise_banks,
        "scale": plan.scale,
        "max_value": plan.max_value,
        "sigma": noise.sigma,
        "sensitivity": noise.sensitivity,
        "layout": LAYOUT_DISJOINT,
        "_plan": plan,
        "_noise": noise,
    }


def check_contributing(release: dict[str, Any], contributing: int) -> None:
    """Refuse to publish a release that fewer banks than its noise was calibrated for reached."""
    if contributing < int(release["noise-banks"]):
        raise EntityReleaseError(
            f"the entity release reached {contributing} banks' noise shares, fewer than the "
            f"{release['noise-banks']} its {release['mechanism']} noise is calibrated for "
            "(config key 'entity-min-banks'): its epsilon would exceed the target, the table is not published"
        )


def publishes_whole_counts(release: dict[str, Any]) -> bool:
    """Whether the decoded sum is rounded to whole counts: no noise, or integer (discrete Laplace) noise."""
    return math.isinf(release["epsilon"]) or release["mechanism"] == DISCRETE_LAPLACE


def entity_round(grid: Grid, context: Context, settings: Any) -> None:
    """Securely sum the banks' noised tables, decode and post-process them, publish the table to the banks."""
    release = announce(settings)
    plan, noise = release.pop("_plan"), release.pop("_noise")
    public = json.dumps(release)
    secure = None
    if settings.config.federation.secagg:  # shares as for training, quantization from the exact-sum plan
        shares = choose_secagg(settings.n_banks, settings.config.federation).workflow_kwargs()
        secure = {**shares, **plan.workflow_kwargs()}
    strategy = SecureMeanStrategy(
        payload=[np.zeros(1)],
        config={TASK: TASK_ENTITY, KEY_ENTITY: public},
        n_banks=settings.n_banks,
        sink=settings.sink,
        key="entity_mean",
    )
    run_round(grid, context, strategy, secagg=secure)
    if "entity_mean" not in settings.sink:
        raise EntityReleaseError("the entity release produced no table (too few banks answered)")
    contributing = int(settings.sink["entity_mean_results"])
    try:
        check_contributing(release, contributing)
    except EntityReleaseError:  # the sum was decoded with too little noise: audited with no epsilon
        settings.sink.update(
            entity_release=public,
            entity_contributing=contributing,
            entity_epsilon=math.inf,
            entity_version="",
        )
        raise
    total = plan.decode(
        settings.sink["entity_mean"], contributing=contributing, integers=publishes_whole_counts(release)
    )
    shape = (2, int(release["days"]), int(release["buckets"]))
    total = from_wire_layout(total.reshape(shape), release["layout"])
    table = check_table(total)
    epsilon = achieved_epsilon(noise, contributing=contributing, n_banks=int(release["noise-banks"]))
    version = table_version(public, table)
    published = {"id": release["id"], "contributing": contributing, "version": version, "epsilon": epsilon}
    settings.sink.update(
        entity_table=table,
        entity_release=public,
        entity_epsilon=epsilon,
        entity_raw=total,
        entity_version=version,
        entity_contributing=contributing,
    )
    logger.info(
        "entity release %s: %d banks, %d transactions, epsilon %.3g, table version %s",
        release["id"],
        contributing,
        int(table[0].sum()),
        epsilon,
        version,
    )
    broadcast = SecureMeanStrategy(
        payload=[table.ravel()],
        config={TASK: TASK_PUBLISH, KEY_ENTITY: public, KEY_PUBLISHED: json.dumps(published)},
        n_banks=settings.n_banks,
        sink=settings.sink,
        key="entity_publish",
    )
    run_round(grid, context, broadcast, secagg=None)
