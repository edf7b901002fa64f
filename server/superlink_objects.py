"""The SuperLink's object-store tree statements, built once: `python -m server.fast_superlink` installs it.

Every message pushed to the SuperLink (a SecAgg+ reply, or each of the ServerApp's instructions) has its
object tree preregistered, and every message handed to a SuperNode has its tree read back. Flower's SQL
ObjectStore builds a fresh SQLAlchemy statement, ORM-style, for every statement of every node of the tree
(three to five per object), and building and cache-keying a statement costs more than SQLite's execution of
it: a `push_messages` took ~20 ms of the SuperLink's single-process CPU, the ServerApp's push of ten
messages ~200 ms.

What changes: `SqlObjectStore.preregister` and `get_object_tree` run the very same SQL statements, in the same
order, in the same transaction (and, for `preregister`, under Flower's own `_mutation_session` lock), with the
same checks and error messages, but the statements are built once with bound parameters and executed on the
session's connection. The rows written and read are identical. Only SQLite is handled (the backend
`fast_superlink` runs); any other backend, and any Flower upgrade that moves what is used here, runs Flower's
code (with a logged warning when it cannot be patched).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)
_NEEDED = ("StoredObject", "ObjectChild", "RunObject", "iterate_object_tree", "is_valid_sha256_hash",
           "uint64_to_int64", "NoObjectInStoreError", "ObjectTree")  # fmt: skip


@functools.cache
def statements() -> dict[str, Any]:
    """Flower's preregistration and tree-reading statements, with bound parameters (built once)."""
    from flwr.supercore.object_store import sql_object_store as objects  # noqa: PLC0415
    from sqlalchemy import bindparam, insert, select, update  # noqa: PLC0415
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert  # noqa: PLC0415

    stored: Any = objects.StoredObject.__table__
    child: Any = objects.ObjectChild.__table__
    run: Any = objects.RunObject.__table__
    new_object = sqlite_insert(stored).values(
        object_id=bindparam("oid"), content=b"", is_available=0, ref_count=0
    )
    return {
        "insert_object": new_object.on_conflict_do_nothing(index_elements=[stored.c.object_id]).returning(
            stored.c.object_id
        ),
        "is_available": select(stored.c.is_available).where(stored.c.object_id == bindparam("oid")),
        "exists": select(stored.c.object_id).where(stored.c.object_id == bindparam("oid")),
        "children": select(child.c.child_id).where(child.c.parent_id == bindparam("oid")),
        "insert_child": insert(child).values(parent_id=bindparam("oid"), child_id=bindparam("cid")),
        "add_ref": update(stored)
        .where(stored.c.object_id == bindparam("cid"))
        .values(ref_count=stored.c.ref_count + 1),
        "insert_run_object": sqlite_insert(run)
        .values(run_id=bindparam("rid"), object_id=bindparam("oid"))
        .on_conflict_do_nothing(),
    }


def preregister(store: Any, objects: Any, run_id: int, object_tree: Any) -> list[str]:
    """Flower's `SqlObjectStore.preregister`, statement for statement, with prebuilt statements."""
    sql = statements()
    new_objects = []
    tree_nodes = list(objects.iterate_object_tree(object_tree))
    for tree_node in tree_nodes:
        if not objects.is_valid_sha256_hash(tree_node.object_id):
            raise ValueError(f"Invalid object ID format: {tree_node.object_id}")
    run = objects.uint64_to_int64(run_id)
    with store._mutation_session() as session:
        session.flush()  # what Flower's first ORM execute would autoflush (nothing, in Flower 1.42)
        conn = session.connection()
        for tree_node in tree_nodes:
            obj_id = tree_node.object_id
            child_ids = [c.object_id for c in tree_node.children]
            if len(child_ids) != len(set(child_ids)):
                raise ValueError(f"Object {obj_id} has duplicate children.")
            is_new = conn.execute(sql["insert_object"], {"oid": obj_id}).first() is not None
            if is_new:
                new_objects.append(obj_id)
            else:
                if conn.execute(sql["is_available"], {"oid": obj_id}).scalar() == 0:
                    new_objects.append(obj_id)
                existing = set(conn.execute(sql["children"], {"oid": obj_id}).scalars())
                if existing != set(child_ids):
                    raise ValueError(f"Object {obj_id} was preregistered with different children.")
            if is_new:
                for cid in child_ids:
                    conn.execute(sql["insert_child"], {"oid": obj_id, "cid": cid})
                    conn.execute(sql["add_ref"], {"cid": cid})
            conn.execute(sql["insert_run_object"], {"rid": run, "oid": obj_id})
    return new_objects


def object_tree(conn: Any, objects: Any, object_id: str) -> Any:
    """Flower's `SqlObjectStore.get_object_tree` on one connection, with prebuilt statements."""
    sql = statements()
    if conn.execute(sql["exists"], {"oid": object_id}).scalar() is None:
        raise objects.NoObjectInStoreError(f"Object {object_id} was not pre-registered.")
    try:
        child_ids = conn.execute(sql["children"], {"oid": object_id}).scalars().all()
        child_trees = [object_tree(conn, objects, child_id) for child_id in child_ids]
    except objects.NoObjectInStoreError as e:
        raise objects.NoObjectInStoreError(
            f"Object tree for object ID '{object_id}' contains missing children. "
            "This may indicate a corrupted object store."
        ) from e
    return objects.ObjectTree(object_id=object_id, children=child_trees)


def patch_object_statements() -> bool:
    """Preregister and read object trees with prebuilt statements (SQLite); False when unpatched."""
    from flwr.supercore.object_store import sql_object_store as objects  # noqa: PLC0415

    cls = objects.SqlObjectStore
    stock_preregister: Callable[..., list[str]] | None = getattr(cls, "preregister", None)
    stock_tree: Callable[..., Any] | None = getattr(cls, "get_object_tree", None)
    usable = all(hasattr(objects, name) for name in _NEEDED) and hasattr(cls, "_mutation_session")
    if stock_preregister is None or stock_tree is None or not usable:
        logger.warning("flwr: object trees stored with statements built per object")
        return False
    try:
        statements()
    except Exception:  # a schema change: Flower's own code
        logger.warning("flwr: object trees stored with statements built per object", exc_info=True)
        return False

    @functools.wraps(stock_preregister)
    def fast_preregister(self: Any, run_id: int, object_tree_: Any) -> list[str]:
        if getattr(self, "database_backend", None) != "sqlite":
            return stock_preregister(self, run_id, object_tree_)
        return preregister(self, objects, run_id, object_tree_)

    @functools.wraps(stock_tree)
    def fast_tree(self: Any, object_id: str) -> Any:
        if getattr(self, "database_backend", None) != "sqlite":
            return stock_tree(self, object_id)
        with self.session() as session:
            return object_tree(session.connection(), objects, object_id)

    cls.preregister = fast_preregister  # type: ignore[method-assign,assignment]
    cls.get_object_tree = fast_tree  # type: ignore[method-assign]
    return True
