"""A bank's own log of what it sent to the consortium, to check the consortium's audit log against.

One JSON line per reply the ClientApp sends: time, run, round, message type, SecAgg+ stage, the reply's size
in bytes as serialized for the wire (after masking), the seconds the bank spent computing it, whether it was
an error, and the bank's epsilon spent so far. Appended (never rewritten) to `sent-log` in the node config,
else `<ledger-path>.sent.jsonl`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from models.federation import BANK_STATE

logger = logging.getLogger(__name__)
CallNext = Callable[[Message, Context], Message]


def sent_log_path(node_config: Any) -> Path | None:
    """`sent-log` from the node config, else next to the ledger; None when the node keeps neither."""
    if node_config.get("sent-log"):
        return Path(str(node_config["sent-log"]))
    if node_config.get("ledger-path"):
        return Path(f"{node_config['ledger-path']}.sent.jsonl")
    return None


def wire_size(message: Message) -> int:
    """Bytes of the message's serialized objects (what goes over the wire)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (the file is only ever appended to)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(msg: Message) -> str:
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(record.get(Key.STAGE, "")) if record is not None else ""


def _epsilon(ctxt: Context) -> float:
    state = ctxt.state.config_records.get(BANK_STATE)
    return float(state.get("dp-epsilon-spent", 0.0)) if state is not None else 0.0  # type: ignore[arg-type]


def sent_log_mod(msg: Message, ctxt: Context, call_next: CallNext) -> Message:
    """Outermost mod: log the reply exactly as it leaves the bank (masked under SecAgg+)."""
    stage = _stage(msg)  # read first: the SecAgg+ mod consumes its configs
    started = time.perf_counter()
    out = call_next(msg, ctxt)
    seconds = time.perf_counter() - started
    path = sent_log_path(ctxt.node_config)
    if path is None:
        return out
    record = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "run_id": int(msg.metadata.run_id),
        "round": str(msg.metadata.group_id),
        "type": str(msg.metadata.message_type),
        "secagg_stage": stage,
        "bytes": wire_size(out),
        "seconds": round(seconds, 4),
        "error": out.has_error(),
        "epsilon": _epsilon(ctxt),
    }
    try:
        append_line(path, record)
    except OSError as exc:  # the reply still goes out; the bank's operator sees why its log has a gap
        logger.error("%s: could not append to the bank's sent log: %s", path, exc)
    return out


def read_sent_log(path: Path) -> list[dict[str, Any]]:
    """Every record of a bank's sent log; a corrupt line raises naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
    return records
