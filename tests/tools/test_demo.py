"""The README's main command works end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_demo_once(tmp_path: Path) -> None:
    port = free_port(run=3, step=10)
    nbd_port = free_port()
    control_port = free_port()
    for gen in (1, 2):  # the second run reuses the regions with the next generation
        r = subprocess.run(
            [
                str(ROOT / "scripts" / "demo"),
                "--once",
                "--dir",
                str(tmp_path),
                "--port",
                str(port),
                "--nbd-port",
                str(nbd_port),
                "--control-port",
                str(control_port),
                "--size-gib",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"with generation {gen} at nbd://127.0.0.1:{nbd_port}/" in r.stdout
        assert "checked: a write and read back through NBD match" in r.stdout
        assert "stopped" in r.stdout
