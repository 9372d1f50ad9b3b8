"""crucible-agent as a subprocess, and finding (and killing) the downstairs
it runs, which live in sessions of their own and outlive it by design."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from crucible.agent.client import AgentCallError, AgentClient
from crucible.cli_util import stop_process
from crucible.tls import TlsFiles
from tests.agent.netns import entered
from tests.support import BIN, WAIT, free_port, run_tool


def processes_under(path: Path) -> dict[int, list[str]]:
    """Every process whose command line names something under `path`."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.startswith(str(path)) for a in argv):
            found[int(d.name)] = argv
    return found


def kill_under(path: Path) -> None:
    for pid in processes_under(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(ok: Any, what: str, timeout: float = WAIT) -> Any:
    """Poll `ok()` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        v = ok()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def serving(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 1.0):
            return True
    except OSError:
        return False


class NsClient(AgentClient):
    """An agent's client that dials from inside a network namespace."""

    def __init__(self, addr: tuple[str, int], ns: str, tls: ssl.SSLContext | None) -> None:
        super().__init__(addr, tls)
        self.ns = ns

    def call(self, method: str, path: str, body: Any = None) -> Any:
        with entered(self.ns):
            return super().call(method, path, body)


class Agent:
    """`crucible-agent run` on HOST: a loopback address, or a host's address
    inside its network namespace `netns`."""

    def __init__(
        self,
        base: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        ports: tuple[int, int] | None = None,
        extra: tuple[str, ...] = (),
        netns: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        """`tls`: the agent serves its API over mutual TLS with these files,
        and the test's client presents them too."""
        self.base = base
        self.data = base / "data"
        self.host = host
        self.port = port or free_port()
        low = free_port(run=10) if ports is None else ports[0]
        self.ports = ports or (low, low + 9)
        self.extra = extra
        if tls is not None:
            self.extra += ("--cert-pem", str(tls.cert), "--key-pem", str(tls.key),
                           "--root-cert-pem", str(tls.root))  # fmt: skip
        context = None if tls is None else tls.client_context()
        self.prefix = () if netns is None else ("ip", "netns", "exec", netns)
        self.log_path = base / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = (
            AgentClient((host, self.port), context)
            if netns is None
            else NsClient((host, self.port), netns, context)
        )
        base.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self, *extra: str) -> None:
        low, high = self.ports
        args = [*self.prefix, str(BIN / "crucible-agent"), "run", "-d", str(self.data),
                "-l", f"{self.host}:{self.port}", "--downstairs-ports", f"{low}-{high}",
                *self.extra, *extra]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, f"agent {self.host}:{self.port} to answer")

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            self.client.regions()
        except AgentCallError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the agent alone (its downstairs keep running)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            assert stop_process(self.proc, timeout=60) == 0, self.log()[-3000:]
            self.proc = None

    def close(self) -> None:
        """Stop the agent and kill every downstairs it left running."""
        if self.proc is not None:
            stop_process(self.proc, timeout=60)
            self.proc = None
        kill_under(self.data)

    def region(self, rid: str) -> dict[str, Any]:
        return self.client.region(rid)

    def wait_state(self, rid: str, state: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            r = self.region(rid)
            assert r["state"] != "failed" or state == "failed", r
            return r if r["state"] == state else None

        return wait_for(reached, f"region {rid} to be {state}")  # type: ignore[no-any-return]

    def downstairs_pid(self, rid: str) -> int | None:
        """The pid of the downstairs serving region `rid` (not a snapshot)."""
        found = [pid for pid, argv in processes_under(self.data / "regions" / rid).items()
                 if "run" in argv and "--snapshot" not in argv]  # fmt: skip
        assert len(found) <= 1, found
        return found[0] if found else None


def replicas_agree(agents: list[Agent], rids: list[str]) -> None:
    """`crucible-downstairs dump` finds a volume's three regions (region
    rids[i] on agents[i]) identical, and no agent logged a traceback."""
    dirs = [
        x
        for a, rid in zip(agents, rids, strict=True)
        for x in ("-d", str(a.data / "regions" / rid))
    ]
    dump = run_tool("crucible-downstairs", "dump", *dirs)
    assert dump.returncode == 0, dump.stdout + dump.stderr
    for a in agents:
        assert "Traceback" not in a.log(), a.log()
