"""A bank's own privacy floor in deployment: limits in its node config that the consortium cannot lower.

In deployment the run configuration comes from the consortium (`flwr run --run-config`), so a server could
turn DP-SGD or SecAgg+ off or raise the budget. A bank states its limits once, in the node config of its
SuperNode, and its ClientApp refuses a run or a message that would go below them:

* `require-dp` (default true): refuse a run with record-level DP-SGD off;
* `max-epsilon` (default: none): refuse a run whose DP-SGD budget `dp-epsilon` is above it;
* `require-secagg` (default true): refuse to answer a training, statistics or entity message that does not
  come through SecAgg+ (the reply would leave the bank unmasked);
* `entity-budget` (default: the run's `entity-bank-epsilon`): the bank's cap on its entity epsilon.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from models.config import FedFraudConfig
from models.federation import TASK, TASK_PUBLISH

logger = logging.getLogger(__name__)
CallNext = Callable[[Message, Context], Message]


class BankPolicyError(PermissionError):
    """The consortium asked for less privacy than this bank's node config allows."""


def _flag(node: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean node-config value (true/false, 1/0, yes/no), refusing anything else by key."""
    value = node.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise BankPolicyError(f"node config key {key!r}: expected true or false, got {value!r}")


def _positive(node: Mapping[str, Any], key: str) -> float | None:
    """An optional positive number from the node config, refusing anything else by key."""
    if key not in node or str(node[key]).strip() == "":
        return None
    try:
        value = float(node[key])
    except (TypeError, ValueError) as exc:
        raise BankPolicyError(f"node config key {key!r}: expected a number, got {node[key]!r}") from exc
    if not value > 0:
        raise BankPolicyError(f"node config key {key!r}: expected a positive number, got {value!r}")
    return value


def apply_bank_policy(config: FedFraudConfig, node: Mapping[str, Any]) -> FedFraudConfig:
    """The run config under the bank's limits: refuse weaker privacy, apply the bank's entity cap."""
    if _flag(node, "require-dp", True) and not config.privacy.dp:
        raise BankPolicyError(
            "the run turns record-level DP-SGD off (dp=false) but this bank requires it "
            "(node config 'require-dp'); the bank takes no part"
        )
    cap = _positive(node, "max-epsilon")
    if cap is not None and config.privacy.dp and config.privacy.dp_epsilon > cap:
        raise BankPolicyError(
            f"the run's dp-epsilon {config.privacy.dp_epsilon:g} is above this bank's limit {cap:g} "
            "(node config 'max-epsilon'); the bank takes no part"
        )
    if _flag(node, "require-secagg", True) and not config.federation.secagg:
        raise BankPolicyError(
            "the run turns SecAgg+ off (secagg=false) but this bank requires it (node config "
            "'require-secagg'); the bank takes no part"
        )
    budget = _positive(node, "entity-budget")
    if budget is not None:
        entity = dataclasses.replace(config.entity, entity_bank_epsilon=budget)
        config = dataclasses.replace(config, entity=entity)
    return config


def require_secagg_mod(msg: Message, ctxt: Context, call_next: CallNext) -> Message:
    """Refuse a training message whose reply would leave unmasked (unless the node config allows it)."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS in msg.content.config_records:
        return call_next(msg, ctxt)
    fit_config = msg.content.config_records.get("fitins.config")
    if fit_config is not None and fit_config.get(TASK) == TASK_PUBLISH:
        return call_next(msg, ctxt)  # the server's broadcast of the published table: the bank sends nothing
    if not _flag(ctxt.node_config, "require-secagg", True):
        return call_next(msg, ctxt)
    logger.error("refused a training message outside SecAgg+ (node config 'require-secagg')")
    raise BankPolicyError(
        "this bank answers training rounds only through SecAgg+ (node config 'require-secagg')"
    )
