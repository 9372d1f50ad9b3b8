"""The README's main command works end to end, says why when it cannot
start, and stops cleanly on SIGINT however it was started."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "scripts" / "demo")


class Ports:
    def __init__(self) -> None:
        self.port = free_port(run=3, step=10)
        self.nbd = free_port()
        self.control = free_port()
        self.volume = free_port(run=2)

    def args(self, directory: Path) -> list[str]:
        return [
            "--dir", str(directory), "--port", str(self.port), "--nbd-port", str(self.nbd),
            "--control-port", str(self.control), "--volume-port", str(self.volume),
            "--size-gib", "1",
        ]  # fmt: skip


@pytest.fixture
def ports() -> Ports:
    return Ports()


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DEMO, *args], capture_output=True, text=True, timeout=300)


def one_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_demo_once(tmp_path: Path, ports: Ports) -> None:
    for gen in (1, 2):  # the second run reuses the regions with the next generation
        r = demo("--once", *ports.args(tmp_path))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"with generation {gen} at nbd://127.0.0.1:{ports.nbd}/" in r.stdout
        assert "checked: a write and read back through NBD match" in r.stdout
        assert f"crucible-stat 127.0.0.1:{ports.volume}" in r.stdout
        assert "stopped" in r.stdout


def _start_in_background(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    """As a script's `demo &` starts it: SIGINT ignored (inherited)."""
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [DEMO, *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    deadline = time.monotonic() + 120
    while "stops everything" not in out.read_text():
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.1)
    return proc


@pytest.fixture
def running(tmp_path: Path, ports: Ports) -> Iterator[subprocess.Popen[bytes]]:
    proc = _start_in_background(ports.args(tmp_path / "demo"), tmp_path / "out")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigint_stops_a_demo_started_with_sigint_ignored(
    running: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    running.send_signal(signal.SIGINT)
    assert running.wait(timeout=120) == 0
    assert (tmp_path / "out").read_text().rstrip().endswith("stopped")
    # Every server stopped with it, crucible-nbd first (it deactivated cleanly).
    assert "stopped" in (tmp_path / "demo" / "nbd.log").read_text()
    assert "dsc: stopped" in (tmp_path / "demo" / "dsc.log").read_text()


def test_second_demo_on_the_same_directory(
    running: subprocess.Popen[bytes], tmp_path: Path, ports: Ports
) -> None:
    r = demo(*ports.args(tmp_path / "demo"))
    one_line(r, "already running", f"pid {running.pid}", f"kill -INT {running.pid}")
    assert running.poll() is None, "the running demo was disturbed"
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=120) == 0


def _taken(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_port_in_use_says_which_server_and_port(tmp_path: Path, ports: Ports) -> None:
    with _taken(ports.port + 10):
        r = demo(*ports.args(tmp_path))
    one_line(r, f"downstairs 1 (port {ports.port + 10}) exited at start", "already in use")
    with _taken(ports.nbd):
        r = demo(*ports.args(tmp_path))
    one_line(r, "crucible-nbd exited at start", f"port {ports.nbd}", "already in use")
    with _taken(ports.control):
        r = demo(*ports.args(tmp_path))
    one_line(r, "dsc exited at start", f"{ports.control}")


def test_corrupt_region_is_named_at_once(tmp_path: Path, ports: Ports) -> None:
    assert demo("--once", *ports.args(tmp_path)).returncode == 0
    definition = tmp_path / str(ports.port + 20) / "region.json"
    obj = json.loads(definition.read_text())
    definition.write_text(json.dumps({**obj, "extent_count": obj["extent_count"] - 1}))
    r = demo(*ports.args(tmp_path))
    # Said by the downstairs itself as it exited, not by a timeout later.
    one_line(r, f"downstairs 2 (port {ports.port + 20}) exited at start", "does not match")
