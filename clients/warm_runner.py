"""A bank's warm ClientApp runner: one long-lived process answers every message its SuperNode receives.

By default (`flower-supernode --isolation subprocess`) Flower starts a fresh `flwr-clientapp` process for each
message: Python, flwr, torch, opacus and pandas are imported and the bank's file is read and featurized again,
and SecAgg+ sends five messages per round. With `--isolation process` the SuperNode only queues tasks on its
Runtime API and waits for an external executor; this runner is that executor. It imports the bank's installed
ClientApp (`clients.client_app:app`) once, keeps the bank's data cache warm, and runs each task in-process
with Flower's own task protocol (pull the message and context, call the app, push the reply and the context).

It never executes code shipped by the consortium: it serves only runs of the fedfraud app (any other FAB is
answered with an error) and runs the bank's installed code, whose version it logs with the FAB's hash.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as runtime
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from clients.inprocess_runtime import InProcessRuntime, runtime_app

logger = logging.getLogger(__name__)
APP_NAME = "fedfraud"
# A task can start before the SuperNode holds all of its message's objects; Flower then retries after 1, 2,
# 4... s. The SuperNode is local: retry after 0.02 s doubling up to 0.25 s. A task whose objects never come
# (its message was half-received when the SuperLink died) gives up after 15 minutes.
PULL_BACKOFF: dict[str, Any] = {
    "initial_backoff": 0.02,
    "backoff_cap": 0.25,
    "max_time": 900.0,
    "max_tries_per_object": 4_000,
}
FAST_POLL_S, IDLE_POLL_S, BUSY_WINDOW_S = 0.1, 1.0, 120.0
NODE_APP_WAIT_S = 120.0  # the SuperNode creates its Runtime app after it has connected to the SuperLink


class AppMismatchError(RuntimeError):
    """The task belongs to another Flower app than fedfraud: the runner refuses to serve it."""


def _client(
    address: str, certificates: bytes | None, token: str | None, *, retry: bool = True
) -> RuntimeHttpClient:
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    invoker = make_simple_http_retry_invoker()
    if not retry:
        invoker.max_tries = 1
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=certificates is None,
        root_certificates=certificates,
        interceptors=interceptors,
        retry_invoker=invoker,
    )


def _heartbeat_fn(client: RuntimeHttpClient) -> Any:
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # noqa: PLC0415

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except Exception:  # a failed heartbeat must never stop the warm process
            return False

    return beat


def run_task(
    address: str,
    token: str,
    app: ClientApp,
    certificates: bytes | None = None,
    node_app: Any | None = None,
) -> str:
    """Run one task of the SuperNode in this process; returns its final status (completed/failed).

    With `node_app` (the SuperNode's own Runtime app, same process) its handlers are called directly.
    """
    client: Any = (
        InProcessRuntime(node_app, token) if node_app is not None else _client(address, certificates, token)
    )
    heartbeat = HeartbeatSender(_heartbeat_fn(client))
    heartbeat.start()
    context, status, details = None, SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        started = time.perf_counter()
        try:
            if run.fab_id.rpartition("/")[2] != APP_NAME:
                raise AppMismatchError(f"refusing to run app {run.fab_id!r}: this node serves {APP_NAME}")
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:
            logger.exception("ClientApp raised on %s", message.metadata.message_type)
            reason = f"{type(exc).__name__}: {exc}"
            reply, details = (
                Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message),
                reason,
            )
        push_message(client, reply, context)
        logger.info(
            "run %s, %s message: %s in %.2f s (FAB %s)",
            run.run_id,
            message.metadata.message_type,
            status,
            time.perf_counter() - started,
            fab.hash_str[:12],
        )
    finally:
        heartbeat.stop()
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()
    return str(status)


def _run_task_logged(
    address: str, token: str, app: ClientApp, certificates: bytes | None, node_app: Any | None
) -> None:
    try:
        run_task(address, token, app, certificates, node_app)
    except Exception:  # the SuperNode fails the task after its heartbeats stop; the runner goes on
        logger.exception("task failed before its reply could be sent")


def serve(
    address: str,
    *,
    certificates: bytes | None = None,
    stop: list[bool] | None = None,
    wake: threading.Event | None = None,
    in_process: bool = False,
) -> None:
    """Run every ClientApp task of the SuperNode at `address` in this warm process until stopped.

    With `wake` (set by the SuperNode when a message arrives, see clients/fast_supernode.py) it asks for a
    task only when woken or once a second; without it, it polls every 0.1 s while busy. With `in_process`
    (the runner is a thread of the SuperNode) it calls the node's Runtime handlers instead of its HTTP API.
    """
    import torch  # noqa: PLC0415

    from clients.client_app import app  # noqa: PLC0415 - imported once: torch, opacus, pandas stay loaded

    torch.set_num_threads(int(os.environ.get("FEDFRAUD_TORCH_THREADS", "1")))  # small models: 1 is fastest

    stop = stop if stop is not None else [False]
    runtime.pull_and_inflate_object_from_tree = functools.partial(
        runtime.pull_and_inflate_object_from_tree, **PULL_BACKOFF
    )
    node_app = runtime_app(timeout=NODE_APP_WAIT_S) if in_process else None
    if in_process and node_app is None:
        logger.warning("the SuperNode's Runtime app did not appear: speaking HTTP to %s", address)
    poller: Any = (  # this loop retries (and stops when asked)
        InProcessRuntime(node_app)
        if node_app is not None
        else _client(address, certificates, None, retry=False)
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[])
    last_task = -BUSY_WINDOW_S
    how = " (in-process)" if node_app is not None else ""
    logger.info("warm ClientApp runner serving the SuperNode at %s%s", address, how)
    while not stop[0]:
        try:
            res = poller.AcquireTask(request)
        except Exception as exc:  # the SuperNode restarts or is not up yet: keep trying
            logger.debug("SuperNode not reachable at %s: %s", address, exc)
            time.sleep(IDLE_POLL_S)
            continue
        if res.HasField("task") and res.token:  # own thread: a stale task must not hold up the next one
            args = (address, res.token, app, certificates, node_app)
            threading.Thread(target=_run_task_logged, args=args, name="clientapp-task", daemon=True).start()
            last_task = time.monotonic()
            continue
        if wake is not None:
            wake.wait(IDLE_POLL_S)
            wake.clear()
            continue
        busy = time.monotonic() - last_task < BUSY_WINDOW_S
        time.sleep(FAST_POLL_S if busy else IDLE_POLL_S)
    poller.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m clients.warm_runner --runtime-api-address HOST:PORT`, next to an isolated SuperNode."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's Runtime API")
    parser.add_argument("--root-certificates", default=None, help="CA of a TLS Runtime API (default: HTTP)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [warm-runner] %(message)s")
    for noisy in ("flwr", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    certificates = None
    if args.root_certificates:
        with open(args.root_certificates, "rb") as fh:
            certificates = fh.read()
    stop = [False]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serve(args.runtime_api_address, certificates=certificates, stop=stop)
    sys.exit(0)


if __name__ == "__main__":
    main()
