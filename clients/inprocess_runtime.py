"""The SuperNode's Runtime API, called in-process by the warm ClientApp: Flower's own handlers, no HTTP.

A warm ClientApp running in a thread of its SuperNode (`clients.fast_supernode --warm-clientapp`) still spoke
to that SuperNode over HTTP on 127.0.0.1: every task pulls its input, its message and each of the message's
objects, then pushes the reply's objects, the reply and the context, each one a request through uvicorn,
FastAPI, two middlewares and an httpx client, all in the same process. That was the larger part of a
SuperNode's CPU during a SecAgg+ round. `InProcessRuntime` offers the methods of Flower's `RuntimeHttpClient`
that the ClientApp runtime uses and calls the very handlers the SuperNode's Runtime routes call, on the same
node state, with the same task-token check (a token that names no claimed task is refused as over HTTP).
Requests and responses are copied through their wire format, so nothing is shared with the node's state.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.servicer.runtime import runtime_handlers as core_handlers

logger = logging.getLogger(__name__)
_APP: list[Any] = []  # the SuperNode's FastAPI app, once it has been created with its node state
_READY = threading.Event()
P = TypeVar("P")


def capture_runtime_app() -> bool:
    """Keep the SuperNode's Runtime app as Flower creates it (this process); False when nothing to patch."""
    from flwr.supernode import main as supernode_main  # noqa: PLC0415

    create: Callable[..., Any] | None = getattr(supernode_main, "create_app", None)
    if create is None:
        logger.warning("flwr: SuperNode app not found, the warm ClientApp speaks HTTP to its node")
        return False

    @functools.wraps(create)
    def create_and_keep(*args: Any, **kwargs: Any) -> Any:
        app = create(*args, **kwargs)
        if getattr(app.state, "runtime_state_factory", None) is not None:
            _APP[:] = [app]
            _READY.set()
        return app

    supernode_main.create_app = create_and_keep
    return True


def runtime_app(timeout: float | None = None) -> Any | None:
    """The SuperNode's Runtime app once created (waits up to `timeout` s; None if it never came)."""
    return _APP[0] if _READY.wait(timeout) else None


def _copy(proto: P) -> P:
    """A copy through the wire format, as an HTTP round trip would give."""
    return type(proto).FromString(proto.SerializeToString())  # type: ignore[attr-defined]


class InProcessRuntime:
    """`RuntimeHttpClient`'s methods used by the ClientApp runtime, served by the node's own handlers."""

    def __init__(self, app: Any, token: str | None = None) -> None:
        self._app, self._token = app, token

    def _state(self) -> Any:
        factory = getattr(self._app.state, "runtime_state_factory", None)
        if factory is None:
            raise FlowerError(ApiErrorCode.NODESTATE_NOT_INITIALIZED, "SuperNode node state not initialized.")
        return factory.state()

    def _with_task(self, handler: Callable[[Any, Any, Any], P], request: Any) -> P:
        state = self._state()
        task = state.get_task_by_token(self._token) if self._token else None
        if task is None:  # as the Runtime API's task-token check answers
            raise FlowerError(
                ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED, "Runtime task-token authentication failed."
            )
        return _copy(handler(_copy(request), state, task))

    @property
    def _handlers(self) -> Any:
        return self._app.state.runtime_handlers

    def AcquireTask(self, request: Any) -> Any:  # noqa: N802 - Flower's method names
        """Claim the oldest pending ClientApp task (the runner is the node's own executor)."""
        return _copy(self._handlers.acquire_task(_copy(request), self._state()))

    def PullTaskInput(self, request: Any) -> Any:  # noqa: N802
        """The task's context, run and FAB."""
        return self._with_task(self._handlers.pull_task_input, request)

    def PullMessages(self, request: Any) -> Any:  # noqa: N802
        """The task's message and its object tree."""
        return self._with_task(self._handlers.pull_messages, request)

    def PullObject(self, request: Any) -> Any:  # noqa: N802
        """One object of the task's message."""
        return self._with_task(self._handlers.pull_object, request)

    def ConfirmMessageReceived(self, request: Any) -> Any:  # noqa: N802
        """Confirm the message's objects were all pulled."""
        return self._with_task(self._handlers.confirm_message_received, request)

    def PushMessages(self, request: Any) -> Any:  # noqa: N802
        """Store the reply (its object tree to follow)."""
        return self._with_task(self._handlers.push_messages, request)

    def PushObject(self, request: Any) -> Any:  # noqa: N802
        """Store one object of the reply."""
        return self._with_task(self._handlers.push_object, request)

    def PushTaskOutput(self, request: Any) -> Any:  # noqa: N802
        """Store the updated context and finish the task."""
        return self._with_task(self._handlers.push_task_output, request)

    def SendTaskHeartbeat(self, request: Any) -> Any:  # noqa: N802
        """Keep the claimed task alive."""
        return self._with_task(core_handlers.send_task_heartbeat, request)

    def close(self) -> None:
        """Nothing to close (no connection)."""
