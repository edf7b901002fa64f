"""Contracts shared by the banks' ClientApp and the consortium's ServerApp (they never import each other)."""

from __future__ import annotations

CLIPPING_RANGE = 8.0
"""SecAgg+ clips each weighted coordinate to +-CLIPPING_RANGE; a bank refuses to send a larger value."""
MAX_WEIGHT = 1_000_000.0
"""Default public bound on a bank's training rows (SecAgg+ weight num_examples / max_weight must be <= 1)."""
STATS_CLIP = 20.0
"""Banks clip feature values to +-STATS_CLIP for the standardization statistics round."""

TASK = "task"
TASK_STATS = "stats"
TASK_TRAIN = "train"
TASK_ENTITY = "entity"
TASK_PUBLISH = "publish"
KEY_ENTITY = "entity-release"
"""JSON: entity column, buckets, start, days, delay, key (hex), noise sigma, banks, exact-sum scale."""
KEY_PUBLISHED = "entity-published"
"""JSON sent with the published table: release id, contributing banks, table version, achieved epsilon."""
KEY_ROUND = "server-round"
KEY_SPEC = "feature-spec"
KEY_MAX_WEIGHT = "max-weight"
KEY_EVALUATE = "evaluate-previous"
"""Fit config flag: score the incoming global model (the previous round's) first (`evaluate-in-fit`)."""
EVAL_PREFIX = "eval-"
"""Fit metrics with this prefix are that evaluation's metrics (plus `eval-loss`, `eval-examples`)."""
REPORT_KEYS = ("bank", "epsilon", "entity-epsilon")
"""What a bank sends in the clear with each training reply: its id and privacy ledger (checkpoint, audit)."""
KEY_PROXIMAL_MU = "proximal_mu"  # the name Flower's FedProx puts into the fit config
ENTITY_TABLE = "fedfraud-entity-table"
"""The ArrayRecord in a ClientApp's context.state holding the published consortium table."""
ENTITY_RELEASE = "fedfraud-entity-release"
"""The ConfigRecord beside it with the release (keys of a RecordDict are shared by all record types)."""
ENTITY_LEDGER = "fedfraud-entity-ledger"
"""The ConfigRecord holding the entity releases the bank joined (clients/release_ledger.py)."""
BANK_STATE = "fedfraud-bank"
"""The ConfigRecord in a ClientApp's context.state holding the bank's privacy ledger."""
