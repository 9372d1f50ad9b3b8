"""The README's main command works end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_demo_once(tmp_path: Path) -> None:
    port = free_port(run=3)
    for _ in range(2):  # the second run reuses the regions with a higher generation
        r = subprocess.run(
            [str(ROOT / "scripts" / "demo"), "--once", "--dir", str(tmp_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all Tests done" in r.stdout and "next:" in r.stdout and "stopped" in r.stdout
