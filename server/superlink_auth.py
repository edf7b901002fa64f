"""SuperNode signatures verified once per signed timestamp: `python -m server.fast_superlink` installs it.

Every Fleet request carries the node's public key, a timestamp and the node's ECDSA (P-384) signature of it;
Flower's `authenticate_node` parses the key and verifies the signature on every request (~0.5 ms of the
SuperLink's CPU, ~800 requests per 10-bank round). A bank's SuperNode (clients/fast_supernode.py) signs a
timestamp once and sends it for up to a second (Flower accepts a timestamp up to 300 s old), so most requests
carry a (key, timestamp, signature) that the SuperLink has verified already.

What changes, in `authenticate_node`'s module only: the key parsed from given bytes is kept (the same
immutable key object for the same bytes, at most `MAX_KEYS`), and a successful verification of given
(key bytes, timestamp, signature) is remembered (at most `MAX_VERIFIED`, oldest dropped): verifying the same
bytes again gives the same answer. Everything else `authenticate_node` does still runs on every request: the
timestamp's age is checked against the current time, the claimed node id against the key's node (cached by
server/superlink_state.py until a node is created or unregistered), and a signature never verified before is
verified. A key object not parsed here is verified as Flower does. If a Flower upgrade moves these
functions, signatures are verified on every request (with a logged warning).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)
MAX_KEYS = 1024
MAX_VERIFIED = 4096


class SignatureMemo:
    """Parsed keys by their bytes, and the (key bytes, message, signature) triples verified valid."""

    def __init__(self, parse: Callable[[bytes], Any], verify: Callable[[Any, bytes, bytes], bool]) -> None:
        self.parse, self.verify = parse, verify
        self.keys: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self.key_bytes: dict[int, bytes] = {}  # id() of each key object held in `keys`
        self.valid: collections.OrderedDict[tuple[bytes, bytes, bytes], None] = collections.OrderedDict()
        self.guard = threading.Lock()

    def public_key(self, data: bytes) -> Any:
        """Flower's parse of the key bytes, the same object while it is kept."""
        with self.guard:
            key = self.keys.get(data)
            if key is not None:
                self.keys.move_to_end(data)
                return key
        key = self.parse(data)  # raises for bytes that are not a key, as before
        with self.guard:
            if data not in self.keys:
                self.keys[data] = key
                self.key_bytes[id(key)] = data
                if len(self.keys) > MAX_KEYS:
                    _, dropped = self.keys.popitem(last=False)
                    self.key_bytes.pop(id(dropped), None)
            return self.keys[data]

    def verified(self, public_key: Any, message: bytes, signature: bytes) -> bool:
        """Flower's verification, remembered when valid for a key parsed here."""
        with self.guard:
            data = self.key_bytes.get(id(public_key))
            seen = data is not None and (data, message, signature) in self.valid
        if seen:
            return True
        ok = self.verify(public_key, message, signature)
        if ok and data is not None:
            with self.guard:
                if self.key_bytes.get(id(public_key)) == data:
                    self.valid[(data, message, signature)] = None
                    if len(self.valid) > MAX_VERIFIED:
                        self.valid.popitem(last=False)
        return ok


def patch_signatures() -> bool:
    """Parse each node key once and verify each signed timestamp once; False when unpatched."""
    from flwr.superlink.routers.fleet import node_auth  # noqa: PLC0415

    parse: Callable[[bytes], Any] | None = getattr(node_auth, "bytes_to_public_key", None)
    verify: Callable[[Any, bytes, bytes], bool] | None = getattr(node_auth, "verify_signature", None)
    if parse is None or verify is None or not hasattr(node_auth, "authenticate_node"):
        logger.warning("flwr: SuperNode signatures verified on every request")
        return False
    memo = SignatureMemo(parse, verify)

    @functools.wraps(parse)
    def public_key(data: bytes) -> Any:
        return memo.public_key(data)

    @functools.wraps(verify)
    def verified(public_key: Any, message: bytes, signature: bytes) -> bool:
        return memo.verified(public_key, message, signature)

    node_auth.bytes_to_public_key = public_key  # type: ignore[assignment]
    node_auth.verify_signature = verified
    return True
