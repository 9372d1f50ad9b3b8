"""dsc: create regions, run downstairs on them, and control them over HTTP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import BIN, free_port, run_tool, wait_listening

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def cmd(control: str, *args: str) -> Any:
    r = run_tool("dsc", "cmd", "--control", control, *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_dsc_controls_its_downstairs(tmp_path: Path) -> None:
    base = free_port(run=3, step=10)
    r = run_tool(
        "dsc",
        "create",
        "--output-dir",
        str(tmp_path),
        "--port-base",
        str(base),
        "--block-size",
        "512",
    )
    assert r.returncode == 0, r.stderr
    cport = free_port()
    control = f"127.0.0.1:{cport}"
    dsc = subprocess.Popen(
        [
            str(BIN / "dsc"),
            "start",
            "--output-dir",
            str(tmp_path),
            "--port-base",
            str(base),
            "--control",
            control,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_listening(cport, dsc)
        for i in range(3):
            wait_listening(base + 10 * i)
        listing = cmd(control, "list")
        assert [d["state"] for d in listing] == ["running"] * 3
        targets = [a for i in range(3) for a in ("-t", f"127.0.0.1:{base + 10 * i}")]
        assert run_tool("crucible", *targets, "-q").returncode == 0
        killed = cmd(control, "kill", "1")
        assert killed["state"] == "exited(-9)"
        assert cmd(control, "start", "1")["state"] == "running"
        wait_listening(base + 10)
        stopped = cmd(control, "stop-rand")
        assert stopped["state"] != "running"
        cmd(control, "start-all")
        assert run_tool("crucible", *targets, "-q").returncode == 0
        r = run_tool("dsc", "cmd", "--control", control, "state", "7")
        assert r.returncode == 1 and "no downstairs 7" in r.stderr
        r = run_tool("dsc", "cmd", "--control", control, "stop")
        assert r.returncode == 2 and "needs a downstairs number" in r.stderr
        cmd(control, "shutdown")
        out, _ = dsc.communicate(timeout=60)
        assert dsc.returncode == 0 and "dsc: stopped" in out
    finally:
        if dsc.poll() is None:
            dsc.kill()
            dsc.wait()


def test_dsc_errors(tmp_path: Path) -> None:
    r = run_tool("dsc", "cmd", "--control", f"127.0.0.1:{free_port()}", "list")
    assert r.returncode == 1 and "no dsc answers" in r.stderr
    r = run_tool(
        "dsc",
        "start",
        "--output-dir",
        str(tmp_path / "none"),
        "--control",
        f"127.0.0.1:{free_port()}",
    )
    assert r.returncode == 1 and "run dsc create first" in r.stderr
