"""A Grid wrapper for deployment: prompt reply polling and a record of who answered each message.

Flower 1.42's deployed Grid (`HttpGrid.send_and_receive`) sleeps 3 s between pulls of the replies, and
when a reply's objects are not all on the SuperLink yet backs off 1, 2, 4... s before pulling them again;
SecAgg+ exchanges five messages per round, so a round waited 7-15 s on these sleeps alone. `PromptGrid`
delegates everything to the wrapped Grid and only re-implements `send_and_receive` with Flower's own
push/pull calls, polling every 0.1 s (at once after an empty pull that the SuperLink held:
server/superlink_longpoll.py); `prompt_object_pulls` makes the object retries start at 0.05 s (ServerApp
process only). It also notes which nodes answered (and which answered with an error, e.g. the
SuperLink's "node unavailable" for a bank that went offline) so the audit log can name each round's
participants and dropouts. It carries each message's model arrays as one object (clients/transport.py):
packed on push, restored on pull, so the workflows never see the packed form (`FEDFRAUD_PACK_ARRAYS=0`
sends Flower's own layout, for A/B measurements).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from clients.transport import pack_message, unpack_message

logger = logging.getLogger(__name__)
POLL_S = 0.1
PACK_ARRAYS = os.environ.get("FEDFRAUD_PACK_ARRAYS", "1") != "0"
PULL_BACKOFF: dict[str, Any] = {
    "initial_backoff": 0.05,
    "backoff_cap": 0.5,
    "max_tries_per_object": 15_000,
}  # ~2 h, as stock


def prompt_object_pulls() -> bool:
    """Retry a reply's missing objects after 0.05 s, doubling to 0.5 s (this process); False if unpatched."""
    from flwr.superlink.grid import http_grid  # noqa: PLC0415

    pull = getattr(http_grid, "pull_objects", None)
    if pull is None or isinstance(pull, functools.partial):
        return pull is not None
    http_grid.pull_objects = functools.partial(pull, **PULL_BACKOFF)
    return True


class PromptGrid(Grid):
    """Delegates to `inner`; polls replies every `poll_s`, packs model arrays, records each node's answers."""

    def __init__(self, inner: Grid, *, poll_s: float = POLL_S, pack_arrays: bool = PACK_ARRAYS) -> None:
        self.inner, self.poll_s, self.pack_arrays = inner, poll_s, pack_arrays
        self._lock = threading.Lock()
        self._answers: dict[int, str] = {}
        self._bank_ids: dict[int, str] = {}

    def set_run(self, run: Any) -> None:
        """Set the run on the wrapped Grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        """The run of the wrapped Grid."""
        return self.inner.run

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Create a message with the wrapped Grid."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids."""
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Connected nodes (NodeInfo: id, public key, ...)."""
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push with the wrapped Grid, each message's arrays packed into one object."""
        outgoing = [pack_message(m) for m in messages] if self.pack_arrays else list(messages)
        return self.inner.push_messages(outgoing)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull with the wrapped Grid; packed arrays restored."""
        return [unpack_message(m) for m in self.inner.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push the messages, then pull their replies every `poll_s` until all arrived or `timeout` passed."""
        outgoing = list(messages)
        ids = list(self.push_messages(outgoing))
        destinations = {i: int(m.metadata.dst_node_id) for i, m in zip(ids, outgoing, strict=True)}
        pending = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            pulled_at = time.monotonic()
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending and not got:  # a pull that the SuperLink held (long-polling) counts towards the wait
                time.sleep(max(0.0, self.poll_s - (time.monotonic() - pulled_at)))
            elif pending:
                time.sleep(self.poll_s)
        self._note(destinations, replies)
        return replies

    def _note(self, destinations: dict[str, int], replies: list[Message]) -> None:
        """Each destination's outcome; an error reply (even the SuperLink's own) counts against its node."""
        with self._lock:
            answered = set()
            for reply in replies:
                node = destinations.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
                answered.add(node)
                if reply.has_error():
                    self._answers[node] = f"error {reply.error.code}: {reply.error.reason}"[:200]
                else:
                    self._answers.setdefault(node, "ok")
                    if (bank := _bank_of(reply)) is not None:
                        self._bank_ids[node] = bank
            for node in set(destinations.values()) - answered:
                self._answers[node] = "no reply"

    def take_answers(self) -> dict[int, str]:
        """Each node's outcome ("ok" or why not) since the last call; clears the record."""
        with self._lock:
            answers, self._answers = self._answers, {}
        return answers

    def bank_ids(self) -> dict[int, str]:
        """Node id -> bank id, as the banks reported it in their evaluation replies."""
        with self._lock:
            return dict(self._bank_ids)


def _bank_of(reply: Message) -> str | None:
    """The bank id in an evaluation reply's metrics (the legacy API keeps them in a ConfigRecord)."""
    record = reply.content.config_records.get("evaluateres.metrics")
    if record is None or "bank" not in record:
        return None
    return str(int(record["bank"]))  # type: ignore[arg-type]
