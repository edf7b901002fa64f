"""Pull pacing on both ends: a pull that the SuperLink held counts towards the wait before the next one."""

from __future__ import annotations

from clients import fast_supernode
from server import fast_grid
from server.fast_grid import PromptGrid


class _Clock:
    """A stand-in for the `time` module: records sleeps, advances on demand."""

    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))
        self.now += seconds


def test_the_node_polls_again_at_once_after_a_held_pull():
    real = _Clock()
    clock = fast_supernode._PromptTime(real)  # type: ignore[arg-type]
    clock.last_message = real.now  # busy
    clock.sleep(3)  # after a pull that was not timed (stock path): the busy interval
    clock.empty_pull_s = 0.01  # a quick empty pull (a SuperLink that does not hold)
    clock.sleep(3)
    clock.empty_pull_s = 1.5  # held by the SuperLink
    clock.sleep(3)
    assert real.slept == [fast_supernode.BUSY_POLL_S, round(fast_supernode.BUSY_POLL_S - 0.01, 3)]
    clock.sleep(0.5)  # a local wait is not shortened by an earlier pull
    assert real.slept[-1] == fast_supernode.LOCAL_POLL_S


def test_an_idle_node_keeps_flowers_pull_interval():
    real = _Clock()
    clock = fast_supernode._PromptTime(real)  # type: ignore[arg-type]
    clock.empty_pull_s = 1.5
    clock.sleep(3)
    clock.sleep(3)
    assert real.slept == [1.5, 3]  # a pull starts every 3 s, as stock, held or not


class _Message:
    def __init__(self, reply_to: str) -> None:
        self.metadata = type("M", (), {"reply_to_message_id": reply_to, "dst_node_id": 5, "src_node_id": 5})
        self.content = type("C", (), {"config_records": {}})()

    def has_error(self) -> bool:
        return False

    def has_content(self) -> bool:
        return False


class _Grid:
    """Pushes one message; its first pull is held (the clock moves 0.3 s) and empty, the second answers."""

    def __init__(self, clock: _Clock) -> None:
        self.clock, self.pulls = clock, 0

    def push_messages(self, messages):
        return ["m1"]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls == 1:
            self.clock.now += 0.3
            return []
        return [_Message("m1")]


def test_the_serverapp_pulls_again_at_once_after_a_held_pull(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(fast_grid, "time", clock)
    inner = _Grid(clock)
    grid = PromptGrid(inner, poll_s=0.25)  # type: ignore[arg-type]
    outgoing = _Message("")
    replies = list(grid.send_and_receive([outgoing]))  # type: ignore[list-item]
    assert len(replies) == 1 and inner.pulls == 2
    assert clock.slept == [0.0]  # the held pull took longer than the 0.25 s interval: no wait after it


def _stored_reply_state():
    from flwr.app import Message, RecordDict  # noqa: PLC0415
    from flwr.supercore.object_store import ObjectStoreFactory  # noqa: PLC0415
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState  # noqa: PLC0415

    from tests._helpers_messages import server_message  # noqa: PLC0415

    state = InMemoryNodeState(ObjectStoreFactory().store())
    instruction = server_message(RecordDict())
    state.store_message(instruction)
    assert fast_supernode.pending_reply_run(state) is None  # an instruction is not a reply
    reply = Message(RecordDict(), reply_to=instruction)
    reply.metadata.__dict__["_message_id"] = reply.object_id  # as the node stores a ClientApp's reply
    state.store_message(reply)
    return state


def test_a_reply_left_behind_after_a_push_is_pushed_without_waiting_for_a_message(monkeypatch):
    import flwr.supernode.fleet_http_connection as connection  # noqa: PLC0415
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415
    from flwr.supercore import heartbeat  # noqa: PLC0415

    for module, name in [(loop, "time"), (loop, "pull_objects"), (connection, "HEARTBEAT_DEFAULT_INTERVAL")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", heartbeat.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(loop, "_pull_and_store_message", lambda **kwargs: None)  # the SuperLink has nothing
    assert fast_supernode.patch_polling()
    state = _stored_reply_state()
    assert fast_supernode.pending_reply_run(state) == 1
    assert loop._pull_and_store_message(state=state) == 1  # so Flower's loop pushes it now
    assert [m.metadata.run_id for m in state.get_messages_legacy(is_reply=True)] == [1]  # what it pushes
    assert fast_supernode.pending_reply_run(state) is None
    assert loop._pull_and_store_message(state=state) is None  # nothing left: the loop sleeps as before
