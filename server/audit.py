"""The consortium's audit log: append-only JSON lines, one event per line, flushed and fsynced as written.

Events: `run_start` (resolved config, code version), `bank_joined` (node id, key fingerprint), `auth_failed`
(from the SuperLink's log, by `fedfraud server`), `round` (participants, dropouts, epsilon per bank, model
hash), `round_skipped`, `checkpoint`, `run_end`. The file is opened in append mode only and never truncated
or rewritten; a line that cannot be written raises instead of being dropped. A resumed run appends to the
same file, so the log of a run that was killed and restarted reads as one history.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
AUDIT_FILE = "audit.jsonl"
_ROOT = Path(__file__).resolve().parent.parent
_SOURCES = ("server", "clients", "models")


class AuditLog:
    """Appends one JSON object per line to `path` (created with its folder), each line fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event with a UTC timestamp; returns the record written."""
        record = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
            **fields,
        }
        line = json.dumps(record, sort_keys=False, default=_jsonable) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return record


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every event of an audit log, in order; a corrupt line raises naming the file and line."""
    events = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
    return events


def model_hash(weights: Sequence[np.ndarray]) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes (a bank can recompute it from the published model)."""
    digest = hashlib.sha256()
    for weight in weights:
        array = np.ascontiguousarray(weight)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


def code_version() -> dict[str, str]:
    """The package version, `git describe` when in a checkout, and a sha256 over the app's Python sources."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        package = version("fedfraud")
    except PackageNotFoundError:
        package = "unknown"
    digest = hashlib.sha256()
    for source in sorted(p for d in _SOURCES for p in (_ROOT / d).rglob("*.py")):
        digest.update(str(source.relative_to(_ROOT)).encode() + b"\0" + source.read_bytes())
    info = {"package": package, "sources_sha256": digest.hexdigest()}
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],  # git from PATH, fixed arguments
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if done.returncode == 0 and done.stdout.strip():
            info["git"] = done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def node_fingerprints(nodes: Iterable[Any]) -> dict[int, str]:
    """Node id -> `SHA256:...` fingerprint of its registered public key (empty when auth is off)."""
    from server.keyinfo import fingerprint_pem  # noqa: PLC0415

    found = {}
    for node in nodes:
        key = bytes(getattr(node, "public_key", b"") or b"")
        try:
            found[int(node.node_id)] = fingerprint_pem(key) if key else ""
        except Exception:  # a key format this version does not know: log the node without it
            found[int(node.node_id)] = ""
    return found


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


class RunAudit:
    """The events of one deployed run, written to an AuditLog (`answers` is the PromptGrid's record)."""

    def __init__(self, log: AuditLog, grid: Any) -> None:
        self.log, self.grid = log, grid
        self.fingerprints: dict[int, str] = {}

    def run_start(self, run_id: int, config: dict[str, Any], *, resume_round: int) -> None:
        """The run's resolved configuration and the code that runs it."""
        self.log.write(
            "run_start", run_id=run_id, resume_after_round=resume_round, config=config, code=code_version()
        )

    def banks_joined(self, node_ids: Iterable[int]) -> None:
        """One `bank_joined` per connected node, with its registered key's fingerprint when known."""
        try:
            self.fingerprints = node_fingerprints(self.grid.get_nodes())
        except Exception as exc:  # the run goes on; the log says why the fingerprints are missing
            logger.warning("could not read the nodes' public keys: %s", exc)
        for node in sorted(node_ids):
            self.log.write("bank_joined", node_id=node, key_fingerprint=self.fingerprints.get(node, ""))

    def stats_round(self, kind: str) -> None:
        """Who answered a preparatory round (statistics, entity release)."""
        answers = self.grid.take_answers()
        ok = sorted(n for n, a in answers.items() if a == "ok")
        self.log.write(kind, participants=ok, dropouts={str(n): a for n, a in answers.items() if a != "ok"})

    def round(self, round_no: int, record: dict[str, Any], weights: Sequence[np.ndarray]) -> None:
        """A training round: participants, dropouts, each bank's epsilon, the global model's hash."""
        answers = self.grid.take_answers()
        banks = self.grid.bank_ids()
        metrics = record.get("banks", {})
        epsilon = {str(b): float(m.get("epsilon", 0.0)) for b, m in metrics.items()}
        entity = {str(b): float(m["entity-epsilon"]) for b, m in metrics.items() if "entity-epsilon" in m}
        fields: dict[str, Any] = {
            "round": round_no,
            "participants": sorted(n for n, a in answers.items() if a == "ok"),
            "dropouts": {str(n): a for n, a in sorted(answers.items()) if a != "ok"},
            "banks": {str(n): b for n, b in sorted(banks.items())},
            "epsilon": epsilon,
            "entity_epsilon": entity,
            "model_hash": model_hash(weights),
        }
        if "discarded" in record or "results" not in record:  # no aggregate: SecAgg+ halted below threshold
            reason = record.get("discarded") or "secure aggregation halted: too few banks answered (SecAgg+)"
            self.log.write("round_skipped", reason=str(reason), **fields)
        else:
            self.log.write("round", seconds=record.get("seconds"), **fields)

    def entity_release(self, sink: dict[str, Any]) -> None:
        """The entity release: who contributed, its public parameters, achieved epsilon and table version."""
        answers = self.grid.take_answers()
        release = {k: v for k, v in json.loads(sink["entity_release"]).items() if k != "key"}
        self.log.write(
            "entity_release",
            participants=sorted(n for n, a in answers.items() if a == "ok"),
            dropouts={str(n): a for n, a in sorted(answers.items()) if a != "ok"},
            release=release,
            contributing=int(sink["entity_contributing"]),
            epsilon_achieved=float(sink["entity_epsilon"]),
            table_version=str(sink["entity_version"]),
        )

    def checkpoint(self, round_no: int, path: Path) -> None:
        """A checkpoint was written."""
        self.log.write("checkpoint", round=round_no, path=str(path))

    def run_end(
        self,
        status: str,
        *,
        rounds_done: int,
        weights: Sequence[np.ndarray],
        error: str = "",
        served: Sequence[np.ndarray] = (),
    ) -> None:
        """The run finished (or failed): the last round, the final and the served (tail-averaged) models."""
        fields: dict[str, Any] = {"status": status, "rounds_done": rounds_done}
        if weights:
            fields["model_hash"] = model_hash(weights)
        if served:
            fields["served_model_hash"] = model_hash(served)
        if error:
            fields["error"] = error
        self.log.write("run_end", **fields)


def open_run_audit(audit_log: str, checkpoint_dir: Path | None, grid: Any) -> RunAudit | None:
    """The run's audit log: `audit-log`, else audit.jsonl in the checkpoint directory, else none (warned)."""
    if audit_log:
        return RunAudit(AuditLog(Path(audit_log)), grid)
    if checkpoint_dir is not None:
        return RunAudit(AuditLog(checkpoint_dir / AUDIT_FILE), grid)
    logger.warning("no audit log: set 'audit-log' or 'checkpoint-dir' in the run config")
    return None
