"""Two patches of the SuperLink's SQL LinkState for per-object requests: run status cached, traffic batched.

Every Fleet object pull or push (hundreds per SecAgg+ round) first reads its run's status (`check_abort`)
and, once served, adds its bytes to the run's traffic counters: a read and a write transaction per request,
a fifth of the SuperLink's CPU once the HTTP layers were trimmed.

- **Run status.** `get_run_status` for one run is answered from a cache for at most `STATUS_TTL_S`. Every
  write to the `task` table (a run's status is its primary task's timestamps, sub-status and details), except
  an UPDATE that assigns nothing but `active_until` / `token` (task heartbeats and claims), every insert
  or delete on `run`, as well as any statement whose target table is unknown, drops the whole cache when it is
  executed and again when its transaction ends, and a value read while such a write ran is not cached: a
  status change made through this process is seen by the very next request, as before. A hit skips the
  expired-task-token sweep that Flower runs first; the sweep still runs on the other requests (and on the
  next miss), so a token's expiry is noticed at most `STATUS_TTL_S` later.
- **Traffic.** `store_traffic` validates its arguments exactly as Flower does (same errors), checks once
  per run that the run exists (runs are never deleted; an unknown run still raises "Run ... not found"), and
  adds the bytes to in-memory totals written with Flower's own `store_traffic` at most `TRAFFIC_FLUSH_S`
  later, before any `get_run_info` (the only reader of the counters: run listings, `flwr ls`) and at exit.
  Readers therefore see the same totals as before; at most the last second of counts of a SuperLink killed
  without exiting is lost.

If a Flower upgrade removes what is patched, the SuperLink runs stock and logs a warning.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)
STATUS_TTL_S = 0.5
TRAFFIC_FLUSH_S = 1.0
_STATUS_TABLES = frozenset({"task"})  # any write but an update of these columns only (heartbeats, claims)
_NOT_STATUS_COLUMNS = frozenset({"active_until", "token"})
_SET_CLAUSE = re.compile(r"\s*UPDATE\s+\S+\s+SET\s+(.*?)(?:\s+WHERE\s|\s+RETURNING\s|$)", re.S | re.I)
_RUN_TABLES = frozenset({"run"})  # inserts and deletes (a run's primary task is set when it is created)
_DIRTY = "fedfraud_status_write"
_STATUS = "_fedfraud_status_cache"
_TOTALS = "_fedfraud_traffic_totals"
_CREATE = threading.Lock()
_WITH_TOTALS: weakref.WeakSet[Any] = weakref.WeakSet()


class WatchedCache:
    """Values read from the database, each valid for `ttl` s while no write that `writes` flags has run."""

    def __init__(self, ttl: float, writes: Callable[[str, Any], bool], mark: str) -> None:
        self.ttl, self.writes, self.mark = ttl, writes, mark
        self.generation = 0
        self.entries: dict[Any, tuple[float, int, Any]] = {}
        self.guard = threading.Lock()

    def invalidate(self) -> None:
        """Forget every cached value (a relevant write started or ended)."""
        with self.guard:
            self.generation += 1
            self.entries.clear()

    def get(self, key: Any) -> Any | None:
        """The cached value, or None when absent, stale or older than a relevant write."""
        with self.guard:
            hit = self.entries.get(key)
            if hit is None or hit[1] != self.generation or time.monotonic() - hit[0] >= self.ttl:
                return None
            return hit[2]

    def put(self, key: Any, value: Any, generation: int) -> None:
        """Cache a value read while the write generation was `generation` (dropped if it moved on)."""
        with self.guard:
            if generation == self.generation:
                self.entries[key] = (time.monotonic(), generation, value)

    def watch(self, engine: Any) -> None:
        """Invalidate on every relevant write executed on `engine` and when its transaction ends."""
        from sqlalchemy import event  # noqa: PLC0415

        event.listen(engine, "after_cursor_execute", self._after_execute)
        event.listen(engine, "commit", self._after_transaction)
        event.listen(engine, "rollback", self._after_transaction)

    def _after_execute(self, conn: Any, *event_args: Any) -> None:
        _, statement, _, context, _ = event_args  # cursor, statement, parameters, context, executemany
        if self.writes(statement, context):
            conn.info[self.mark] = True
            self.invalidate()

    def _after_transaction(self, conn: Any) -> None:
        if conn.info.pop(self.mark, False):
            self.invalidate()


def target_table(statement: str, context: Any) -> tuple[str, str | None] | None:
    """("insert" | "update" | "delete", its table name or None if unknown) for a write; None for a read."""
    if context is not None and (context.isinsert or context.isupdate or context.isdelete):
        table = getattr(getattr(getattr(context, "compiled", None), "statement", None), "table", None)
        kind = "insert" if context.isinsert else "update" if context.isupdate else "delete"
        return kind, getattr(table, "name", None)
    compiled = getattr(getattr(context, "compiled", None), "statement", None)
    if getattr(compiled, "is_select", False) is True:  # a SELECT construct, CTEs included (`WITH ... SELECT`)
        return None
    if statement.lstrip()[:6].upper().startswith(("SELECT", "PRAGMA")):
        return None
    return "unknown", None


def writes_status(statement: str, context: Any) -> bool:
    """True when the statement may change a run's status: a task write, a run insert/delete, or unknown."""
    write = target_table(statement, context)
    if write is None:
        return False
    kind, name = write
    if name in _STATUS_TABLES and kind == "update":
        assigned = assigned_columns(statement)
        return assigned is None or not assigned <= _NOT_STATUS_COLUMNS
    if name is None or name in _STATUS_TABLES:
        return True
    return name in _RUN_TABLES and kind != "update"


def assigned_columns(statement: str) -> set[str] | None:
    """The names an UPDATE's SET clause assigns (a superset: junk from nested commas), or None if unparsed."""
    match = _SET_CLAUSE.match(statement)
    if match is None:
        return None
    return {part.split("=", 1)[0].strip().strip('"') for part in match.group(1).split(",")}


def cache_of(state: Any, attribute: str, make: Callable[[], WatchedCache]) -> WatchedCache:
    """The instance's cache kept in `attribute`, watching its engine (created on first use)."""
    cache = state.__dict__.get(attribute)
    if cache is None:
        with _CREATE:
            cache = state.__dict__.get(attribute)
            if cache is None:
                cache = make()
                cache.watch(state._engine)
                state.__dict__[attribute] = cache
    return cache


def _status_cache() -> WatchedCache:
    return WatchedCache(STATUS_TTL_S, writes_status, _DIRTY)


def patch_run_status_cache() -> bool:
    """Answer one run's status from a cache while no status write has run; False when unpatched."""
    from flwr.server.superlink.linkstate import sql_linkstate  # noqa: PLC0415

    cls = sql_linkstate.SqlLinkState
    stock: Callable[..., dict[int, Any]] | None = getattr(cls, "get_run_status", None)
    if stock is None:
        logger.warning("flwr: run status read from the database on every request")
        return False

    @functools.wraps(stock)
    def cached(self: Any, run_ids: set[int]) -> dict[int, Any]:
        if len(run_ids) != 1 or getattr(self, "_engine", None) is None:
            return stock(self, run_ids)
        statuses = cache_of(self, _STATUS, _status_cache)
        (run_id,) = run_ids
        hit = statuses.get(run_id)
        if hit is not None:
            return {run_id: dataclasses.replace(hit)}
        generation = statuses.generation
        result = stock(self, run_ids)
        if run_id in result:
            statuses.put(run_id, dataclasses.replace(result[run_id]), generation)
        return result

    cls.get_run_status = cached  # type: ignore[method-assign]
    return True


class TrafficTotals:
    """Traffic bytes per run not yet written, and the runs known to exist."""

    def __init__(self) -> None:
        self.pending: dict[int, list[int]] = {}
        self.known: set[int] = set()
        self.guard = threading.Lock()
        self.flushed_at = time.monotonic()

    def add(self, run_id: int, sent: int, recv: int) -> bool:
        """Add to the run's totals; True when a flush is due."""
        with self.guard:
            totals = self.pending.setdefault(run_id, [0, 0])
            totals[0] += sent
            totals[1] += recv
            return time.monotonic() - self.flushed_at >= TRAFFIC_FLUSH_S

    def take(self) -> dict[int, list[int]]:
        """The pending totals, now cleared."""
        with self.guard:
            pending, self.pending = self.pending, {}
            self.flushed_at = time.monotonic()
            return pending


def _validate(run_id: int, bytes_sent: int, bytes_recv: int) -> None:
    """Flower's own argument checks of `store_traffic`, with its messages."""
    if bytes_sent < 0 or bytes_recv < 0:
        raise ValueError(
            f"Negative traffic values for run {run_id}: bytes_sent={bytes_sent}, bytes_recv={bytes_recv}"
        )
    if bytes_sent == 0 and bytes_recv == 0:
        raise ValueError(f"Both bytes_sent and bytes_recv cannot be zero for run {run_id}")


def _totals_of(state: Any) -> TrafficTotals:
    """The instance's pending traffic totals (created on first use, remembered for the exit flush)."""
    totals = state.__dict__.get(_TOTALS)
    if totals is None:
        with _CREATE:
            totals = state.__dict__.setdefault(_TOTALS, TrafficTotals())
            _WITH_TOTALS.add(state)
    return totals


def patch_traffic_batching() -> bool:
    """Write each run's traffic counters about once a second and before every read; False when unpatched."""
    from flwr.server.superlink.linkstate import sql_linkstate  # noqa: PLC0415

    cls = sql_linkstate.SqlLinkState
    store: Callable[..., None] | None = getattr(cls, "store_traffic", None)
    read: Callable[..., Any] | None = getattr(cls, "get_run_info", None)
    if store is None or read is None:
        logger.warning("flwr: traffic counters written on every request")
        return False

    def flush(state: Any) -> None:
        for run_id, (sent, recv) in _totals_of(state).take().items():
            if sent or recv:
                store(state, run_id, bytes_sent=sent, bytes_recv=recv)

    @functools.wraps(store)
    def batched(self: Any, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
        _validate(run_id, bytes_sent, bytes_recv)
        totals = _totals_of(self)
        if run_id not in totals.known:  # Flower's write, which raises if the run does not exist
            store(self, run_id, bytes_sent=bytes_sent, bytes_recv=bytes_recv)
            totals.known.add(run_id)
            return
        if totals.add(run_id, bytes_sent, bytes_recv):
            flush(self)

    @functools.wraps(read)
    def read_flushed(self: Any, *args: Any, **kwargs: Any) -> Any:
        flush(self)
        return read(self, *args, **kwargs)

    def flush_all() -> None:
        for state in list(_WITH_TOTALS):
            try:
                flush(state)
            except Exception:  # the database may be gone at exit
                logger.debug("traffic counters not flushed at exit", exc_info=True)

    cls.store_traffic = batched  # type: ignore[method-assign]
    cls.get_run_info = read_flushed  # type: ignore[method-assign]
    atexit.register(flush_all)
    return True
