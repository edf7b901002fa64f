"""The SuperLink's task-token lookups cached while no task row is written: `python -m server.fast_superlink`.

Every Runtime API request of the ServerApp (hundreds per SecAgg+ round: message and object pushes, reply
polls, object pulls) authenticates its task token with `SqlCoreState.get_task_by_token`: an ORM read of the
task row and a `Task` built from it. Here the row's answer (the `Task` and its `active_until`) is kept for
at most `TOKEN_TTL_S`, and the whole cache is dropped whenever any statement writes the `task` table
(a heartbeat extending a token, a task starting or finishing, a token swept; or a statement whose table is
unknown) as it runs and again when its transaction ends; a value read while such a write ran is not kept.
A hit checks the expiry against the current time exactly as Flower does (`active_until < now` refuses), and
answers a copy: the same `Task`, or None, that Flower's read returns. If a Flower upgrade removes what is
patched, tokens are read from the database as before (with a logged warning).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from server.superlink_runs import WatchedCache, cache_of, target_table

logger = logging.getLogger(__name__)
TOKEN_TTL_S = 0.5
_TOKENS = "_fedfraud_task_tokens"


def writes_tasks(statement: str, context: Any) -> bool:
    """True when the statement may change what a token lookup returns: any `task` write, or unknown."""
    write = target_table(statement, context)
    return write is not None and write[1] in (None, "task")


def _token_cache() -> WatchedCache:
    return WatchedCache(TOKEN_TTL_S, writes_tasks, "fedfraud_task_write")


def patch_task_tokens() -> bool:
    """Answer task-token lookups from a cache while no task row is written; False when unpatched."""
    from flwr.supercore.corestate import sql_corestate as core  # noqa: PLC0415

    cls = core.SqlCoreState
    stock: Callable[..., Any] | None = getattr(cls, "get_task_by_token", None)
    model = getattr(core, "TaskModel", None)
    if stock is None or model is None or not hasattr(core, "task_from_model") or not hasattr(core, "now"):
        logger.warning("flwr: task tokens read from the database on every request")
        return False

    def read(self: Any, token: str) -> tuple[Any, Any] | None:
        """Flower's query: the token's unfinished task and its expiry, or None."""
        from sqlalchemy import select  # noqa: PLC0415

        query = select(model).where(model.token == token, model.finished_at.is_(None))
        with self.session() as session:
            row = session.scalars(query.execution_options(populate_existing=True)).first()
            return None if row is None else (core.task_from_model(row), row.active_until)

    @functools.wraps(stock)
    def cached(self: Any, token: str) -> Any:
        if getattr(self, "_engine", None) is None:
            return stock(self, token)
        tokens = cache_of(self, _TOKENS, _token_cache)
        found = tokens.get(token)
        if found is None:
            generation = tokens.generation
            found = read(self, token)
            if found is None:  # unknown or finished: not kept (a guessed token never fills the cache)
                return None
            tokens.put(token, found, generation)
        if found[1] is None or found[1] < core.now():  # Flower's expiry check, at this moment
            return None
        task = type(found[0])()
        task.CopyFrom(found[0])
        return task

    cls.get_task_by_token = cached  # type: ignore[method-assign]
    return True
