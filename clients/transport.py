"""A model's arrays as one Flower object on the wire: fewer object transfers per message.

Flower stores a message as a tree of objects (message, record dict, each record, each Array and each of its
chunks) and a SuperNode pulls them one request at a time. A training or evaluation message carrying an
MLP's six tensors is 16 objects; packed into one Array it is 6 (tests/test_transport.py). In a 10-bank
SecAgg+ round that is ~200 fewer object pulls through the SuperLink and as many fewer local hand-overs
between each SuperNode and its ClientApp.

The ServerApp's Grid packs what it sends and unpacks what it pulls (server/fast_grid.py); the bank's
`packed_transport_mod` unpacks what it receives and packs its reply only when the message came packed, so
a server that does not pack (the simulation engine, stock Flower) sees Flower's own layout. Only
ArrayRecords of two or more numpy arrays are packed; everything else passes unchanged. Packing is a
transport detail: mods, SecAgg+ and the ClientApp see the arrays exactly as the sender built them.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.common.constant import SType

from models.array_pack import PackError, pack_arrays, unpack_arrays

PACKED_KEY = "fedfraud.packed"
PACKED_STYPE = "fedfraud.packed/1"

CallNext = Callable[[Message, Context], Message]


def _packable(record: ArrayRecord) -> bool:
    return len(record) >= 2 and all(a.stype == SType.NUMPY for a in record.values())


def _is_packed(record: ArrayRecord) -> bool:
    return len(record) == 1 and PACKED_KEY in record and record[PACKED_KEY].stype == PACKED_STYPE


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """One Array holding all of the record's numpy arrays, keys and order kept (unchanged if not packable)."""
    if not _packable(record):
        return record
    buffer = pack_arrays([(key, array.numpy()) for key, array in record.items()])
    packed = Array(dtype="uint8", shape=(buffer.size,), stype=PACKED_STYPE, data=buffer.tobytes())
    return ArrayRecord({PACKED_KEY: packed})


def unpack_record(record: ArrayRecord, *, where: str = "message") -> ArrayRecord:
    """The record `pack_record` packed (unchanged if not packed); PackError naming `where` if malformed."""
    if not _is_packed(record):
        return record
    try:
        arrays = unpack_arrays(record[PACKED_KEY].data)
    except PackError as exc:
        raise PackError(f"{where}: {exc}") from exc
    return ArrayRecord({key: Array(array) for key, array in arrays})


def pack_content(content: RecordDict) -> tuple[RecordDict, bool]:
    """The content with each packable ArrayRecord packed, and whether anything was."""
    packed = {name: pack_record(r) for name, r in content.array_records.items()}
    if all(packed[name] is r for name, r in content.array_records.items()):
        return content, False
    return RecordDict({**dict(content.items()), **packed}), True


def unpack_content(content: RecordDict, *, where: str = "message") -> tuple[RecordDict, bool]:
    """The content with each packed ArrayRecord restored, and whether any was packed."""
    names = [name for name, r in content.array_records.items() if _is_packed(r)]
    if not names:
        return content, False
    restored = {n: unpack_record(content.array_records[n], where=f"{where}, record {n!r}") for n in names}
    return RecordDict({**dict(content.items()), **restored}), True


def pack_message(message: Message) -> Message:
    """Pack the message's content in place (before it is sent); returns the message."""
    if message.has_content():
        message.content, _ = pack_content(message.content)
    return message


def unpack_message(message: Message) -> Message:
    """Restore a received message's packed arrays in place; returns the message."""
    if message.has_content():
        where = f"message {message.metadata.message_id[:12]} from node {message.metadata.src_node_id}"
        message.content, _ = unpack_content(message.content, where=where)
    return message


def packed_transport_mod(msg: Message, ctxt: Context, call_next: CallNext) -> Message:
    """Outermost client mod: unpack a packed message; pack the reply only if the message came packed."""
    if not msg.has_content():
        return call_next(msg, ctxt)
    msg.content, was_packed = unpack_content(msg.content, where="message from the server")
    reply = call_next(msg, ctxt)
    return pack_message(reply) if was_packed else reply
