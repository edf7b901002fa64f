"""The SuperLink's task-token cache answers as Flower's lookup and drops what a task write changes."""

from __future__ import annotations

import datetime

import pytest
from flwr.common.constant import NOOP_FLWR_AID, SubStatus
from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType
from flwr.supercore.corestate import sql_corestate
from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories
from sqlalchemy import event

from server import superlink_runs, superlink_tokens


def _state(tmp_path, name: str):
    _, factory = get_objectstore_linkstate_factories(str(tmp_path / name), get_federation_manager())
    state = factory.state()
    run_id = state.create_run(
        None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, TaskType.SERVER_APP
    )
    task_id = state.get_run_info(run_ids=[run_id])[0].primary_task_id
    return state, task_id


@pytest.fixture
def states(tmp_path, monkeypatch):
    """(stock state, its task id), (cached state, its task id): the cache installed on the class."""
    core = sql_corestate.SqlCoreState
    monkeypatch.setattr(core, "get_task_by_token", core.get_task_by_token)
    stock = _state(tmp_path, "stock.db")
    stock_lookup = core.get_task_by_token
    assert superlink_tokens.patch_task_tokens()
    cached = _state(tmp_path, "cached.db")
    return stock, cached, stock_lookup


def _reads(state) -> list[str]:
    seen: list[str] = []
    event.listen(state._engine, "before_cursor_execute", lambda c, cur, stmt, *rest: seen.append(stmt))
    return seen


def _same(stock_lookup, stock, cached, tokens) -> None:
    """Both states answer their token (and a guessed one) alike, but for the ids that differ."""
    for token_stock, token_cached in ((tokens[0], tokens[1]), ("guessed", "guessed"), ("", "")):
        want, got = stock_lookup(stock[0], token_stock), cached[0].get_task_by_token(token_cached)
        assert (want is None) == (got is None)
        if want is not None:
            assert (got.status, got.run_id != 0, got.type) == (want.status, True, want.type)
            assert (got.starting_at == "", got.running_at == "") == (
                want.starting_at == "",
                want.running_at == "",
            )


def test_lookups_answer_as_flower_through_a_task_lifecycle(states):
    stock, cached, stock_lookup = states
    tokens = (stock[0].claim_task(stock[1]), cached[0].claim_task(cached[1]))
    _same(stock_lookup, stock, cached, tokens)
    seen = _reads(cached[0])
    cached[0].get_task_by_token(tokens[1])
    assert seen == []  # from the cache
    for state, task_id in (stock, cached):
        assert state.activate_task(task_id)
    _same(stock_lookup, stock, cached, tokens)  # running now: seen at once
    assert cached[0].get_task_by_token(tokens[1]).running_at != ""
    for state, task_id in (stock, cached):
        assert state.finish_task(task_id, SubStatus.COMPLETED, "")
    _same(stock_lookup, stock, cached, tokens)
    assert cached[0].get_task_by_token(tokens[1]) is None  # finished: the token is refused at once


def test_an_expired_token_is_refused_although_cached(states, monkeypatch):
    _, (state, task_id), _ = states
    token = state.claim_task(task_id)
    assert state.get_task_by_token(token) is not None
    later = sql_corestate.now() + datetime.timedelta(hours=1)
    monkeypatch.setattr(sql_corestate, "now", lambda: later)
    seen = _reads(state)
    assert state.get_task_by_token(token) is None and seen == []  # the cached expiry, checked now


def test_a_heartbeat_drops_the_cached_expiry(states):
    _, (state, task_id), _ = states
    token = state.claim_task(task_id)
    state.get_task_by_token(token)
    state.activate_task(task_id)
    seen = _reads(state)
    assert state.acknowledge_task_heartbeat(task_id)
    seen.clear()
    assert state.get_task_by_token(token) is not None and seen  # read again after the task write


def test_a_cached_task_expires_after_its_ttl(states, monkeypatch):
    _, (state, task_id), _ = states
    token = state.claim_task(task_id)
    state.get_task_by_token(token)
    clock = superlink_runs.time.monotonic() + superlink_tokens.TOKEN_TTL_S + 1
    monkeypatch.setattr(superlink_runs.time, "monotonic", lambda: clock)
    seen = _reads(state)
    assert state.get_task_by_token(token) is not None and seen


def test_the_answer_is_a_copy(states):
    _, (state, task_id), _ = states
    token = state.claim_task(task_id)
    state.get_task_by_token(token).run_id = 1
    assert state.get_task_by_token(token).run_id != 1


def test_task_writes_are_recognized():
    assert superlink_tokens.writes_tasks("UPDATE task SET x = 1", None)  # unknown table: a write
    assert not superlink_tokens.writes_tasks("SELECT * FROM task", None)
