"""The SuperLink's direct route layer answers exactly as Flower's middleware stack does, and is taken."""

from __future__ import annotations

import datetime

import pytest
from fastapi.testclient import TestClient
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest, SendNodeHeartbeatResponse
from flwr.proto.message_pb2 import PullObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.constant import (
    FLEET_HTTP_PUBLIC_KEY_HEADER,
    FLEET_HTTP_SIGNATURE_HEADER,
    TASK_TOKEN_HEADER,
)
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes, sign_message
from flwr.superlink import main as superlink_main

from server import superlink_routes

PROTOBUF = "application/protobuf"
KEY, PUBLIC = generate_key_pairs()
PUBLIC_BYTES = public_key_to_bytes(PUBLIC)


def _app(direct: bool):
    stock = superlink_main._get_middleware
    if direct:
        superlink_main._get_middleware = lambda: superlink_routes.direct_middleware(stock())
    try:
        app = superlink_main.create_app()
    finally:
        superlink_main._get_middleware = stock
    node_id = app.state.linkstate_factory.state().create_node("owner", "owner", PUBLIC_BYTES, 10.0)
    return TestClient(app, raise_server_exceptions=False), node_id


@pytest.fixture
def clients(monkeypatch):
    """(stock client, its node id), (direct client, its node id), and the requests the direct layer ran."""
    taken: list[str] = []
    run_route = superlink_routes.run_route

    def recording(route, request, authenticate):
        taken.append(route.path)
        return run_route(route, request, authenticate)

    monkeypatch.setattr(superlink_routes, "run_route", recording)
    return _app(direct=False), _app(direct=True), taken


def _signed(key=KEY, public: bytes = PUBLIC_BYTES) -> dict[str, str]:
    from base64 import b64encode  # noqa: PLC0415

    stamp = datetime.datetime.now(datetime.UTC).isoformat()
    return {
        TIMESTAMP_HEADER: stamp,
        FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public).decode(),
        FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(key, stamp.encode("ascii"))).decode(),
    }


def _foreign() -> dict[str, str]:
    key, public = generate_key_pairs()
    return _signed(key, public_key_to_bytes(public))


def _heartbeat(node_id: int, interval: float = 30.0) -> bytes:
    return SendNodeHeartbeatRequest(
        node=Node(node_id=node_id), heartbeat_interval=interval
    ).SerializeToString()


CASES = {  # name: (path, body(node_id), headers(), content type)
    "ok": ("/v1/fleet/send-node-heartbeat", _heartbeat, _signed, PROTOBUF),
    "no signature": ("/v1/fleet/send-node-heartbeat", _heartbeat, dict, PROTOBUF),
    "foreign key": ("/v1/fleet/send-node-heartbeat", _heartbeat, _foreign, PROTOBUF),
    "wrong node": ("/v1/fleet/send-node-heartbeat", lambda n: _heartbeat(n + 1), _signed, PROTOBUF),
    "bad signature": (
        "/v1/fleet/send-node-heartbeat",
        _heartbeat,
        lambda: {**_signed(), FLEET_HTTP_SIGNATURE_HEADER: _signed()[FLEET_HTTP_PUBLIC_KEY_HEADER]},
        PROTOBUF,
    ),
    "handler error": ("/v1/fleet/send-node-heartbeat", lambda n: _heartbeat(n, 1e9), _signed, PROTOBUF),
    "unexpected error": (
        "/v1/fleet/pull-object",
        lambda n: PullObjectRequest(node=Node(node_id=n), run_id=7, object_id="x").SerializeToString(),
        _signed,
        PROTOBUF,
    ),
    "content type": ("/v1/fleet/send-node-heartbeat", _heartbeat, _signed, "application/json"),
    "bad payload": ("/v1/fleet/send-node-heartbeat", lambda n: b"\xff\xff\xff", _signed, PROTOBUF),
    "runtime no token": ("/v1/runtime/pull-object", lambda n: b"", dict, PROTOBUF),
    "runtime bad token": (
        "/v1/runtime/pull-object",
        lambda n: b"",
        lambda: {TASK_TOKEN_HEADER: "nope"},
        PROTOBUF,
    ),
    "unknown path": ("/v1/fleet/no-such-route", lambda n: b"", dict, PROTOBUF),
}


def _post(client_node, case: str):
    client, node_id = client_node
    path, body, headers, content_type = CASES[case]
    return client.post(path, content=body(node_id), headers={**headers(), "content-type": content_type})


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_direct_layer_answers_as_flowers_stack(clients, case):
    stock, direct, taken = clients
    want, got = _post(stock, case), _post(direct, case)
    assert (got.status_code, got.headers.get("content-type"), got.content) == (
        want.status_code,
        want.headers.get("content-type"),
        want.content,
    )
    assert got.headers.get("content-length") == want.headers.get("content-length")
    if case == "ok":
        assert got.status_code == 200
        assert SendNodeHeartbeatResponse.FromString(got.content).success
    if case in ("no signature", "foreign key", "wrong node", "bad signature"):
        assert got.status_code == 401  # node authentication still refuses
    if case.startswith("runtime"):
        assert got.status_code >= 400
    expect_taken = case not in ("unknown path", "content type", "bad payload")
    assert (CASES[case][0] in taken) == expect_taken


def test_a_fleet_route_takes_flowers_stack_while_a_fleet_event_log_is_loaded(clients):
    _, (client, _), _ = clients
    client.app.state.fleet_event_log_plugin = object()
    layer = superlink_routes.DirectRoutes(client.app)
    scope = {"type": "http", "method": "POST", "path": "/v1/fleet/pull-object", "app": client.app}
    assert layer.route_for(scope) is None
    assert layer.route_for({**scope, "path": "/v1/runtime/pull-object"}) is not None
    assert layer.route_for({**scope, "method": "GET", "path": "/v1/runtime/pull-object"}) is None


def test_routes_with_dependencies_it_cannot_evaluate_exactly_are_left_to_fastapi():
    app = superlink_main.create_app()
    routes = superlink_routes.collect_routes(app)
    assert "/v1/fleet/pull-object" in routes and "/v1/runtime/push-object" in routes
    assert "/v1/runtime/push-task-output" not in routes  # a generator (tracing) dependency
    assert not any(path.startswith("/v1/control/") for path in routes)
    app.dependency_overrides[object()] = object()
    assert superlink_routes.collect_routes(app) == {}
