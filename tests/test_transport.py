"""A message's model arrays as one Flower object: exact round trips, fewer objects, bad input refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from clients.transport import PACKED_KEY, pack_content, packed_transport_mod, unpack_content
from models.array_pack import MAGIC, PackError, pack_arrays, unpack_arrays
from server.fast_grid import PromptGrid
from tests._helpers_messages import server_message

SHAPES = [(64, 20), (64,), (64, 64), (64,), (1, 64), (1,)]


def _model(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _fit_content(seed: int = 0) -> RecordDict:
    return RecordDict(
        {
            "fitins.parameters": ArrayRecord(numpy_ndarrays=_model(seed)),
            "fitins.config": ConfigRecord({"round": 3}),
        }
    )


def _message(content: RecordDict) -> Message:
    return server_message(content)


def test_arrays_round_trip_exactly_in_order():
    named = [
        ("w", np.arange(12, dtype=np.float32).reshape(3, 4)),
        ("b", np.array([1.5, -2.0])),
        ("scalar", np.array(7, dtype=np.int64)),
        ("empty", np.zeros((0, 3), dtype=np.float16)),
        ("mask", np.array([True, False])),
        ("t", np.arange(6, dtype=np.int32).reshape(2, 3).T),  # not contiguous
    ]
    out = unpack_arrays(pack_arrays(named))
    assert [k for k, _ in out] == [k for k, _ in named]
    for (_, a), (_, b) in zip(named, out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XXXXX" + b[5:], "bad magic"),
        (lambda b: b[:-3], "truncated"),
        (lambda b: b + b"\0", "left over"),
        (lambda b: MAGIC + (3).to_bytes(4, "little") + b"{no" + b[len(MAGIC) + 4 :], "not valid JSON"),
    ],
)
def test_malformed_buffers_are_refused(mutate, match):
    blob = pack_arrays([("w", np.ones(4, dtype=np.float32))]).tobytes()
    with pytest.raises(PackError, match=match):
        unpack_arrays(mutate(blob))


def test_object_dtypes_are_refused_both_ways():
    with pytest.raises(PackError, match="numeric or boolean"):
        pack_arrays([("o", np.array([object()], dtype=object))])
    head = json.dumps([{"key": "o", "dtype": "|O", "shape": [1]}]).encode()
    with pytest.raises(PackError, match="numeric or boolean"):
        unpack_arrays(MAGIC + len(head).to_bytes(4, "little") + head + b"\0" * 8)


def test_a_model_message_shrinks_from_16_objects_to_6_and_restores_identically():
    content = _fit_content()
    packed, was = pack_content(content)
    assert was and list(packed["fitins.parameters"].keys()) == [PACKED_KEY]
    assert len(get_all_nested_objects(_message(content))) == 16
    assert len(get_all_nested_objects(_message(packed))) == 6
    restored, was_packed = unpack_content(packed)
    assert was_packed and restored.object_id == content.object_id  # the very same arrays, keys and order
    assert packed["fitins.config"] is content["fitins.config"]


def test_records_of_one_array_or_without_arrays_pass_unchanged():
    content = RecordDict({"one": ArrayRecord(numpy_ndarrays=[np.ones(3)]), "c": ConfigRecord({"a": 1})})
    same, was = pack_content(content)
    assert same is content and not was
    assert unpack_content(content) == (content, False)


def test_a_corrupt_packed_record_names_the_message_and_record():
    content, _ = pack_content(_fit_content())
    bad = Array(dtype="uint8", shape=(3,), stype="fedfraud.packed/1", data=b"abc")
    content["fitins.parameters"] = ArrayRecord({PACKED_KEY: bad})
    with pytest.raises(PackError, match=r"from the server, record 'fitins.parameters'.*bad magic"):
        packed_transport_mod(_message(content), Context(1, 7, {}, RecordDict(), {}), lambda m, c: m)


def test_the_client_mod_unpacks_and_packs_its_reply_only_when_the_message_came_packed():
    seen: list[RecordDict] = []

    def app(msg: Message, ctxt: Context) -> Message:
        seen.append(msg.content)
        return Message(_fit_content(seed=1), reply_to=msg)

    ctxt = Context(1, 7, {}, RecordDict(), {})
    packed, _ = pack_content(_fit_content())
    reply = packed_transport_mod(_message(packed), ctxt, app)
    assert seen[0].object_id == _fit_content().object_id  # the app saw the arrays as the server built them
    assert list(reply.content["fitins.parameters"].keys()) == [PACKED_KEY]
    assert unpack_content(reply.content)[0].object_id == _fit_content(seed=1).object_id
    plain = packed_transport_mod(_message(_fit_content()), ctxt, app)  # e.g. the simulation engine
    assert len(plain.content["fitins.parameters"]) == len(SHAPES)


class _RecordingGrid:
    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        self.pushed.extend(messages)
        return ["m1"]

    def pull_messages(self, ids):
        reply = Message(pack_content(_fit_content(seed=2))[0], reply_to=self.pushed[0])
        reply.metadata.__dict__["_reply_to_message_id"] = "m1"
        return [reply]


def test_the_serverapp_grid_packs_what_it_sends_and_restores_what_it_pulls():
    inner = _RecordingGrid()
    grid = PromptGrid(inner, poll_s=0.0)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive([_message(_fit_content())]))
    assert list(inner.pushed[0].content["fitins.parameters"].keys()) == [PACKED_KEY]
    assert len(replies) == 1 and replies[0].content.object_id == _fit_content(seed=2).object_id


def test_with_packing_off_the_grid_sends_flowers_own_layout():
    inner = _RecordingGrid()
    grid = PromptGrid(inner, poll_s=0.0, pack_arrays=False)  # type: ignore[arg-type]
    list(grid.send_and_receive([_message(_fit_content())]))
    assert len(inner.pushed[0].content["fitins.parameters"]) == len(SHAPES)
