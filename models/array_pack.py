"""Several named numpy arrays as one uint8 buffer and back: a short JSON header, then the raw bytes.

Used to carry a model's arrays as one object instead of one per tensor (clients/transport.py). The format
is plain data: the header names each array's key, dtype and shape; nothing is unpickled, and object or
structured dtypes are refused, so a buffer from another party cannot run code or allocate more than it
carries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

MAGIC = b"FFPK1"
_HEADER_LEN_BYTES = 4


class PackError(ValueError):
    """A packed buffer that is malformed, truncated or holds an array kind this format refuses."""


def _checked_dtype(dtype: np.dtype) -> np.dtype:
    """Plain numeric or boolean dtypes only (no objects, strings, structures)."""
    if dtype.kind not in "biufc" or dtype.fields is not None:
        raise PackError(f"cannot pack arrays of dtype {dtype.str!r}: numeric or boolean only")
    return dtype


def pack_arrays(named: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Concatenate `(key, array)` pairs, in order, into one uint8 array with a header naming each."""
    header, parts = [], []
    for key, array in named:
        contiguous = np.asarray(array, order="C")  # keeps 0-d arrays 0-d
        dtype = _checked_dtype(contiguous.dtype)
        header.append({"key": str(key), "dtype": dtype.str, "shape": list(contiguous.shape)})
        parts.append(contiguous.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    blob = b"".join([MAGIC, len(head).to_bytes(_HEADER_LEN_BYTES, "little"), head, *parts])
    return np.frombuffer(blob, dtype=np.uint8)


def _header(data: bytes) -> tuple[list[dict], int]:
    """The parsed header and the offset where the array bytes start."""
    start = len(MAGIC) + _HEADER_LEN_BYTES
    if len(data) < start or not data.startswith(MAGIC):
        raise PackError("not a packed array buffer (bad magic)")
    size = int.from_bytes(data[len(MAGIC) : start], "little")
    try:
        header = json.loads(data[start : start + size])
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackError(f"packed array header is not valid JSON: {exc}") from exc
    if not isinstance(header, list) or not all(isinstance(h, dict) for h in header):
        raise PackError("packed array header must be a list of {key, dtype, shape} entries")
    return header, start + size


def unpack_arrays(buffer: np.ndarray | bytes) -> list[tuple[str, np.ndarray]]:
    """The `(key, array)` pairs (read-only) of a `pack_arrays` buffer, in order; PackError if malformed."""
    data = buffer.tobytes() if isinstance(buffer, np.ndarray) else bytes(buffer)
    header, offset = _header(data)
    out: list[tuple[str, np.ndarray]] = []
    for entry in header:
        try:
            key, dtype = str(entry["key"]), _checked_dtype(np.dtype(entry["dtype"]))
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PackError(f"bad packed array entry {entry!r}: {exc}") from exc
        if any(d < 0 for d in shape):
            raise PackError(f"array {key!r} has a negative dimension: {shape}")
        size = math.prod(shape) * dtype.itemsize
        if offset + size > len(data):
            raise PackError(f"array {key!r} runs past the end of the packed buffer (truncated)")
        out.append(
            (key, np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape))
        )
        offset += size
    if offset != len(data):
        raise PackError(f"{len(data) - offset} bytes left over after the last packed array")
    return out
