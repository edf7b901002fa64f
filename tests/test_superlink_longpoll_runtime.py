"""Long-polled ServerApp reply pulls: held until a reply is stored, answered as Flower answers a new pull."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullAppMessagesResponse
from flwr.supercore.constant import TASK_TOKEN_HEADER
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from server import superlink_longpoll
from tests.test_superlink_longpoll import HOLD, PROTOBUF, _later, _message, _put_all, _register, link

__all__ = ["link"]  # the fixture, shared


def _token(state, run_id: int) -> str:
    task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id
    token = state.claim_task(task_id)
    assert token and state.activate_task(task_id)
    return token


def _pull(client, token: str, ids: list[str]):
    body = PullAppMessagesRequest(message_ids=ids).SerializeToString()
    headers = {TASK_TOKEN_HEADER: token, "content-type": PROTOBUF}
    return client.post("/v1/runtime/pull-messages", content=body, headers=headers)


def _replies(response) -> list[str]:
    assert response.status_code == 200, response.text
    parsed = PullAppMessagesResponse.FromString(response.content)
    return [m.metadata.reply_to_message_id for m in parsed.messages_list]


def _sent(state, node_id: int, run_id: int) -> Message:
    """An instruction stored, complete, and handed to its node (as the node's pull does)."""
    message = _message(node_id, run_id)
    _put_all(state, _register(state, message))
    (claimed,) = state.get_message_ins(node_id=node_id, limit=1)
    return claimed


def _reply(state, instruction: Message) -> None:
    """The node's reply stored as its push does (objects included)."""
    reply = Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=instruction)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    objects = get_all_nested_objects(reply)
    session = state.start_session(reply.metadata.run_id)
    stored, _ = state.store_message_and_object_tree(reply, get_object_tree(reply), session)
    assert stored
    _put_all(state, objects)


def test_a_reply_pull_is_held_until_a_reply_is_stored(link):
    client, state, node_id, run_id, _ = link
    token = _token(state, run_id)
    instruction = _sent(state, node_id, run_id)
    started = time.monotonic()
    replier = _later(0.2, lambda: _reply(state, instruction))
    response = _pull(client, token, [instruction.metadata.message_id])
    replier.join()
    assert _replies(response) == [instruction.metadata.message_id]
    assert 0.2 <= time.monotonic() - started < HOLD  # woken by the stored reply
    started = time.monotonic()
    again = PullAppMessagesResponse.FromString(
        _pull(client, token, [instruction.metadata.message_id]).content
    )
    assert again.messages_list[0].HasField("error")  # Flower's answer for a consumed id, at once
    assert time.monotonic() - started < HOLD / 2


def test_an_empty_reply_pull_is_answered_after_the_hold_and_rechecks_the_token(link):
    client, state, node_id, run_id, runs = link
    token = _token(state, run_id)
    instruction = _sent(state, node_id, run_id)
    started = time.monotonic()
    assert _replies(_pull(client, token, [instruction.metadata.message_id])) == []
    assert time.monotonic() - started >= HOLD
    assert len(runs) == 2  # its own claim (an UPDATE of message_res) does not wake it
    task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id
    finisher = _later(0.1, lambda: state.finish_task(task_id, "stopped", ""))
    response = _pull(client, token, [instruction.metadata.message_id])
    finisher.join()
    assert response.status_code != 200  # the task finished meanwhile: refused as a new pull is
    superlink_longpoll.enable(fleet=True, runtime=False)
    started = time.monotonic()
    _pull(client, token, ["x"])
    assert time.monotonic() - started < HOLD / 2  # off: answered at once
