"""`flower-superlink` with its SQLite state indexed: `python -m server.fast_superlink <superlink flags>`.

Flower 1.42 keeps the SuperLink's state (`--database`) in SQLite through SQLAlchemy, already in WAL mode with
`synchronous=NORMAL` (no fsync per commit), but without indexes on the columns its hot statements search:
every SuperNode poll claims its messages with an UPDATE on `message_ins.dst_node_id` (a full scan of the
table, every 0.2 s per bank), and every object deleted once a message is consumed makes SQLite's
`ON DELETE CASCADE` foreign keys scan `object_children.child_id` and `run_objects.object_id` (a full scan
per object: quadratic in the objects of a SecAgg+ round). And most of its requests write (a poll claims
messages, every message adds to the run's traffic counters, task tokens are swept): concurrent write
transactions from its gRPC threads collide on SQLite's lock, whose busy handler sleeps 1-100 ms and retries.
This launcher runs the unchanged SuperLink, adds those indexes once Flower has created or migrated the
database (`CREATE INDEX IF NOT EXISTS`, kept in the file; Flower's schema version is unchanged), and runs
its transactions one at a time in this process (the only one that opens the database): threads queue on a
lock instead of sleeping in SQLite. Same data, same commits, same durability (WAL, synchronous=NORMAL).
Every request also passes eight `BaseHTTPMiddleware` layers (each one an extra task group and stream per
request); the four Control API layers, and the Fleet event log when no event-log plugin is loaded, do nothing
for a Fleet request, so here they are only entered for the requests they act on. The other patches, each
documented in its module: server/superlink_routes.py (Fleet and Runtime protobuf requests answered by
Flower's own steps in one thread hop, without the remaining middleware layers and FastAPI's dependency
solver; an empty SuperNode or ServerApp pull held until there is something to hand out:
server/superlink_longpoll.py), server/superlink_state.py (node keys cached; messages handed out only once
complete; idle polls answered without a transaction), server/superlink_runs.py (run status cached, traffic
counters batched), server/superlink_objects.py (object-tree statements built once),
server/superlink_tokens.py (task-token lookups cached while no task row is written),
server/superlink_auth.py (each signed timestamp verified once). Everything else (flags, TLS, node
authentication) is Flower's own. If a Flower upgrade removes what is patched, the SuperLink runs stock and
logs a warning. `FEDFRAUD_SUPERLINK_STOCK=name,...` leaves patches out (names in `PATCHES` and `PARTS`), for
A/B measurements.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from server import superlink_longpoll
from server.superlink_auth import patch_signatures
from server.superlink_objects import patch_object_statements
from server.superlink_routes import direct_middleware
from server.superlink_runs import patch_run_status_cache, patch_traffic_batching
from server.superlink_state import patch_complete_claims, patch_node_lookup
from server.superlink_tokens import patch_task_tokens

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
logger = logging.getLogger(__name__)
_TRANSACTION = threading.RLock()  # one SQLite transaction at a time in this process: no busy-wait sleeps
INDEXES: tuple[tuple[str, str, str], ...] = (  # (name, table, columns)
    ("fedfraud_idx_message_ins_dst", "message_ins", "dst_node_id, delivered_at"),
    ("fedfraud_idx_message_ins_run", "message_ins", "run_id"),
    ("fedfraud_idx_message_res_run", "message_res", "run_id"),
    ("fedfraud_idx_object_children_child", "object_children", "child_id"),
    ("fedfraud_idx_run_objects_object", "run_objects", "object_id"),
)


def add_indexes(engine: Any, tables: list[str]) -> list[str]:
    """Create the missing indexes on those of `tables` that exist; the names of the indexes ensured."""
    from sqlalchemy import text  # noqa: PLC0415

    ensured = []
    with engine.begin() as conn:
        for name, table, columns in INDEXES:
            if table in tables:
                conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"))
                ensured.append(name)
        if ensured:
            conn.execute(text("ANALYZE"))
    return ensured


def patch_state() -> bool:
    """Index Flower's SQLite state as it is opened (this process only); False when nothing to patch."""
    from flwr.supercore import sql_mixin  # noqa: PLC0415

    initialize: Callable[..., list[str]] | None = getattr(sql_mixin.SqlMixin, "initialize", None)
    if initialize is None:
        logger.warning("flwr %s: SuperLink state not indexed, rounds will be slower", _flwr_version())
        return False

    def initialize_indexed(self: Any, *args: Any, **kwargs: Any) -> list[str]:
        tables = initialize(self, *args, **kwargs)
        engine = getattr(self, "_engine", None)
        if engine is None or getattr(self, "database_backend", None) != "sqlite":
            return tables
        try:
            ensured = add_indexes(engine, tables)
        except Exception:  # an index is a speed-up only: never keep the SuperLink from starting
            logger.warning("SuperLink state not indexed, rounds will be slower", exc_info=True)
            return tables
        logger.debug("SuperLink state indexes: %s", ", ".join(ensured))
        return tables

    sql_mixin.SqlMixin.initialize = initialize_indexed  # type: ignore[method-assign]
    session: Callable[..., Any] = sql_mixin.SqlMixin.session

    @contextlib.contextmanager
    def serialized_session(self: Any) -> Iterator[Any]:
        with _TRANSACTION, session(self) as current:
            yield current

    sql_mixin.SqlMixin.session = serialized_session  # type: ignore[method-assign]
    return True


def patch_task_sweep() -> bool:
    """Sweep expired task tokens only when one has expired (a read first); False when nothing to patch."""
    from flwr.supercore.corestate import sql_corestate as core  # noqa: PLC0415
    from sqlalchemy import select  # noqa: PLC0415

    sweep: Callable[[Any], None] | None = getattr(core.SqlCoreState, "_cleanup_expired_task_tokens", None)
    task = getattr(core, "TaskModel", None)
    if sweep is None or task is None or not hasattr(core, "now"):
        logger.warning("flwr %s: task tokens swept on every request", _flwr_version())
        return False

    def sweep_when_due(self: Any) -> None:
        expired = select(task.task_id).where(task.token.is_not(None), task.active_until < core.now())
        with self.session() as session:  # a read: no write lock, no commit
            due = session.execute(expired.limit(1)).first() is not None
        if due:  # Flower's own sweep, which checks everything again in its write transaction
            sweep(self)

    core.SqlCoreState._cleanup_expired_task_tokens = sweep_when_due  # type: ignore[method-assign]
    return True


class _PathGate:
    """Pure ASGI wrapper: enter `middleware` only for the requests it acts on, else go straight to `app`."""

    def __init__(self, app: Any, *, middleware: type, applies: Callable[[dict], bool], **kwargs: Any) -> None:
        self.app, self.applies, self.inner = app, applies, middleware(app, **kwargs)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Run the wrapped middleware when it applies to this request, else the next app directly."""
        if scope.get("type") == "http" and not self.applies(scope):
            await self.app(scope, receive, send)
        else:
            await self.inner(scope, receive, send)


def _control_request(scope: dict) -> bool:
    return str(scope.get("path", "")).startswith("/v1/control/")


def _fleet_event_logged(scope: dict) -> bool:
    state = getattr(scope.get("app"), "state", None)
    return getattr(state, "fleet_event_log_plugin", True) is not None  # unknown: enter the middleware


GATES: dict[str, Callable[[dict], bool]] = {
    "ControlSensitiveResponseMiddleware": _control_request,
    "ControlAuthenticationMiddleware": _control_request,
    "ControlLicenseMiddleware": _control_request,
    "ControlEventLogMiddleware": _control_request,
    "FleetEventLogMiddleware": _fleet_event_logged,
}


def patch_middleware(direct: bool = True) -> bool:
    """Gate the Control (and idle Fleet event-log) middlewares, `direct` routes first; False if unpatched."""
    from flwr.superlink import main as superlink_main  # noqa: PLC0415
    from starlette.middleware import Middleware  # noqa: PLC0415

    stock: Callable[[], list[Any]] | None = getattr(superlink_main, "_get_middleware", None)
    if stock is None:
        logger.warning("flwr %s: every request passes every middleware", _flwr_version())
        return False

    def gated() -> list[Any]:
        layers = []
        for layer in stock():
            applies = GATES.get(getattr(layer.cls, "__name__", ""))
            if applies is None or layer.args:
                layers.append(layer)
            else:
                gate = Middleware(_PathGate, middleware=layer.cls, applies=applies, **layer.kwargs)  # type: ignore[arg-type]
                layers.append(gate)
        return direct_middleware(layers) if direct else layers

    superlink_main._get_middleware = gated
    return True


STOCK_ENV = "FEDFRAUD_SUPERLINK_STOCK"  # comma-separated patches to leave out (A/B measurements)
PATCHES: dict[str, Callable[[], bool]] = {
    "state": patch_state,
    "task_sweep": patch_task_sweep,
    "middleware": patch_middleware,  # includes "direct_routes" and its "long_poll", "runtime_long_poll"
    "node_lookup": patch_node_lookup,
    "complete_claims": patch_complete_claims,  # includes "idle_polls"
    "run_status": patch_run_status_cache,
    "traffic": patch_traffic_batching,
    "object_statements": patch_object_statements,
    "task_tokens": patch_task_tokens,
    "signatures": patch_signatures,
}
PARTS = {"direct_routes", "long_poll", "runtime_long_poll", "idle_polls"}  # of middleware, complete_claims


def _flwr_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version("flwr")


def apply_patches(stock: set[str]) -> dict[str, bool]:
    """Install every patch not named in `stock`; whether each one took (False: left stock)."""
    if unknown := stock - set(PATCHES) - PARTS:
        logger.warning("%s: unknown patches %s", STOCK_ENV, sorted(unknown))
    applied = {}
    for name, patch in PATCHES.items():
        if name in stock:
            applied[name] = False
        elif name == "middleware":
            applied[name] = patch_middleware(direct="direct_routes" not in stock)
        elif name == "complete_claims":
            applied[name] = patch_complete_claims(idle="idle_polls" not in stock)
        else:
            applied[name] = patch()
    held = applied["middleware"] and "direct_routes" not in stock  # long-polling lives in the direct routes
    superlink_longpoll.enable(held and "long_poll" not in stock, held and "runtime_long_poll" not in stock)
    return applied


def main() -> None:
    """Run `flower-superlink` with the arguments given, its SQLite state indexed."""
    from flwr.superlink.cli import flower_superlink  # noqa: PLC0415

    apply_patches(set(os.environ.get(STOCK_ENV, "").replace(" ", "").split(",")) - {""})
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
