"""--log-format json: one object per line with the ids of whoever logs."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest

from crucible.observe import logs
from tests.support import Cluster, run_tool


def test_json_lines_carry_the_context() -> None:
    ident = str(uuid.uuid4())
    logs.context["downstairs_id"] = lambda: ident
    try:
        record = logging.LogRecord("crucible.x", logging.WARNING, "f", 1, "a %s", ("b",), None)
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        del logs.context["downstairs_id"]
    assert line["level"] == "warning" and line["component"] == "crucible.x"
    assert line["message"] == "a b" and line["downstairs_id"] == ident
    assert line["timestamp"].endswith("+00:00")


@pytest.mark.slow
def test_every_line_is_json(tmp_path: Path) -> None:
    c = Cluster(tmp_path, "--extent-size", "64", "--extent-count", "4")
    try:
        c.stop()
        c.start(None, "--log-format", "json")
        r = run_tool("crucible", *c.target_args(), "--log-format", "json")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        c.stop()
    ours = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert any("activating with gen" in x["message"] for x in ours)
    assert all({"timestamp", "level", "component", "upstairs_id", "session_id"} <= x.keys()
               for x in ours)  # fmt: skip
    # (the client's own result lines are its output, not log lines)
    assert {line for line in r.stdout.splitlines() if not line.startswith("{")} <= {
        line for line in r.stdout.splitlines() if "verified" in line or "Tests done" in line
        or line.startswith("active with generation")
    }  # fmt: skip
    for d in c.regions:
        text = next(tmp_path.glob(f"{d.name}.*.log")).read_text()
        lines = [json.loads(line) for line in text.splitlines()]
        opened = next(i for i, x in enumerate(lines) if "opened region" in x["message"])
        assert all("downstairs_id" in x for x in lines[opened:]), text
        assert any("connections count:1" in x["message"] for x in lines)
