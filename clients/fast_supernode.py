"""`flower-supernode` with prompt polling: `python -m clients.fast_supernode <flower-supernode flags>`.

Flower 1.42's SuperNode sleeps 3 s whenever its pull from the SuperLink comes back empty, polls for its
ClientApp's reply every 0.5 s, and when a message's objects are not all on the SuperLink yet (the ServerApp
is still pushing them) backs off 1 s, 2 s, 4 s... before pulling again. SecAgg+ exchanges five messages per
round, so a round waited 10-20 s on these sleeps alone. This launcher runs the unchanged SuperNode with
the SuperLink polled every 0.2 s while the node is busy (a message arrived in the last two minutes; the
stock 3 s when idle; a pull that the SuperLink held, server/superlink_longpoll.py, counts towards that
wait), its local waits (for the reply) every 0.05 s, object pulls retried after 0.05 s doubling up to
0.5 s, and a 10 s heartbeat (the SuperLink's minimum; stock 30 s) so that a bank that crashes is seen
offline in ~20 s instead of ~60 s. The signed timestamp that authenticates each Fleet request is signed
at most once a second and sent until then (`FEDFRAUD_NODE_SIGN_REUSE_S`; Flower accepts one up to 300 s
old), so the SuperLink verifies each signature once (server/superlink_auth.py).
A reply stored just after the loop's push (Flower pushes only after pulling a message) is pushed at the next
poll instead of waiting for a message that may never come (`pending_reply_run`).
Everything else (flags, TLS, node authentication, isolation) is Flower's own. If a Flower upgrade removes
what is patched, the node runs stock and logs a warning.

With `--warm-clientapp` (and `--isolation process`) the ClientApp runs warm in a thread of this process
(clients/warm_runner.py), told the moment a message is stored instead of polling for tasks: the default of
`fedfraud bank start`. Without it, run `python -m clients.warm_runner` next to the node, or Flower's own.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
logger = logging.getLogger(__name__)
BUSY_POLL_S = float(os.environ.get("FEDFRAUD_NODE_POLL_S", "0.2"))  # the SuperLink pays for every poll
BUSY_WINDOW_S, HEARTBEAT_S = 120.0, 10
LOCAL_WAIT_S, LOCAL_POLL_S = 0.5, 0.05
SIGN_REUSE_S = float(os.environ.get("FEDFRAUD_NODE_SIGN_REUSE_S", "1.0"))  # 0: sign every request (stock)
WARM_FLAG = "--warm-clientapp"
PULL_BACKOFF: dict[str, Any] = {
    "initial_backoff": 0.05,
    "backoff_cap": 0.5,
    "max_tries_per_object": 15_000,
}  # ~2 h, as stock


class _PromptTime:
    """Stands in for the `time` module inside Flower's SuperNode loop: short sleeps while busy."""

    def __init__(self, real: ModuleType) -> None:
        self._real, self.last_message = real, -BUSY_WINDOW_S
        self.empty_pull_s: float | None = None  # how long the last pull took, when it came back empty

    def sleep(self, seconds: float) -> None:
        """Local waits (<= 0.5 s: a reply) poll every 0.05 s; SuperLink pulls every 0.2 s while busy.

        After an empty pull the wait is shortened by the time the pull took: a SuperLink that held the
        pull (long-polling) is asked again at once, and pulls still start at most every 0.2 s (busy) or
        every `seconds` (idle, stock 3 s), as before.
        """
        if seconds <= LOCAL_WAIT_S:
            self._real.sleep(min(seconds, LOCAL_POLL_S))
            return
        pulled, self.empty_pull_s = self.empty_pull_s or 0.0, None
        busy = self._real.monotonic() - self.last_message < BUSY_WINDOW_S
        wait = min(seconds, BUSY_POLL_S) if busy else seconds
        if wait > pulled:
            self._real.sleep(wait - pulled)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def patch_polling(wake: threading.Event | None = None) -> bool:
    """Patch Flower's SuperNode loop (this process only); False when this Flower has nothing to patch.

    `wake` is set whenever a message has been received and stored (its task is ready to run).
    """
    import flwr.supernode.fleet_http_connection as connection  # noqa: PLC0415
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415
    from flwr.supercore import heartbeat  # noqa: PLC0415

    pull: Callable[..., Any] | None = getattr(loop, "_pull_and_store_message", None)
    if (
        pull is None
        or getattr(loop, "time", None) is not time
        or not hasattr(connection, "HEARTBEAT_DEFAULT_INTERVAL")
    ):
        logger.warning("flwr %s: SuperNode polling not patched, rounds will be slower", _flwr_version())
        return False
    clock = _PromptTime(time)

    def pull_and_mark(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        run_id = pull(*args, **kwargs)
        if run_id is None:  # Flower pushes replies only after a pull: one left behind would never go
            run_id = pending_reply_run(kwargs.get("state"))
        clock.empty_pull_s = time.monotonic() - started if run_id is None else None
        if run_id is not None:
            clock.last_message = time.monotonic()
            if wake is not None:
                wake.set()
        return run_id

    loop.time = clock  # type: ignore[assignment]
    loop.pull_objects = functools.partial(loop.pull_objects, **PULL_BACKOFF)
    loop._pull_and_store_message = pull_and_mark
    connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S
    return True


def pending_reply_run(state: Any) -> int | None:
    """The run of a reply stored in the node's state but not pushed yet, or None.

    Flower's loop pushes the replies waiting after each message it pulls. If a ClientApp reply arrives
    just after that push (e.g. a stale reply of a run the SuperLink lost when it was restarted was pushed
    first), it would wait until the next message, which never comes: the server waits for that reply.
    """
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if store is None or lock is None:
        return None
    with lock:
        for entry in store.values():
            if not entry.is_retrieved and entry.message.metadata.reply_to_message_id:
                return int(entry.message.metadata.run_id)
    return None


def patch_signing(reuse_s: float = SIGN_REUSE_S) -> bool:
    """Sign the Fleet timestamp at most every `reuse_s` s (this process); False when unpatched."""
    from flwr.supernode import node_auth_http_interceptor as auth  # noqa: PLC0415

    cls = getattr(auth, "NodeAuthHttpInterceptor", None)
    needed = ("now", "sign_message", "add_headers", "b64encode", "TIMESTAMP_HEADER")
    headers = ("FLEET_HTTP_PUBLIC_KEY_HEADER", "FLEET_HTTP_SIGNATURE_HEADER")
    if cls is None or not all(hasattr(auth, name) for name in needed + headers):
        logger.warning("flwr %s: every Fleet request signed anew", _flwr_version())
        return False
    if reuse_s <= 0:
        return False
    signed: dict[int, tuple[float, str, bytes]] = {}  # per interceptor: (signed at, timestamp, signature)

    def intercept(self: Any, context: Any, call_next: Callable[[Any], Any]) -> Any:
        last = signed.get(id(self))
        if last is None or time.monotonic() - last[0] >= reuse_s:
            timestamp = auth.now().isoformat()
            last = (
                time.monotonic(),
                timestamp,
                auth.sign_message(self._private_key, timestamp.encode("ascii")),
            )
            signed[id(self)] = last
        key = auth.b64encode(self._public_key_bytes).decode("ascii")
        fields = {auth.FLEET_HTTP_PUBLIC_KEY_HEADER: key, auth.TIMESTAMP_HEADER: last[1]}
        fields[auth.FLEET_HTTP_SIGNATURE_HEADER] = auth.b64encode(last[2]).decode("ascii")
        auth.add_headers(context.request, fields)
        return call_next(context)

    cls.intercept = intercept
    return True


def _flwr_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version("flwr")


def _runtime_address(argv: list[str]) -> str:
    """The SuperNode's Runtime API address from its `--host` and `--port` flags (Flower's defaults)."""

    def value(flag: str, default: str) -> str:
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return default

    host = value("--host", "127.0.0.1")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{value('--port', '9094')}"


def start_warm_clientapp(address: str, wake: threading.Event) -> threading.Thread:
    """Serve this node's ClientApp tasks from a thread of this process, woken as each message is stored."""
    from clients.inprocess_runtime import capture_runtime_app  # noqa: PLC0415
    from clients.warm_runner import serve  # noqa: PLC0415

    in_process = capture_runtime_app()  # before Flower creates the app: tasks then skip the HTTP hop
    kwargs = {"wake": wake, "in_process": in_process}
    thread = threading.Thread(target=serve, args=(address,), kwargs=kwargs, name="warm-clientapp")
    thread.daemon = True
    thread.start()
    return thread


def main() -> None:
    """Run `flower-supernode` with the arguments given, polling promptly; `--warm-clientapp`: see above."""
    from flwr.supernode.cli.flower_supernode import flower_supernode  # noqa: PLC0415

    wake = threading.Event() if WARM_FLAG in sys.argv else None
    patch_polling(wake)
    patch_signing()
    if wake is not None:
        sys.argv.remove(WARM_FLAG)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [clientapp] %(message)s"))
        logging.getLogger("clients").addHandler(handler)
        logging.getLogger("clients").setLevel(logging.INFO)
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        start_warm_clientapp(_runtime_address(sys.argv[1:]), wake)
    from flwr.supercore.logger import update_console_handler  # noqa: PLC0415

    update_console_handler(timestamps=True, colored=False)  # an operator can follow each message in time
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
