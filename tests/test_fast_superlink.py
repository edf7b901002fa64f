"""The SuperLink launcher's patches: middleware gates and the node-key cache keep Flower's behaviour."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
from flwr.server.superlink.linkstate import sql_linkstate
from flwr.superlink import main as superlink_main
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories

from server import fast_superlink, superlink_longpoll, superlink_routes, superlink_state


class _Recorder:
    """An ASGI middleware that notes every request it is entered for."""

    seen: ClassVar[list[str]] = []

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        _Recorder.seen.append(scope["path"])
        await self.app(scope, receive, send)


def _call(app, path: str) -> list[str]:
    reached: list[str] = []

    async def endpoint(scope, receive, send):
        reached.append(scope["path"])

    async def go():
        await app(endpoint)({"type": "http", "path": path}, None, None)

    asyncio.run(go())
    return reached


def test_a_gated_middleware_is_entered_only_for_the_requests_it_acts_on():
    _Recorder.seen = []

    def gate(inner):
        return fast_superlink._PathGate(inner, middleware=_Recorder, applies=fast_superlink._control_request)

    assert _call(gate, "/v1/fleet/pull-object") == ["/v1/fleet/pull-object"]
    assert _call(gate, "/v1/control/start-run") == ["/v1/control/start-run"]
    assert _Recorder.seen == ["/v1/control/start-run"]  # the Fleet request went straight through


def test_only_the_control_and_idle_event_log_layers_are_gated(monkeypatch):
    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    stock = [layer.cls.__name__ for layer in superlink_main._get_middleware()]
    assert fast_superlink.patch_middleware()
    layers = superlink_main._get_middleware()
    assert layers[0].cls is superlink_routes.DirectRoutes  # the direct layer, first
    layers = layers[1:]
    assert len(layers) == len(stock)  # same order, same count
    gated = [layer.kwargs["middleware"].__name__ for layer in layers if layer.cls is fast_superlink._PathGate]
    assert sorted(gated) == sorted(fast_superlink.GATES)
    kept = [layer.cls.__name__ for layer in layers if layer.cls is not fast_superlink._PathGate]
    assert {"NodeAuthMiddleware", "ProtobufTranslationMiddleware"} <= set(kept)


class _State:
    def __init__(self, app_plugin):
        self.fleet_event_log_plugin = app_plugin


class _App:
    def __init__(self, plugin):
        self.state = _State(plugin)


def test_the_fleet_event_log_is_entered_when_a_plugin_is_loaded():
    assert fast_superlink._fleet_event_logged({"app": _App(object())})
    assert not fast_superlink._fleet_event_logged({"app": _App(None)})
    assert fast_superlink._fleet_event_logged({})  # unknown: entered


@pytest.fixture
def linkstate(tmp_path, monkeypatch):
    """A real SQLite LinkState with the node-key cache installed (undone afterwards)."""
    cls = sql_linkstate.SqlLinkState
    for name in ("get_node_id_by_public_key", "create_node", "delete_node"):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    assert superlink_state.patch_node_lookup()
    _, factory = get_objectstore_linkstate_factories(str(tmp_path / "state.db"), get_federation_manager())
    return factory.state()


def test_a_cached_node_key_is_forgotten_when_the_node_is_unregistered(linkstate):
    key = b"bank-public-key"
    assert linkstate.get_node_id_by_public_key(key) is None  # unknown keys are not cached
    node_id = linkstate.create_node("owner", "owner", key, 10.0)
    assert linkstate.get_node_id_by_public_key(key) == node_id
    assert linkstate.get_node_id_by_public_key(key) == node_id  # from the cache
    linkstate.delete_node("owner", node_id)
    assert linkstate.get_node_id_by_public_key(key) is None  # revocation takes effect at once
    other = linkstate.create_node("owner", "owner", b"another-bank-key", 10.0)
    assert linkstate.get_node_id_by_public_key(b"another-bank-key") == other
    assert linkstate.get_node_id_by_public_key(key) is None


def test_patches_named_in_the_stock_list_are_left_out(monkeypatch):
    calls: list = []
    fakes = {name: (lambda name=name: calls.append(name) or True) for name in fast_superlink.PATCHES}
    monkeypatch.setattr(fast_superlink, "PATCHES", fakes)
    monkeypatch.setattr(
        fast_superlink, "patch_middleware", lambda direct=True: calls.append(("middleware", direct)) or True
    )
    monkeypatch.setattr(
        fast_superlink, "patch_complete_claims", lambda idle=True: calls.append(("claims", idle)) or True
    )
    monkeypatch.setattr(superlink_longpoll, "enable", lambda *on: calls.append(("held", *on)) or any(on))
    applied = fast_superlink.apply_patches({"traffic", "direct_routes"})
    assert applied["traffic"] is False
    assert all(took for name, took in applied.items() if name != "traffic")
    assert ("middleware", False) in calls and ("claims", True) in calls and "traffic" not in calls
    assert ("held", False, False) in calls  # long-polling needs the direct routes
    calls.clear()
    fast_superlink.apply_patches({"runtime_long_poll"})
    assert ("middleware", True) in calls and ("held", True, False) in calls
    calls.clear()
    assert not any(fast_superlink.apply_patches(set(fast_superlink.PATCHES)).values())
    assert calls == [("held", False, False)]
