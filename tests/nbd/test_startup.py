"""Startup mistakes with the NBD export: each gets one clear line, and none
disturbs what already runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.nbd.conftest import Nbd
from tests.support import BIN, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def nbd_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "crucible-nbd"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_port_in_use_leaves_the_running_export_alone(nbd: Nbd) -> None:
    """A second export on the same port, with a higher generation, must fail
    on the port before it takes the volume over."""
    r = nbd_cli(*nbd.cluster.target_args(), "-p", str(nbd.port), "--gen", "50")
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        r.stderr.strip() == f"crucible-nbd: error: port {nbd.port} on 127.0.0.1 is already in use"
    )
    assert "activating" not in r.stdout
    # The first export still owns the volume: a write and read through it work.
    cmds = ["-c", "write -P 0x3c 0 64k", "-c", "read -P 0x3c 0 64k"]
    out = subprocess.run(
        ["qemu-io", "-f", "raw", *cmds, nbd.uri], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "failed" not in out.stdout, out.stdout + out.stderr
    assert "took over" not in nbd.output()


def test_target_that_is_not_a_downstairs(nbd: Nbd, tmp_path: Path) -> None:
    """-t naming an NBD server: said once, with what it sent, and kept in the
    final line."""
    # crucible-nbd's own NBD port, and two where nothing listens.
    unused = free_port(run=2)
    targets = [f"127.0.0.1:{p}" for p in (nbd.port, unused, unused + 1)]
    args = [a for x in targets for a in ("-t", x)]
    r = nbd_cli(*args, "-p", str(free_port()), "--activate-timeout", "3")
    assert r.returncode == 1
    said = f"127.0.0.1:{nbd.port} does not speak the Crucible protocol (it sent b'NBDMAGIC"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], r.stderr
    assert r.stdout.count(said) == 1, r.stdout  # once, however often it was retried


def test_nbd_client_at_a_downstairs_port_is_dropped(nbd: Nbd) -> None:
    ds = nbd.cluster.ds[0]
    assert ds is not None
    r = subprocess.run(
        ["nbdinfo", f"nbd://127.0.0.1:{ds.port}/"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    assert "not an upstairs" in ds.output()
    assert ds.alive()


def test_quiet_hides_connection_retries() -> None:
    base = free_port(run=3)
    args = [a for i in range(3) for a in ("-t", f"127.0.0.1:{base + i}")]
    r = nbd_cli(*args, "-p", str(free_port()), "-q", "--activate-timeout", "3")
    assert r.returncode == 1
    assert r.stdout == "", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Connection refused" in lines[0], r.stderr
