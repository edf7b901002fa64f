"""A direct path for the SuperLink's protobuf Fleet and Runtime requests: Flower's own steps, one thread hop.

Why: in a 10-bank SecAgg+ round the SuperLink answers ~1,650 small protobuf requests (mostly object pulls and
pushes) and its single Python process is the round's critical path. Each request crossed three
`BaseHTTPMiddleware` layers (error translation, protobuf translation, node authentication; each one an extra
task group, memory stream and response wrapper), FastAPI's router and dependency solver, and five or six
hops to the thread pool (one per synchronous dependency, one for node authentication, one for the handler).
About half of the SuperLink's CPU went there, not into the handlers.

What changes: a pure-ASGI layer, placed outermost in Flower's middleware list, answers the POST routes
under /v1/fleet/ and /v1/runtime/ whose dependencies it can evaluate exactly (below) by running Flower's own
steps in Flower's order, and passes every other request on to the unchanged stack:
  1. `http_error_translator` (Flower's) wraps everything, so an error answers with Flower's status, JSON body,
     headers and log line;
  2. `ProtobufTranslationMiddleware`'s own content-type check and parser (415/400 errors unchanged);
  3. in one worker thread: `authenticate_node` (Fleet routes; the signature and the node's key are verified
     on every request, as `NodeAuthMiddleware` does), then the route's dependencies in FastAPI's order (the
     version check, `get_task`'s task-token check, `get_linkstate`, ...; each call evaluated once per
     request, as FastAPI's cache does), then the handler;
  4. `ProtobufTranslationMiddleware._response_for` serializes the handler's message (status 200).
An empty SuperNode (or ServerApp) pull may be held until there is something to hand out, step 3 run again
then (long-polling: server/superlink_longpoll.py).
A route is taken only if every dependency in its tree is a synchronous plain callable without path, query,
header, cookie or body parameters (or an `APIKeyHeader`, read as its `__call__` reads it), its handler is
synchronous and returns a protobuf message, no dependency override is set, and no extension middleware is
loaded; Fleet routes only while no Fleet event-log plugin is configured (that middleware would act). Anything
else, including a Flower upgrade that changes these internals, goes through Flower's stack as before.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server import superlink_longpoll

logger = logging.getLogger(__name__)
PREFIXES = ("/v1/fleet/", "/v1/runtime/")
_PARAM_LISTS = ("path_params", "query_params", "header_params", "cookie_params", "body_params")
_SPECIAL = ("websocket_param_name", "http_connection_param_name", "response_param_name")
_SPECIAL_MORE = ("background_tasks_param_name", "security_scopes_param_name")


@dataclass(frozen=True)
class Step:
    """One dependency: its parameter name (None for a router-level one), callable and sub-dependencies."""

    name: str | None
    call: Callable[..., Any]
    request_param: str | None
    subs: tuple[Step, ...]
    api_key_header: str | None = None  # header name when `call` is an APIKeyHeader


@dataclass(frozen=True)
class FastRoute:
    """A route answered directly: its protobuf request type, dependencies and handler."""

    path: str
    request_type: type
    steps: tuple[Step, ...]
    endpoint: Callable[..., Any]
    fleet: bool


def _plain(dependant: Any) -> bool:
    """True when FastAPI would pass this dependant nothing but its request and sub-dependencies."""
    if any(getattr(dependant, field, None) for field in _PARAM_LISTS):
        return False
    if any(getattr(dependant, field, None) is not None for field in _SPECIAL + _SPECIAL_MORE):
        return False
    return getattr(dependant, "use_cache", True) is True


def plan_step(dependant: Any) -> Step | None:
    """The step evaluating this sub-dependency as FastAPI does, or None when it cannot be done exactly."""
    from fastapi.security import APIKeyHeader  # noqa: PLC0415

    call = getattr(dependant, "call", None)
    if call is None or not _plain(dependant):
        return None
    if type(call) is APIKeyHeader:
        return Step(dependant.name, call, None, (), api_key_header=call.model.name)
    if getattr(dependant, "is_gen_callable", True) or getattr(dependant, "is_async_gen_callable", True):
        return None
    if getattr(dependant, "is_coroutine_callable", True):
        return None
    subs = tuple(plan_step(sub) for sub in dependant.dependencies)
    if any(sub is None for sub in subs):
        return None
    return Step(dependant.name, call, dependant.request_param_name, subs)  # type: ignore[arg-type]


def plan_route(path: str, dependant: Any, request_types: dict[tuple[str, str], type]) -> FastRoute | None:
    """The direct plan of a ProtobufRoute's effective dependant, or None when it must go through FastAPI."""
    from google.protobuf.message import Message  # noqa: PLC0415

    endpoint = getattr(getattr(dependant, "call", None), "__wrapped__", None)
    request_type = request_types.get(("POST", path))
    if endpoint is None or request_type is None or inspect.iscoroutinefunction(endpoint):
        return None
    returns = inspect.signature(endpoint, eval_str=True).return_annotation
    if not (inspect.isclass(returns) and issubclass(returns, Message)):
        return None
    others = [f for f in _PARAM_LISTS if getattr(dependant, f, None)]
    if others or dependant.request_param_name is None:
        return None
    steps = tuple(plan_step(sub) for sub in dependant.dependencies)
    if any(step is None for step in steps):
        return None
    return FastRoute(path, request_type, steps, endpoint, path.startswith("/v1/fleet/"))  # type: ignore[arg-type]


def collect_routes(app: Any) -> dict[str, FastRoute]:
    """The app's directly answerable POST routes by path (each path's first route, as Starlette picks)."""
    from fastapi.routing import APIRoute, iter_route_contexts  # noqa: PLC0415
    from flwr.supercore.protobuf.routing import ProtobufRoute  # noqa: PLC0415
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES  # noqa: PLC0415

    if getattr(app, "dependency_overrides", None):
        return {}
    routes: dict[str, FastRoute | None] = {}
    for ctx in iter_route_contexts(app.routes):
        path, methods = ctx.path, ctx.methods or set()
        if not isinstance(path, str) or "POST" not in methods or path in routes:
            continue
        plan = None
        protobuf = isinstance(ctx.route, ProtobufRoute) and isinstance(ctx.route, APIRoute)
        if protobuf and methods == {"POST"} and path.startswith(PREFIXES) and "{" not in path:
            plan = plan_route(path, getattr(ctx, "dependant", None), PROTOBUF_REQUEST_TYPES)
        routes[path] = plan
    return {path: plan for path, plan in routes.items() if plan is not None}


def _solve(step: Step, request: Any, solved: dict[int, Any]) -> Any:
    """The value of one dependency, each callable evaluated once per request (FastAPI's cache)."""
    key = id(step.call)
    if key in solved:
        return solved[key]
    if step.api_key_header is not None:
        value = step.call.check_api_key(request.headers.get(step.api_key_header))  # type: ignore[attr-defined]
    else:
        kwargs = {}
        for sub in step.subs:  # in declaration order, as FastAPI solves them
            sub_value = _solve(sub, request, solved)
            if sub.name is not None:
                kwargs[sub.name] = sub_value
        if step.request_param is not None:
            kwargs[step.request_param] = request
        value = step.call(**kwargs)
    solved[key] = value
    return value


def run_route(route: FastRoute, request: Any, authenticate: Callable[[Any], None]) -> Any:
    """Node authentication (Fleet), the route's dependencies in order, then its handler (a worker thread)."""
    if route.fleet:
        authenticate(request)
    solved: dict[int, Any] = {}
    kwargs = {}
    for step in route.steps:
        value = _solve(step, request, solved)
        if step.name is not None:
            kwargs[step.name] = value
    return route.endpoint(**kwargs)


class DirectRoutes:
    """Pure ASGI: answer the planned routes with Flower's own steps; every other request goes to `app`."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.routes: dict[str, FastRoute] | None = None

    def _routes(self, fastapi_app: Any) -> dict[str, FastRoute]:
        if self.routes is None:
            try:
                self.routes = collect_routes(fastapi_app)
            except Exception:  # a Flower/FastAPI change: Flower's stack answers everything
                logger.warning("SuperLink requests all take Flower's middleware stack", exc_info=True)
                self.routes = {}
            logger.debug("direct SuperLink routes: %s", ", ".join(sorted(self.routes)))
        return self.routes

    def route_for(self, scope: dict) -> FastRoute | None:
        """The planned route answering this request, or None when Flower's stack must answer it."""
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("root_path"):
            return None
        fastapi_app = scope.get("app")
        route = self._routes(fastapi_app).get(scope.get("path", ""))
        event_logged = (
            getattr(getattr(fastapi_app, "state", None), "fleet_event_log_plugin", True) is not None
        )
        if route is not None and route.fleet and event_logged:
            return None  # FleetEventLogMiddleware acts on this request
        return route

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Answer a planned route directly (errors translated as Flower does), else pass the request on."""
        route = self.route_for(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        from flwr.supercore.error import http_error_translator  # noqa: PLC0415
        from starlette.requests import Request  # noqa: PLC0415

        request = Request(scope, receive)

        async def call_next(current: Any) -> Any:
            return await _answer(route, current)

        response = await http_error_translator(request, call_next)
        await response(scope, receive, send)


async def _answer(route: FastRoute, request: Any) -> Any:
    """Flower's protobuf translation around the route's steps, run in one worker thread."""
    from flwr.supercore.protobuf.streaming import get_protobuf_stream_context  # noqa: PLC0415
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware as Translation  # noqa: PLC0415
    from flwr.superlink.routers.fleet.node_auth import authenticate_node  # noqa: PLC0415
    from google.protobuf.message import Message  # noqa: PLC0415
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

    Translation._check_request_media_type(request)
    request.state.protobuf_request = Translation._parse_request(await request.body(), route.request_type)

    async def run() -> Any:
        return await run_in_threadpool(run_route, route, request, authenticate_node)

    held = superlink_longpoll.holder(route.path, request)  # an empty pull may wait for something to hand out
    result = await (run() if held is None else held[0].answer(held[1], run, request.is_disconnected))
    if isinstance(result, Message):  # a unary answer: no stream context is used (Flower's `_response_for`)
        return Translation._response_for(result, None)  # type: ignore[arg-type]
    return Translation._response_for(result, get_protobuf_stream_context(request))


def direct_middleware(layers: list[Any]) -> list[Any]:
    """Flower's middleware list with the direct layer first; unchanged when an extension adds middleware."""
    from flwr.superlink import extensions  # noqa: PLC0415
    from starlette.middleware import Middleware  # noqa: PLC0415

    if extensions.get_middleware():
        logger.warning("SuperLink extension middleware loaded: requests take Flower's middleware stack")
        return layers
    return [Middleware(DirectRoutes), *layers]
