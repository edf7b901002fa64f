"""Long-polling: an empty SuperNode (or ServerApp) pull is held until there is something to hand out.

Why: a bank's SuperNode pulls every 0.2 s while busy (clients/fast_supernode.py) and most pulls find nothing
(~1,940 of 2,233 Fleet pulls in a 5-round 10-bank run): each one costs the SuperLink a TLS request, a
signature check and a thread hop, and the node the same again, on two shared cores.

What changes (direct routes only, SQLite state only): a pull that Flower's own steps (node authentication,
the handler) answered with no message is not answered at once. It waits, without a thread, for at most
`HOLD_S` for a committed write that may make a message claimable (any write to `message_ins` or `objects`,
or a statement whose table is unknown). After such writes settle (`SETTLE_S`), one shared read-only scan
asks which waiting nodes now have a message that a claim would take (their oldest pending message, complete
or held past `superlink_state.HOLD_S`, as the complete-only claims rule); only those pulls run Flower's steps
again, authentication included, and are answered with what those steps return. At the deadline Flower's steps
run once more and answer the pull (empty, unless a message came that the scan missed); a pull
whose node hung up is not run again. Every answer is therefore one that Flower gives to a pull arriving at
that moment (a node revoked meanwhile is refused): the wait only stands in for the node's next polls, and a
scan that misses a message only delays it to the deadline. The SuperNode's HTTP timeout (30 s) and
heartbeats (another connection) are untouched; clients/fast_supernode.py polls again at once after a held
pull instead of sleeping.

The ServerApp's reply pulls (`/v1/runtime/pull-messages`, every 0.1 s while it waits: server/fast_grid.py)
are held the same way, without a scan: any stored reply (an insert into `message_res`) runs Flower's steps,
task-token check included, again once writes settle. Replies that Flower makes up at read time (a node gone
offline, a TTL expired) and instructions addressed to the SuperLink itself are found by those reruns or at
the deadline, at most `HOLD_S` later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server.superlink_runs import target_table

logger = logging.getLogger(__name__)
HOLD_S = min(max(float(os.environ.get("FEDFRAUD_LONG_POLL_S", "1.5")), 0.0), 10.0)  # << HTTP timeouts (30 s)
SETTLE_S = 0.02  # writes come in bursts (a message's objects): scan once they settle
PULL_PATH = "/v1/fleet/pull-messages"
RUNTIME_PULL_PATH = "/v1/runtime/pull-messages"
WATCHED = frozenset({"message_ins", "objects"})  # the tables whose writes may make a message claimable
_CREATE = threading.Lock()
_ENABLED = {"fleet": False, "runtime": False}


def enable(fleet: bool = True, runtime: bool = True) -> bool:
    """Hold empty SuperNode (`fleet`) / ServerApp (`runtime`) pulls; False when both are off or unusable."""
    _ENABLED.update(fleet=False, runtime=False)
    if not (fleet or runtime):
        return False
    try:
        from flwr.proto.fleet_pb2 import PullMessagesResponse  # noqa: PLC0415, F401
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # noqa: PLC0415, F401
        from flwr.supercore.dependencies.runtime import get_runtime_state  # noqa: PLC0415, F401
        from flwr.superlink.dependencies.linkstate import get_linkstate  # noqa: PLC0415, F401

        from server.superlink_scan import statements  # noqa: PLC0415

        statements()  # Flower's schema as the scan reads it
    except Exception:  # a Flower upgrade moved what is used: every pull is answered at once
        logger.warning("flwr: SuperNode pulls answered at once (no long-polling)", exc_info=True)
        return False
    _ENABLED.update(fleet=fleet, runtime=runtime)
    return True


def writes_claimable(statement: str, context: Any) -> bool:
    """True when a statement may make a message claimable: a write to a watched table, or unknown."""
    write = target_table(statement, context)
    return write is not None and (write[1] is None or write[1] in WATCHED)


def writes_replies(statement: str, context: Any) -> bool:
    """True when a statement may store a reply: an insert into `message_res`, or unknown.

    (Not its claim, an UPDATE that every ServerApp pull runs.)
    """
    write = target_table(statement, context)
    return write is not None and (write[1] is None or write == ("insert", "message_res"))


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class CommitSignal:
    """Counts returned connections whose transaction ran a `writes` statement; wakes async waiters."""

    def __init__(self, writes: Callable[[str, Any], bool], mark: str) -> None:
        self.writes, self.mark = writes, mark
        self.generation = 0
        self.guard = threading.Lock()
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def bump(self) -> None:
        """A watched write was committed (or rolled back: a spurious wake costs one scan)."""
        with self.guard:
            self.generation += 1
            waiters, self.waiters = self.waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, future)

    async def changed(self, since: int, timeout: float) -> bool:
        """Wait until the generation moved past `since` (True) or `timeout` s passed (False)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.guard:
            if self.generation != since:
                return True
            self.waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            with self.guard, contextlib.suppress(ValueError):
                self.waiters.remove((loop, future))
        return self.generation != since

    def watch(self, engine: Any) -> None:
        """Mark a connection when it writes a watched table; bump once it is back in the pool (committed)."""
        from sqlalchemy import event  # noqa: PLC0415

        event.listen(engine, "after_cursor_execute", self._after_execute)
        event.listen(engine, "checkin", self._after_checkin)

    def _after_execute(self, conn: Any, *event_args: Any) -> None:
        _, statement, _, context, _ = event_args  # cursor, statement, parameters, context, executemany
        if self.writes(statement, context):
            conn.info[self.mark] = True

    def _after_checkin(self, dbapi_connection: Any, record: Any) -> None:
        if record is not None and record.info.pop(self.mark, False):
            self.bump()


Scan = Callable[[Any, frozenset[int]], set[int]]


class LongPoll:
    """The held pulls of one SQL LinkState: the commit signal, who waits, the shared scan (None: rerun)."""

    def __init__(self, state: Any, scan: Scan | None, signal: CommitSignal) -> None:
        self.state, self.scan, self.signal = state, scan, signal
        self.held: collections.Counter[int] = collections.Counter()
        self.last_scan: tuple[int, frozenset[int], asyncio.AbstractEventLoop, asyncio.Task] | None = None

    async def ready(self, node: int, seen: int) -> bool:
        """Whether a scan started at generation `seen` or later (shared) found `node` ready."""
        loop = asyncio.get_running_loop()
        last = self.last_scan
        if last is None or last[0] < seen or node not in last[1] or last[2] is not loop:
            generation, nodes = self.signal.generation, frozenset(self.held)
            last = (generation, nodes, loop, loop.create_task(self._scan(nodes)))
            self.last_scan = last
        return node in await asyncio.shield(last[3])

    async def _scan(self, nodes: frozenset[int]) -> set[int]:
        from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

        if self.scan is None:  # no scan: every settled write runs Flower's steps again
            return set(nodes)
        try:
            return await run_in_threadpool(self.scan, self.state, nodes)
        except Exception:  # the scan is a hint: every held pull runs Flower's own steps instead
            logger.warning("long-poll scan failed; held pulls polled again", exc_info=True)
            return set(nodes)

    async def answer(
        self, node: int, run: Callable[[], Awaitable[Any]], gone: Callable[[], Awaitable[bool]]
    ) -> Any:
        """Flower's answer to this pull now, or once a message can be claimed, or empty after `HOLD_S`."""
        seen = self.signal.generation  # before the first run: a write during it is not missed
        result = await run()
        if not _empty_pull(result) or HOLD_S <= 0:
            return result
        deadline = time.monotonic() + HOLD_S
        self.held[node] += 1
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                if not await self.signal.changed(seen, remaining):
                    break
                await asyncio.sleep(SETTLE_S)
                seen = self.signal.generation
                if not await self.ready(node, seen):
                    continue
                if await gone():
                    return result
                result = await run()
                if not _empty_pull(result):
                    return result
        finally:
            self.held[node] -= 1
            if self.held[node] <= 0:
                del self.held[node]
        return result if await gone() else await run()  # as Flower answers a pull arriving now


def _empty_pull(result: Any) -> bool:
    from flwr.proto.fleet_pb2 import PullMessagesResponse  # noqa: PLC0415
    from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # noqa: PLC0415

    pulled = isinstance(result, PullMessagesResponse | PullAppMessagesResponse)
    return pulled and not result.messages_list


def holder(path: str, request: Any) -> tuple[LongPoll, int] | None:
    """The long-poll for this request and its key (node id), or None when it is answered at once."""
    kind = "fleet" if path == PULL_PATH else "runtime" if path == RUNTIME_PULL_PATH else None
    if kind is None or not _ENABLED[kind]:
        return None
    from flwr.supercore.dependencies.runtime import get_runtime_state  # noqa: PLC0415
    from flwr.superlink.dependencies.linkstate import get_linkstate  # noqa: PLC0415

    node = getattr(getattr(request.state, "protobuf_request", None), "node", None)
    try:
        state = get_linkstate(request) if kind == "fleet" else get_runtime_state(request)
    except Exception:  # Flower's dependency reports this again when the route runs
        return None
    store = getattr(state, "object_store", None)
    sql = all(getattr(s, "database_backend", None) == "sqlite" for s in (state, store))
    if (kind == "fleet" and node is None) or not sql or getattr(state, "_engine", None) is None:
        return None
    return long_poll_of(state, kind), int(node.node_id) if node is not None and kind == "fleet" else 0


def long_poll_of(state: Any, kind: str = "fleet") -> LongPoll:
    """The state's fleet or runtime long-poll, watching its LinkState and ObjectStore engines."""
    from server.superlink_scan import claimable_nodes  # noqa: PLC0415

    attribute = f"_fedfraud_long_poll_{kind}"
    poll = state.__dict__.get(attribute)
    if poll is None:
        with _CREATE:
            poll = state.__dict__.get(attribute)
            if poll is None:
                fleet = kind == "fleet"
                signal = CommitSignal(writes_claimable if fleet else writes_replies, f"fedfraud_{kind}_write")
                poll = LongPoll(state, claimable_nodes if fleet else None, signal)
                engines = {id(e): e for e in (state._engine, state.object_store._engine) if e is not None}
                for engine in engines.values():
                    signal.watch(engine)
                state.__dict__[attribute] = poll
    return poll
