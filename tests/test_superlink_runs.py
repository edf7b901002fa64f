"""The SuperLink's run-status cache and batched traffic counters keep Flower's answers."""

from __future__ import annotations

import pytest
from flwr.common.constant import NOOP_FLWR_AID, Status, SubStatus
from flwr.server.superlink.linkstate import sql_linkstate
from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
from flwr.supercore.corestate import sql_corestate
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories
from sqlalchemy import event

from server import fast_superlink, superlink_runs


@pytest.fixture
def linkstate(tmp_path, monkeypatch):
    """A real SQLite LinkState with both patches installed (undone afterwards) and one run."""
    cls = sql_linkstate.SqlLinkState
    for name in ("get_run_status", "store_traffic", "get_run_info"):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    core = sql_corestate.SqlCoreState
    monkeypatch.setattr(core, "_cleanup_expired_task_tokens", core._cleanup_expired_task_tokens)
    assert fast_superlink.patch_task_sweep()  # as the SuperLink runs: the token sweep writes only when due
    assert superlink_runs.patch_run_status_cache()
    assert superlink_runs.patch_traffic_batching()
    _, factory = get_objectstore_linkstate_factories(str(tmp_path / "state.db"), get_federation_manager())
    state = factory.state()
    run_id = state.create_run(
        None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP
    )
    return state, run_id


def _selects(state) -> list[str]:
    seen: list[str] = []
    event.listen(state._engine, "before_cursor_execute", lambda c, cur, stmt, *rest: seen.append(stmt))
    return seen


def test_a_cached_status_is_dropped_as_soon_as_the_run_changes(linkstate):
    state, run_id = linkstate
    assert state.get_run_status({run_id})[run_id].status == Status.PENDING
    seen = _selects(state)
    assert state.get_run_status({run_id})[run_id].status == Status.PENDING
    assert seen == []  # answered from the cache
    primary = state.get_run_info(run_ids=[run_id])[0].primary_task_id
    assert state.finish_task(primary, SubStatus.STOPPED, "")
    status = state.get_run_status({run_id})[run_id]
    assert (status.status, status.sub_status) == (Status.FINISHED, SubStatus.STOPPED)  # seen at once
    assert state.get_run_status({run_id, run_id + 1}).keys() == {run_id}  # several runs: Flower's read


def test_a_status_expires_after_its_ttl(linkstate, monkeypatch):
    state, run_id = linkstate
    state.get_run_status({run_id})
    clock = superlink_runs.time.monotonic() + superlink_runs.STATUS_TTL_S + 1
    monkeypatch.setattr(superlink_runs.time, "monotonic", lambda: clock)
    seen = _selects(state)
    state.get_run_status({run_id})
    assert seen  # read again


def test_status_writes_are_recognized():
    class Context:
        def __init__(self, table: str | None, kind: str) -> None:
            self.isinsert, self.isupdate, self.isdelete = kind == "insert", kind == "update", kind == "delete"
            self.compiled = type(
                "C", (), {"statement": type("S", (), {"table": type("T", (), {"name": table})})}
            )

    writes = superlink_runs.writes_status
    assert writes(
        "UPDATE task SET finished_at=?, sub_status=? WHERE task.task_id = ?", Context("task", "update")
    )
    assert not writes(
        "UPDATE task SET active_until=? WHERE task.task_id = ?", Context("task", "update")
    )  # heartbeat
    assert writes("UPDATE task SET active_until=?, running_at=? WHERE x", Context("task", "update"))
    assert writes("UPDATE task SET ...", Context("task", "update"))  # unparsed: assume it may
    assert writes("INSERT INTO run ...", Context("run", "insert"))
    assert not writes("UPDATE run SET bytes_sent ...", Context("run", "update"))
    assert not writes("INSERT INTO objects ...", Context("objects", "insert"))
    assert writes("DELETE ...", Context(None, "delete"))  # unknown table: assume it may
    assert writes("UPDATE task SET finished_at = 1", None)  # raw SQL
    assert not writes("SELECT 1", None)


def test_traffic_totals_are_complete_when_read(linkstate):
    state, run_id = linkstate
    for sent, recv in ((10, 0), (0, 5), (7, 3), (1, 1)):
        state.store_traffic(run_id, bytes_sent=sent, bytes_recv=recv)
    run = state.get_run_info(run_ids=[run_id])[0]
    assert (run.bytes_sent, run.bytes_recv) == (18, 9)
    state.store_traffic(run_id, bytes_sent=2, bytes_recv=0)
    assert state.get_run_info(run_ids=[run_id])[0].bytes_sent == 20


def test_traffic_errors_are_flowers(linkstate):
    state, run_id = linkstate
    with pytest.raises(ValueError, match="not found"):
        state.store_traffic(run_id + 1, bytes_sent=1, bytes_recv=0)
    state.store_traffic(run_id, bytes_sent=1, bytes_recv=0)
    with pytest.raises(ValueError, match="Negative traffic"):
        state.store_traffic(run_id, bytes_sent=-1, bytes_recv=0)
    with pytest.raises(ValueError, match="cannot be zero"):
        state.store_traffic(run_id, bytes_sent=0, bytes_recv=0)
