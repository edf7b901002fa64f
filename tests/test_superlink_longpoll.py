"""Long-polled SuperNode pulls: held until a message can be claimed, answered as Flower answers a new pull."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
from flwr.proto.node_pb2 import Node
from flwr.server.superlink.linkstate import sql_linkstate
from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink import main as superlink_main
from sqlalchemy import text, update

from server import superlink_longpoll, superlink_routes, superlink_scan, superlink_state
from tests.test_superlink_routes import PROTOBUF, PUBLIC_BYTES, _signed
from tests.test_superlink_state import install_complete_claims

HOLD = 1.5  # long enough that a woken pull is told apart from one answered at the deadline


@pytest.fixture
def link(tmp_path, monkeypatch):
    """(client, state, node id, run id, pull runs): SQLite SuperLink app, direct routes and long-polling."""
    install_complete_claims(monkeypatch)
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "state.db"))
    monkeypatch.setattr(superlink_longpoll, "HOLD_S", HOLD)
    assert superlink_longpoll.enable()
    runs: list[float] = []
    run_route = superlink_routes.run_route

    def recording(route, request, authenticate):
        runs.append(time.monotonic())
        return run_route(route, request, authenticate)

    monkeypatch.setattr(superlink_routes, "run_route", recording)
    stock = superlink_main._get_middleware
    monkeypatch.setattr(
        superlink_main, "_get_middleware", lambda: superlink_routes.direct_middleware(stock())
    )
    app = superlink_main.create_app()
    state = app.state.linkstate_factory.state()
    node_id = _online(state, PUBLIC_BYTES)
    run_id = state.create_run(
        None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP
    )
    yield TestClient(app, raise_server_exceptions=False), state, node_id, run_id, runs
    superlink_longpoll.enable(False)


def _online(state, public_key: bytes) -> int:
    node_id = state.create_node("owner", "owner", public_key, 10.0)
    assert state.activate_node(node_id, 10.0)
    return node_id


def _pull(client, node_id: int):
    body = PullMessagesRequest(node=Node(node_id=node_id)).SerializeToString()
    return client.post(
        "/v1/fleet/pull-messages", content=body, headers={**_signed(), "content-type": PROTOBUF}
    )


def _message(node_id: int, run_id: int, stage: str = "share_keys") -> Message:
    """An instruction as the ServerApp of run `run_id` creates it."""
    content = RecordDict({"a": ArrayRecord([np.arange(3.0)]), "c": ConfigRecord({"stage": stage})})
    identity = {"_run_id": run_id, "_node_id": SUPERLINK_NODE_ID, "_task_id": 1}
    saved = {name: getattr(TaskIdentity, name) for name in identity}
    try:
        for name, value in identity.items():
            setattr(TaskIdentity, name, value)
        message = Message(content, dst_node_id=node_id, message_type="train", group_id="1")
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _register(state, message: Message) -> dict:
    """Store the message as the ServerApp's push does; its objects (to put later) by id."""
    objects = get_all_nested_objects(message)
    stored, _ = state.store_message_and_object_tree(
        message, get_object_tree(message), state.start_session(message.metadata.run_id)
    )
    assert stored
    return objects


def _put_all(state, objects: dict) -> None:
    for object_id, obj in objects.items():
        state.object_store.put(object_id, obj.deflate())


def _later(seconds: float, action) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    parsed = PullMessagesResponse.FromString(response.content)
    return [m.metadata.message_id for m in parsed.messages_list]


def test_an_empty_pull_is_held_then_answered_empty_as_flower_does(link):
    client, _, node_id, _, runs = link
    started = time.monotonic()
    response = _pull(client, node_id)
    assert time.monotonic() - started >= HOLD
    assert _ids(response) == [] and response.content == PullMessagesResponse().SerializeToString()
    assert len(runs) == 2  # at arrival and at the deadline: nothing was written, no scan woke it
    superlink_longpoll.enable(False)
    started = time.monotonic()
    assert _ids(_pull(client, node_id)) == [] and time.monotonic() - started < HOLD / 2  # off: at once


def test_a_held_pull_is_handed_the_message_once_its_objects_are_all_stored(link):
    client, state, node_id, run_id, runs = link
    message = _message(node_id, run_id)
    objects = _register(state, message)
    started = time.monotonic()
    putter = _later(0.2, lambda: _put_all(state, objects))
    response = _pull(client, node_id)
    putter.join()
    waited = time.monotonic() - started
    assert _ids(response) == [message.metadata.message_id]  # the message, with Flower's answer
    assert 0.2 <= waited < HOLD  # woken by the write, not at the deadline
    assert len(runs) == 2  # at arrival, and when the scan found it complete
    assert _ids(_pull(client, node_id)) == []  # handed out once


def test_a_message_stored_during_the_hold_wakes_the_pull(link):
    client, state, node_id, run_id, _ = link
    message = _message(node_id, run_id)
    started = time.monotonic()
    pusher = _later(0.2, lambda: _put_all(state, _register(state, message)))
    response = _pull(client, node_id)
    pusher.join()
    assert _ids(response) == [message.metadata.message_id] and time.monotonic() - started < HOLD


def test_a_node_revoked_during_the_hold_is_refused_when_answered(link):
    client, state, node_id, _, runs = link

    revoker = _later(0.1, lambda: state.delete_node("owner", node_id))
    response = _pull(client, node_id)
    revoker.join()
    assert response.status_code == 401  # authentication ran again, as for a new pull
    assert len(runs) == 2


def _claimed(state, node_id: int) -> bool:
    return bool(state.get_message_ins(node_id=node_id, limit=1))


def test_the_scan_agrees_with_the_claims(link, monkeypatch):
    _, state, node_id, run_id, _ = link
    other = _online(state, b"another-key")
    nodes = frozenset({node_id, other})
    assert superlink_scan.claimable_nodes(state, nodes) == set()
    first = _message(node_id, run_id)
    objects = _register(state, first)
    assert superlink_scan.claimable_nodes(state, nodes) == set() and not _claimed(state, node_id)
    _put_all(state, objects)
    _register(state, _message(node_id, run_id, "collect"))  # a second, incomplete one behind it
    assert superlink_scan.claimable_nodes(state, nodes) == {node_id}
    assert _claimed(state, node_id)
    assert superlink_scan.claimable_nodes(state, nodes) == set() and not _claimed(state, node_id)
    monkeypatch.setattr(superlink_state, "HOLD_S", 0.0)  # the incomplete one is now "stuck": handed out
    assert superlink_scan.claimable_nodes(state, nodes) == {node_id}
    assert _claimed(state, node_id)
    _register(state, _message(other, run_id))
    monkeypatch.setattr(superlink_state, "HOLD_S", 30.0)
    assert superlink_scan.claimable_nodes(state, nodes) == set()
    monkeypatch.setattr(sql_linkstate.SqlLinkState, "_claim_message_ins_rows", lambda *a: [])
    assert superlink_scan.claimable_nodes(state, nodes) == {other}  # stock claims take incomplete ones


def test_only_committed_writes_of_watched_tables_bump_the_signal(link):
    _, state, _, _, _ = link
    signal = superlink_longpoll.long_poll_of(state).signal
    before = signal.generation
    with state.session() as session:
        session.execute(text("SELECT count(*) FROM message_ins"))
        run = sql_linkstate.RunModel
        session.execute(update(run).where(run.run_id == 0).values(run_id=run.run_id))  # not watched
    assert signal.generation == before
    with state.session() as session:
        session.execute(text("DELETE FROM message_ins WHERE 0"))
        assert signal.generation == before  # not before the transaction ends
    assert signal.generation == before + 1
    with state.object_store.session() as session:
        session.execute(text("UPDATE objects SET is_available = 1 WHERE 0"))
    assert signal.generation == before + 2


def test_the_reads_of_a_claim_and_of_the_scan_wake_nobody(link):
    _, state, node_id, run_id, _ = link
    message = _message(node_id, run_id)
    _register(state, message)  # incomplete: a claim reads its tree (WITH RECURSIVE ... SELECT)
    signals = [superlink_longpoll.long_poll_of(state, kind).signal for kind in ("fleet", "runtime")]
    before = [signal.generation for signal in signals]
    assert superlink_scan.claimable_nodes(state, frozenset({node_id})) == set()
    assert not _claimed(state, node_id)
    assert superlink_state._missing_objects(state.object_store, message.metadata.message_id) > 0
    assert [signal.generation for signal in signals] == before  # else held pulls would wake each other
