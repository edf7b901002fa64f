"""A Flower message as a ClientApp receives it, for mod tests (test_node_policy.py, test_transport.py)."""

from __future__ import annotations

import time

from flwr.app import Message, Metadata, RecordDict
from flwr.app.message_type import MessageType


def server_message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    """A message from the server (node 0) to bank node 7 with this content."""
    metadata = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )
    return Message(metadata=metadata, content=content)
