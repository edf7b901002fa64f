"""Helpers for deployment tests: real SuperLink / SuperNode processes on 127.0.0.1, always cleaned up.

Every process starts in its own session (process group), so stopping it also stops what it spawned
(the SuperLink's ServerApp, a bank's SuperNode and warm runner); `Consortium.close` stops them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import registry
from server.audit import read_audit
from server.certs import create_bank_key, init_ca, issue_server_cert

FEDFRAUD = str(Path(sys.executable).with_name("fedfraud"))


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """First port of the range the kernel hands to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, never handed out before by this process, below the ephemeral range.

    A port the kernel picked for `bind(0)` comes from the ephemeral range, where the many outgoing
    connections of a consortium on one machine also take theirs: a node told to listen there later can
    find it taken (two banks were once given the same port). Ports below that range are never assigned to
    outgoing connections.
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, max(_ephemeral_low(), 20001))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port on 127.0.0.1 below the ephemeral range")


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, poll: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Proc:
    """A command in its own process group, output to a log file."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.command, self.log = command, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the exit code (raises subprocess.TimeoutExpired)."""
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, not a shutdown)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after 10 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self.kill()

    def text(self) -> str:
        """The process's output so far."""
        return self.log.read_text(errors="replace")


@dataclass
class Consortium:
    """Certificates, a SuperLink state directory and the processes of one deployment test module."""

    root: Path
    data: Path
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    node_ids: dict[str, str] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def state(self) -> Path:
        return self.root / "server"

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr"

    @property
    def audit_path(self) -> Path:
        return self.state / "audit.jsonl"

    def make_certs(self, banks: list[str]) -> None:
        """CA, server certificate for 127.0.0.1, one key pair per bank, and a second (foreign) CA."""
        init_ca(self.certs)
        issue_server_cert(self.certs, sans=["127.0.0.1"])
        for bank in banks:
            create_bank_key(self.certs / "banks", bank)
        init_ca(self.root / "foreign-ca")

    def start_server(self, *extra: str) -> Proc:
        """`fedfraud server start` with TLS and node auth; returns once the port accepts connections."""
        command = [
            FEDFRAUD,
            "server",
            "start",
            "--state",
            str(self.state),
            "--certs",
            str(self.certs),
            *extra,
        ]
        proc = self.spawn([*command, "--port", str(self.port)], "server")
        wait_for(lambda: self._listening() or not proc.alive(), timeout=120, what="the SuperLink's port")
        assert proc.alive(), proc.text()
        return proc

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def register(self, bank: str) -> str:
        """Register a bank's public key with the SuperLink; remembers and returns its node id."""
        public = self.certs / "banks" / f"{bank}.pub"
        self.node_ids[bank] = registry.register_bank(public, connection="fedfraud", flwr_home=self.flwr_home)
        return self.node_ids[bank]

    def start_bank(
        self,
        bank: str,
        index: int,
        *extra: str,
        key: str | None = None,
        ca: Path | None = None,
        state: str = "",
    ) -> Proc:
        """`fedfraud bank start` for bank `index`'s file with `bank`'s key (or `key`) and the CA (or `ca`)."""
        command = [FEDFRAUD, "bank", "start", "--data", str(self.data / f"bank_{index:02d}.parquet")]
        command += ["--superlink", f"127.0.0.1:{self.port}", "--state", str(self.bank_state(bank, state))]
        command += ["--bank-id", str(index), "--runtime-port", str(free_port())]
        if "--insecure" not in extra:
            command += [
                "--ca",
                str(ca or self.certs / "ca.crt"),
                "--key",
                str(self.certs / "banks" / (key or bank)),
            ]
        return self.spawn([*command, *extra], f"bank-{bank}")

    def bank_state(self, bank: str, state: str = "") -> Path:
        """A bank's state directory (ledger, sent log); `state` names a fresh set, e.g. per test."""
        return self.root / "banks" / state / bank

    @contextlib.contextmanager
    def banks(self, banks: list[str], state: str) -> Iterator[dict[str, Proc]]:
        """Start these banks (bank k reads file k) with fresh state; wait until online; stop them after."""
        procs = {b: self.start_bank(b, i, state=state) for i, b in enumerate(banks)}
        try:
            self.wait_online(banks)
            yield procs
        finally:
            for proc in procs.values():
                proc.stop()

    def online(self) -> set[str]:
        """Node ids the SuperLink lists as online."""
        banks = registry.list_banks(connection="fedfraud", flwr_home=self.flwr_home)
        return {b["node_id"] for b in banks if b["status"] == "online"}

    def wait_online(self, banks: list[str], timeout: float = 180) -> None:
        """Wait until these banks' nodes are online."""
        wanted = {self.node_ids[b] for b in banks}
        wait_for(lambda: wanted <= self.online(), timeout=timeout, what=f"banks {banks} online", poll=2)

    def run(self, name: str, *, rounds: int, run_config: str = "") -> Proc:
        """`fedfraud server run` with its own checkpoint directory (same name: resume)."""
        command = [FEDFRAUD, "server", "run", "--state", str(self.state), "--rounds", str(rounds)]
        command += ["--checkpoint-dir", str(self.root / "runs" / name), "--run-config", run_config]
        return self.spawn(command, f"run-{name}")

    def spawn(self, command: list[str], name: str) -> Proc:
        """Start a process whose output goes to logs/<name>.log; it is stopped by close()."""
        proc = Proc(command, self.root / "logs" / f"{name}.log")
        self.procs.append(proc)
        return proc

    def audit(self, since: int = 0) -> list[dict[str, Any]]:
        """Audit events from index `since` on."""
        return read_audit(self.audit_path)[since:] if self.audit_path.exists() else []

    def close(self) -> None:
        """Stop every process started here (banks first, then runs, then the server)."""
        for proc in reversed(self.procs):
            proc.stop()


def ledger(path: Path) -> dict[str, Any]:
    """A bank's privacy ledger file."""
    return dict(json.loads(path.read_text()))
