"""A bank's privacy floor in deployment: node-config limits the consortium's run config cannot lower."""

import math

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from clients.node_policy import BankPolicyError, apply_bank_policy, require_secagg_mod
from models.config import load_config
from tests._helpers_messages import server_message


def _message(records: dict, message_type: str = MessageType.TRAIN) -> Message:
    return server_message(RecordDict(records), message_type)


def _context(node: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _answered(msg: Message, node: dict) -> bool:
    seen = []
    require_secagg_mod(msg, _context(node), lambda m, c: seen.append(m) or m)
    return bool(seen)


def test_default_policy_accepts_the_default_run():
    config = load_config({})
    assert apply_bank_policy(config, {}) == config


@pytest.mark.parametrize(
    ("overrides", "node", "key"),
    [
        ({"dp": False}, {}, "require-dp"),
        ({"secagg": False}, {}, "require-secagg"),
        ({"dp-epsilon": 8.0}, {"max-epsilon": "3"}, "max-epsilon"),
        ({}, {"require-dp": "maybe"}, "require-dp"),
        ({}, {"max-epsilon": "-1"}, "max-epsilon"),
        ({}, {"entity-budget": "lots"}, "entity-budget"),
    ],
)
def test_weaker_privacy_is_refused_naming_the_key(overrides, node, key):
    with pytest.raises(BankPolicyError, match=key):
        apply_bank_policy(load_config(overrides), node)


def test_a_bank_can_opt_out_and_set_its_entity_budget():
    config = load_config({"dp": False, "secagg": False})
    relaxed = apply_bank_policy(config, {"require-dp": "false", "require-secagg": False, "entity-budget": 4})
    assert relaxed.entity.entity_bank_epsilon == 4.0
    assert math.isinf(config.entity.entity_bank_epsilon)
    assert apply_bank_policy(load_config({"dp-epsilon": 3.0}), {"max-epsilon": 3}).privacy.dp_epsilon == 3.0


def test_plaintext_training_messages_are_refused_unless_allowed():
    plain = _message({"fitins.config": ConfigRecord({"task": "train"})})
    with pytest.raises(BankPolicyError, match="require-secagg"):
        _answered(plain, {})
    assert _answered(plain, {"require-secagg": "false"})


def test_secagg_messages_publish_and_evaluate_pass():
    assert _answered(_message({RECORD_KEY_CONFIGS: ConfigRecord({"stage": "setup"})}), {})
    assert _answered(_message({"fitins.config": ConfigRecord({"task": "publish"})}), {})
    assert _answered(_message({"evaluateins.config": ConfigRecord({})}, MessageType.EVALUATE), {})


def test_fedfraud_bank_start_limits_reach_the_policy(tmp_path):
    from flwr.common.config import parse_config_args  # noqa: PLC0415

    from clients.bank_cli import node_config  # noqa: PLC0415

    limits = {"max-epsilon": 2.0, "entity-budget": 6.0}
    node = parse_config_args(
        [node_config(data=tmp_path / "t.parquet", bank_id=1, state=tmp_path, limits=limits)]
    )
    with pytest.raises(BankPolicyError, match="max-epsilon"):
        apply_bank_policy(load_config({"dp-epsilon": 3.0}), node)
    assert apply_bank_policy(load_config({"dp-epsilon": 2.0}), node).entity.entity_bank_epsilon == 6.0


def test_a_masked_training_reply_keeps_only_the_privacy_report_and_the_score_in_clear():
    from flwr.app import MetricRecord  # noqa: PLC0415

    from clients.mods import scrub_plaintext_mod  # noqa: PLC0415

    msg = _message({RECORD_KEY_CONFIGS: ConfigRecord({"stage": "collect_masked_vectors"})})
    metrics = {"bank": 3, "epsilon": 1.5, "entity-epsilon": 3.0, "eval-ap": 0.4, "rows": 123, "secret": "x"}
    reply_content = RecordDict(
        {
            "fitres.num_examples": MetricRecord({"num_examples": 5_000}),
            "fitres.metrics": ConfigRecord(metrics),
        }
    )
    out = scrub_plaintext_mod(msg, _context({}), lambda m, c: Message(reply_content, reply_to=m))
    assert out.content.metric_records["fitres.num_examples"]["num_examples"] == 1
    assert dict(out.content.config_records["fitres.metrics"]) == {
        "bank": 3,
        "epsilon": 1.5,
        "entity-epsilon": 3.0,
        "eval-ap": 0.4,
    }
