"""Which waiting SuperNodes a claim would hand a message now: the read-only scan behind long-polled pulls.

A claim (`SqlLinkState._claim_message_ins_rows`, one message at a time) takes the node's oldest pending
message (`delivered_at` empty, TTL not expired, ordered by creation time then id). With the complete-only
claims of server/superlink_state.py installed it takes it only once every object of its tree is available,
or once it is older than `superlink_state.HOLD_S`. This scan applies the same rule to all waiting nodes at
once in two statements (built once): their pending messages, then which of their oldest ones still miss an
object. It only decides which held pulls run Flower's own steps again (server/superlink_longpoll.py).
"""

from __future__ import annotations

import functools
from typing import Any

from server import superlink_state


@functools.cache
def statements() -> dict[str, Any]:
    """The pending-messages and incomplete-trees statements, with bound parameters."""
    from flwr.server.superlink.linkstate import sql_linkstate as models  # noqa: PLC0415
    from flwr.supercore.state.schema.objectstore_models import ObjectChild, StoredObject  # noqa: PLC0415
    from sqlalchemy import bindparam, select  # noqa: PLC0415

    message: Any = models.MessageInsModel.__table__
    stored: Any = StoredObject.__table__
    child: Any = ObjectChild.__table__
    pending = (
        select(message.c.dst_node_id, message.c.message_id, message.c.created_at)
        .where(
            message.c.dst_node_id.in_(bindparam("nodes", expanding=True)),
            message.c.delivered_at == "",
            message.c.created_at + message.c.ttl > bindparam("now"),
        )
        .order_by(message.c.created_at.asc(), message.c.message_id.asc())
    )
    roots = select(stored.c.object_id.label("root"), stored.c.object_id.label("oid")).where(
        stored.c.object_id.in_(bindparam("roots", expanding=True))
    )
    tree = roots.cte("fedfraud_tree", recursive=True)
    tree = tree.union(select(tree.c.root, child.c.child_id).where(child.c.parent_id == tree.c.oid))
    incomplete = (
        select(tree.c.root)
        .select_from(tree.join(stored, stored.c.object_id == tree.c.oid))
        .where(stored.c.is_available == 0)
        .distinct()
    )
    return {"pending": pending, "incomplete": incomplete}


def complete_only(state: Any) -> bool:
    """Whether this state's claims wait for complete messages (the complete-only claims are installed)."""
    claim = getattr(type(state), "_claim_message_ins_rows", None)
    return bool(getattr(claim, superlink_state.COMPLETE_ONLY_MARK, False))


def oldest_pending(state: Any, nodes: frozenset[int]) -> dict[int, tuple[str, float]]:
    """Each node's oldest claimable-by-age message: node id -> (message id, creation time)."""
    from flwr.server.superlink.linkstate import sql_linkstate as models  # noqa: PLC0415

    signed = {models.uint64_to_int64(node): node for node in nodes}
    params = {"nodes": sorted(signed), "now": models.now().timestamp()}
    oldest: dict[int, tuple[str, float]] = {}
    with state.session() as session:
        for dst, message_id, created_at in session.execute(statements()["pending"], params):
            oldest.setdefault(signed[dst], (str(message_id), float(created_at)))
    return oldest


def incomplete(store: Any, message_ids: set[str]) -> set[str]:
    """Those of the messages whose object tree misses at least one object."""
    if not message_ids:
        return set()
    with store.session() as session:
        rows = session.execute(statements()["incomplete"], {"roots": sorted(message_ids)})
        return {str(root) for (root,) in rows}


def claimable_nodes(state: Any, nodes: frozenset[int]) -> set[int]:
    """Of `nodes`, those whose pull would be handed a message now (two reads, no write)."""
    if not nodes:
        return set()
    from flwr.server.superlink.linkstate import sql_linkstate as models  # noqa: PLC0415

    oldest = oldest_pending(state, nodes)
    if not complete_only(state):
        return set(oldest)
    now = models.now().timestamp()
    hold = superlink_state.HOLD_S
    young = {message_id for message_id, created_at in oldest.values() if now - created_at < hold}
    waiting = incomplete(state.object_store, young)
    return {node for node, (message_id, _) in oldest.items() if message_id not in waiting}
