"""The warm ClientApp's in-process Runtime calls: Flower's handlers, the task-token check, copies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
from flwr.supercore.error import FlowerError
from flwr.supernode import main as supernode_main

from clients import inprocess_runtime
from clients.inprocess_runtime import InProcessRuntime


class _State:
    def __init__(self) -> None:
        self.tasks = {"good-token": SimpleNamespace(task_id=7)}

    def get_task_by_token(self, token: str):
        return self.tasks.get(token)


def _app(calls: list) -> SimpleNamespace:
    state = _State()

    def pull_object(request, st, task):
        calls.append((request, st, task))
        return PullObjectResponse(object_found=True, object_available=True, object_content=b"payload")

    def acquire_task(request, st):
        calls.append((request, st))
        return AcquireTaskResponse(token="good-token")

    handlers = SimpleNamespace(pull_object=pull_object, acquire_task=acquire_task)
    factory = SimpleNamespace(state=lambda: state)
    return SimpleNamespace(state=SimpleNamespace(runtime_state_factory=factory, runtime_handlers=handlers))


def test_a_task_call_reaches_the_handler_with_the_tasks_state_and_copies():
    calls: list = []
    request = PullObjectRequest(object_id="abc")
    response = InProcessRuntime(_app(calls), "good-token").PullObject(request)
    assert response.object_content == b"payload"
    (seen, _state, task) = calls[0]
    assert task.task_id == 7 and seen == request and seen is not request  # a copy, as over the wire


def test_a_token_that_names_no_task_is_refused_as_over_http():
    calls: list = []
    for token in ("stale-token", None):
        with pytest.raises(FlowerError, match="task-token authentication failed"):
            InProcessRuntime(_app(calls), token).PullObject(PullObjectRequest(object_id="abc"))
    assert calls == []  # the handler never ran


def test_acquiring_a_task_needs_no_token():
    calls: list = []
    assert InProcessRuntime(_app(calls)).AcquireTask(AcquireTaskRequest()).token == "good-token"


def test_only_the_supernode_app_with_its_node_state_is_kept(monkeypatch):
    monkeypatch.setattr(supernode_main, "create_app", supernode_main.create_app)
    monkeypatch.setattr(inprocess_runtime, "_APP", [])
    monkeypatch.setattr(inprocess_runtime, "_READY", type(inprocess_runtime._READY)())
    assert inprocess_runtime.capture_runtime_app()
    supernode_main.create_app()  # no node state: the module-level app Flower also builds
    assert inprocess_runtime.runtime_app(timeout=0) is None
    state_factory = SimpleNamespace(state=lambda: None)
    app = supernode_main.create_app(state_factory=state_factory)
    assert inprocess_runtime.runtime_app(timeout=0) is app
