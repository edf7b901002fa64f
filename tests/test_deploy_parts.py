"""The deployment's parts without processes: command lines, node config, audit log, SuperLink log parsing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flwr.common.config import parse_config_args

from clients.bank_cli import BankSetupError, node_config, supernode_command
from clients.fast_supernode import _runtime_address
from clients.sent_log import append_line, read_sent_log, sent_log_path
from server.audit import AuditLog, model_hash, open_run_audit, read_audit
from server.certs import create_bank_key
from server.keyinfo import key_fingerprint
from server.server_cli import ServerSetupError, run_command, superlink_command
from server.superlink_watch import AuthWatcher, parse_auth_failure

REFUSED = (
    "\x1b[91mERROR \x1b[0m:     [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode "
    "with public key: {key!r}, exception: No SuperNode found with the given public key."
)


def test_superlink_requires_tls_and_node_auth_unless_insecure(tmp_path):
    with pytest.raises(ServerSetupError, match="--insecure"):
        superlink_command(certs=None, state=tmp_path, host="127.0.0.1", port=9092)
    with pytest.raises(ServerSetupError, match=r"ca\.crt"):
        superlink_command(certs=tmp_path, state=tmp_path, host="127.0.0.1", port=9092)
    for name in ("ca.crt", "server.pem", "server.key"):
        (tmp_path / name).write_text("x")
    command = superlink_command(certs=tmp_path, state=tmp_path, host="0.0.0.0", port=9092)
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert command[command.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.crt")
    assert command[command.index("--database") + 1] == str(tmp_path / "superlink.db")
    insecure = superlink_command(certs=None, state=tmp_path, host="127.0.0.1", port=1, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert "--database" not in superlink_command(
        certs=tmp_path, state=tmp_path, host="127.0.0.1", port=1, in_memory=True
    )


def test_a_run_keeps_its_checkpoints_and_the_audit_log_in_the_state(tmp_path):
    command = run_command(state=tmp_path, app=tmp_path, rounds=4, run_config="dp-epsilon=2")
    assert command[1:4] == ["run", str(tmp_path), "fedfraud"] and "--stream" in command
    parsed = parse_config_args([command[command.index("--run-config") + 1]])
    assert parsed == {
        "checkpoint-dir": str((tmp_path / "checkpoints").resolve()),
        "audit-log": str((tmp_path / "audit.jsonl").resolve()),
        "rounds": 4,
        "dp-epsilon": 2,
    }


def test_bank_node_needs_ca_and_key_unless_insecure(tmp_path):
    config = node_config(data=tmp_path / "tx file.parquet", bank_id=3, state=tmp_path, columns="card_id=C")
    assert parse_config_args([config]) == {
        "data-path": str((tmp_path / "tx file.parquet").resolve()),
        "bank-id": 3,
        "ledger-path": str((tmp_path / "ledger.json").resolve()),
        "sent-log": str((tmp_path / "sent.jsonl").resolve()),
        "columns": "card_id=C",
    }
    common = {"superlink": "bank.example:9092", "config": config, "runtime_port": 9094}
    with pytest.raises(BankSetupError, match="--ca is required"):
        supernode_command(ca=None, key=None, **common)
    with pytest.raises(BankSetupError, match="missing"):
        supernode_command(ca=tmp_path / "ca.crt", key=tmp_path / "key", **common)
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key").write_text("x")
    warm = supernode_command(ca=tmp_path / "ca.crt", key=tmp_path / "key", **common)
    assert warm[1:6] == ["-m", "clients.fast_supernode", "--warm-clientapp", "--isolation", "process"]
    assert warm[warm.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")
    stock = supernode_command(ca=tmp_path / "ca.crt", key=tmp_path / "key", mode="subprocess", **common)
    assert stock[0].endswith("flower-supernode") and "subprocess" in stock
    plain = supernode_command(ca=None, key=None, insecure=True, max_retries=2, **common)
    assert "--insecure" in plain and plain[plain.index("--max-retries") + 1] == "2"
    with pytest.raises(BankSetupError, match="--mode"):
        supernode_command(ca=None, key=None, insecure=True, mode="fast", **common)


def test_the_warm_clientapp_finds_the_nodes_runtime_api():
    assert _runtime_address(["--superlink", "x:1"]) == "127.0.0.1:9094"
    assert _runtime_address(["--port", "9200", "--host", "0.0.0.0"]) == "127.0.0.1:9200"
    assert _runtime_address(["--port=9300", "--host=10.1.2.3"]) == "10.1.2.3:9300"


def test_a_refused_key_in_the_superlink_log_is_audited_with_its_fingerprint(tmp_path):
    _, public = create_bank_key(tmp_path, "stranger")
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    key = serialization.load_ssh_public_key(public.read_bytes().split(b" fedfraud")[0])
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    watcher = AuthWatcher(AuditLog(tmp_path / "audit.jsonl"), log_file=tmp_path / "superlink.log")
    assert watcher.feed("INFO: Starting Flower SuperLink\n") is None
    record = watcher.feed(REFUSED.format(key=pem))
    unauthorized = '2026 INFO [uvicorn.access] 10.0.0.7:5000 - "POST /v1/fleet/pull-messages HTTP/1.1" 401'
    watcher.feed(unauthorized)
    watcher.close()
    assert record is not None and record["key_fingerprint"] == key_fingerprint(public)
    assert record["error_code"] == 2004 and "No SuperNode found" in record["reason"]
    events = read_audit(tmp_path / "audit.jsonl")
    assert [e["event"] for e in events] == ["auth_failed", "auth_failed"]
    assert events[1]["peer"] == "10.0.0.7:5000" and "401" in events[1]["reason"]
    assert (tmp_path / "superlink.log").read_text().count("\n") == 3
    assert parse_auth_failure("[Fleet.ActivateNode] Activated node_id=42") is None


def test_the_audit_log_is_only_ever_appended_to(tmp_path):
    path = tmp_path / "audit" / "audit.jsonl"
    first = AuditLog(path)
    first.write("run_start", config={"rounds": 2}, weights=np.float32(1.5))
    AuditLog(path).write("run_end", status="completed", path=tmp_path)  # a restarted server appends
    events = read_audit(path)
    assert [e["event"] for e in events] == ["run_start", "run_end"]
    assert events[0]["weights"] == 1.5 and events[1]["path"] == str(tmp_path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"
    with path.open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(ValueError, match=r"audit.jsonl:3: not a JSON line"):
        read_audit(path)


def test_model_hash_follows_values_dtypes_and_shapes():
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, dtype=np.float32)]
    same = [w.copy() for w in weights]
    assert model_hash(weights) == model_hash(same) and model_hash(weights).startswith("sha256:")
    assert model_hash([weights[0].reshape(3, 2), weights[1]]) != model_hash(weights)
    assert model_hash([weights[0].astype(np.float64), weights[1]]) != model_hash(weights)
    same[1][0] = 1e-7
    assert model_hash(same) != model_hash(weights)


def test_a_bank_keeps_its_sent_log_next_to_its_ledger(tmp_path):
    assert sent_log_path({}) is None
    assert sent_log_path({"ledger-path": str(tmp_path / "l.json")}) == tmp_path / "l.json.sent.jsonl"
    path = sent_log_path({"sent-log": str(tmp_path / "s.jsonl"), "ledger-path": "x"})
    assert path == tmp_path / "s.jsonl"
    append_line(path, {"round": "1", "bytes": 10})
    append_line(path, {"round": "2", "bytes": 12})
    assert read_sent_log(path) == [{"round": "1", "bytes": 10}, {"round": "2", "bytes": 12}]


def test_the_audit_log_defaults_to_the_checkpoint_directory(tmp_path):
    assert open_run_audit("", None, grid=None) is None
    beside = open_run_audit("", tmp_path / "ckpt", grid=None)
    assert beside is not None and beside.log.path == tmp_path / "ckpt" / "audit.jsonl"
    named = open_run_audit(str(tmp_path / "a.jsonl"), tmp_path / "ckpt", grid=None)
    assert named is not None and named.log.path == tmp_path / "a.jsonl"


class _Answers:
    """The part of the PromptGrid that RunAudit reads: who answered the last message round."""

    def __init__(self, answers):
        self.answers = answers

    def take_answers(self):
        return self.answers


def test_the_entity_release_and_the_served_model_are_audited_without_the_key(tmp_path):
    audit = open_run_audit("", tmp_path, _Answers({11: "ok", 12: "ok", 13: "node unavailable"}))
    release = {"id": "r1", "column": "merchant_id", "epsilon": 3.0, "key": "ab" * 16, "days": 30}
    sink = {
        "entity_release": json.dumps(release),
        "entity_contributing": 2,
        "entity_epsilon": 3.4,
        "entity_version": "consortium-v1:abc",
    }
    audit.entity_release(sink)
    weights, served = [np.ones(3, dtype=np.float32)], [np.zeros(3, dtype=np.float32)]
    audit.run_end("completed", rounds_done=4, weights=weights, served=served)
    entity, end = read_audit(tmp_path / "audit.jsonl")
    assert entity["event"] == "entity_release" and entity["participants"] == [11, 12]
    assert entity["dropouts"] == {"13": "node unavailable"} and entity["contributing"] == 2
    assert entity["epsilon_achieved"] == 3.4 and entity["table_version"] == "consortium-v1:abc"
    assert "key" not in entity["release"] and entity["release"]["id"] == "r1"
    assert "ab" * 16 not in (tmp_path / "audit.jsonl").read_text()
    assert end["served_model_hash"] == model_hash(served) != end["model_hash"]
