"""Two patches of the SuperLink's SQL LinkState (this process only): cached node keys, complete-only claims.

- **Node keys.** Node authentication looks up the node of every Fleet request's public key in the database.
  The answer is cached and the cache dropped whenever a node is created or unregistered, so a revoked key is
  refused at its very next request. (The request's signature is still verified every time.)
- **Complete-only claims.** The ServerApp registers a message, then pushes its objects one by one; a node
  that pulls the message in between finds objects not yet available and retries each of them with a backoff
  (a third of a 10-bank SecAgg+ round's Fleet requests were such retries). Here a node's poll first reads
  which message it would be handed and whether every object of that message's tree is available; if not,
  the poll answers "nothing yet" without claiming it, and the node polls again. A message still incomplete
  `HOLD_S` after it was created (the ServerApp died while pushing it) is handed out as Flower does, so it
  cannot hold up the node's later messages. A poll with nothing to hand out no longer opens a write
  transaction either. The claim itself is Flower's own, unchanged.
- **Idle polls.** Most polls find nothing (a bank polls every few hundred ms between rounds and stages). When
  a node's poll finds no claimable message at all, that is remembered until any row of `message_ins` is
  written (a message stored, claimed, released or deleted: the only ways a message can become claimable) or
  for `IDLE_TTL_S` at most, and the node's next polls answer "nothing" without a database transaction. A
  message stored through this SuperLink is therefore handed out at the node's very next poll, as before.

If a Flower upgrade removes what is patched, the SuperLink runs stock and logs a warning.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from server.superlink_runs import WatchedCache, cache_of, target_table

logger = logging.getLogger(__name__)
HOLD_S = 30.0  # a message still incomplete this long after its creation is handed out as Flower does
IDLE_TTL_S = 1.0  # a node found with nothing to claim is answered "nothing" without a read this long at most
_IDLE = "_fedfraud_idle_nodes"
COMPLETE_ONLY_MARK = "_fedfraud_complete_only"  # set on the installed claim (read by superlink_scan.py)


def patch_node_lookup() -> bool:
    """Cache each public key's node id; dropped whenever a node is created or unregistered."""
    from flwr.server.superlink.linkstate import sql_linkstate  # noqa: PLC0415

    cls = sql_linkstate.SqlLinkState
    lookup = getattr(cls, "get_node_id_by_public_key", None)
    create, delete = getattr(cls, "create_node", None), getattr(cls, "delete_node", None)
    if lookup is None or create is None or delete is None:
        logger.warning("flwr: node keys looked up on every request")
        return False
    cache: dict[bytes, int] = {}
    guard = threading.Lock()
    epoch = [0, 0]  # [changes started, changes finished]: cache only what was read while none was running

    def cached_lookup(self: Any, public_key: bytes) -> int | None:
        with guard:
            if public_key in cache:
                return cache[public_key]
            started = tuple(epoch)
        node_id = lookup(self, public_key)
        with guard:
            if node_id is not None and tuple(epoch) == started and started[0] == started[1]:
                cache[public_key] = node_id
        return node_id

    def invalidating(write: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(write)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with guard:
                epoch[0] += 1
                cache.clear()
            try:
                return write(self, *args, **kwargs)
            finally:
                with guard:
                    epoch[1] += 1
                    cache.clear()

        return wrapper

    cls.get_node_id_by_public_key = cached_lookup  # type: ignore[method-assign]
    cls.create_node = invalidating(create)  # type: ignore[method-assign]
    cls.delete_node = invalidating(delete)  # type: ignore[method-assign]
    return True


def _next_message(state: Any, models: Any, node_id: int, run_id: int | None) -> tuple[str, float] | None:
    """The message a claim for this node would take now and its creation time (read only), or None."""
    from sqlalchemy import select  # noqa: PLC0415

    message = models.MessageInsModel
    conditions = [
        message.dst_node_id == models.uint64_to_int64(node_id),
        message.delivered_at == "",
        message.created_at + message.ttl > models.now().timestamp(),
    ]
    if run_id is not None:
        conditions.append(message.run_id == models.uint64_to_int64(run_id))
    query = select(message.message_id, message.created_at).where(*conditions)
    query = query.order_by(message.created_at.asc(), message.message_id.asc()).limit(1)
    with state.session() as session:
        row = session.execute(query).first()
    return (str(row[0]), float(row[1])) if row is not None else None


def _missing_objects(store: Any, message_id: str) -> int:
    """How many objects of the message's tree (the message included) are not available yet."""
    from flwr.supercore.state.schema.objectstore_models import ObjectChild, StoredObject  # noqa: PLC0415
    from sqlalchemy import func, literal, select  # noqa: PLC0415

    tree = select(literal(message_id).label("object_id")).cte("tree", recursive=True)
    tree = tree.union(select(ObjectChild.child_id).where(ObjectChild.parent_id == tree.c.object_id))
    missing = select(func.count()).where(
        StoredObject.object_id.in_(select(tree.c.object_id)), StoredObject.is_available == 0
    )
    with store.session() as session:
        return int(session.scalar(missing) or 0)


def patch_complete_claims(idle: bool = True) -> bool:
    """Hand a node a message only once all its objects are on the SuperLink; False when unpatched."""
    from flwr.server.superlink.linkstate import sql_linkstate as models  # noqa: PLC0415

    cls = models.SqlLinkState
    claim: Callable[..., list[Any]] | None = getattr(cls, "_claim_message_ins_rows", None)
    needed = ("MessageInsModel", "uint64_to_int64", "now")
    if claim is None or not hasattr(cls, "get_message_ins") or not all(hasattr(models, n) for n in needed):
        logger.warning("flwr: messages handed out before their objects are all stored")
        return False

    def claim_complete(self: Any, node_id: int, limit: int | None, run_id: int | None = None) -> list[Any]:
        if limit != 1:  # only the SuperNode's one-at-a-time pull is gated
            return claim(self, node_id, limit, run_id)
        marks = _idle_of(self) if idle else None
        generation = marks.generation if marks is not None else 0
        candidate = _next_message(self, models, node_id, run_id)
        if candidate is None:
            if marks is not None:
                marks.put((node_id, run_id), True, generation)
            return []
        message_id, created_at = candidate
        young = models.now().timestamp() - created_at < HOLD_S
        if young and _missing_objects(self.object_store, message_id):
            return []
        return claim(self, node_id, limit, run_id)  # complete, or stuck: Flower's own handling

    setattr(claim_complete, COMPLETE_ONLY_MARK, True)
    get: Callable[..., list[Any]] = cls.get_message_ins

    @functools.wraps(get)
    def get_unless_idle(
        self: Any, node_id: int, limit: int | None, *, run_id: int | None = None
    ) -> list[Any]:
        idle = _idle_of(self)
        if limit == 1 and idle is not None and idle.get((node_id, run_id)):
            return []  # nothing for this node, and no message written since that was read
        return get(self, node_id, limit, run_id=run_id)

    cls._claim_message_ins_rows = claim_complete  # type: ignore[method-assign]
    if idle:
        cls.get_message_ins = get_unless_idle  # type: ignore[method-assign]
    return True


def writes_messages(statement: str, context: Any) -> bool:
    """True when the statement may make a message claimable: any write to `message_ins`, or unknown."""
    write = target_table(statement, context)
    return write is not None and write[1] in (None, "message_ins")


def _idle_of(state: Any) -> WatchedCache | None:
    """The state's idle-node cache, or None for a state without an SQL engine."""
    if getattr(state, "_engine", None) is None:
        return None
    return cache_of(state, _IDLE, lambda: WatchedCache(IDLE_TTL_S, writes_messages, "fedfraud_message_write"))
