"""The systemd units in deploy/: what they must say (read directly), and
`systemd-analyze verify` on each, the template as an instance
(crucible-nbd@vol1.service).

verify also checks that every ExecStart binary exists. The units run the
commands from /opt/crucible/.venv/bin, where README.md installs them; the copy
verified here runs them from this test's own virtualenv instead (the
directory of sys.executable), so the check is made against commands that
exist and nothing else of the unit is changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import BIN

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PREFIX = "/opt/crucible/.venv/bin"
AGENT = DEPLOY / "crucible-agent.service"
NBD = DEPLOY / "crucible-nbd@.service"

# (unit file, the name it is verified under)
UNITS = [(AGENT, "crucible-agent.service"), (NBD, "crucible-nbd@vol1.service")]


def settings(unit: Path, section: str) -> dict[str, list[str]]:
    """Each key of `section` with its values in order (a key may repeat)."""
    found: dict[str, list[str]] = {}
    current = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_agent_unit_leaves_the_downstairs_running() -> None:
    service = settings(AGENT, "Service")
    assert service["KillMode"] == ["process"]  # a stop or restart signals the agent only
    assert service["Restart"] == ["on-failure"]
    assert service["EnvironmentFile"] == ["/etc/crucible/agent.env"]
    (start,) = service["ExecStart"]
    assert start.startswith(f"{PREFIX}/crucible-agent run ")
    assert "${LISTEN}" in start and "${DATADIR}" in start and "$CRUCIBLE_AGENT_ARGS" in start


def test_nbd_unit_serves_the_instance_volume() -> None:
    service = settings(NBD, "Service")
    assert service["Restart"] == ["on-failure"]
    assert service["EnvironmentFile"] == ["-/etc/crucible/volumes/%i.env"]
    (start,) = service["ExecStart"]
    assert start.startswith(f"{PREFIX}/crucible-nbd --vcr /etc/crucible/volumes/%i.json ")
    assert settings(NBD, "Unit")["AssertPathExists"] == ["/etc/crucible/volumes/%i.json"]


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return found


def verify(analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def said_about(result: subprocess.CompletedProcess[str], unit: Path) -> list[str]:
    """verify's lines about `unit` (it may also speak of the system's units)."""
    return [x for x in result.stderr.splitlines() if unit.name in x or str(unit.parent) in x]


@pytest.fixture
def analyze(tmp_path: Path) -> str:
    """systemd-analyze, once it has verified a unit with nothing of ours in it
    (where it cannot run at all, the reason is the skip's)."""
    found = systemd_analyze()
    plain = tmp_path / "plain" / "crucible-plain.service"
    plain.parent.mkdir()
    plain.write_text(f"[Service]\nExecStart={BIN / 'python'} -c pass\n")
    result = verify(found, plain)
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze verify fails here even on a plain unit: {result.stderr}")
    return found


def installed_here(unit: Path, name: str, into: Path) -> Path:
    """A copy of `unit` named `name` whose commands are this virtualenv's."""
    text = unit.read_text()
    assert PREFIX in text
    copy = into / name
    copy.write_text(text.replace(PREFIX, str(BIN)))
    return copy


@pytest.mark.slow  # runs systemd-analyze (a process); about a second
@pytest.mark.parametrize(("unit", "name"), UNITS, ids=[n for _, n in UNITS])
def test_unit_verifies(analyze: str, tmp_path: Path, unit: Path, name: str) -> None:
    copy = installed_here(unit, name, tmp_path)
    result = verify(analyze, copy)
    assert result.returncode == 0, result.stderr
    assert said_about(result, copy) == []  # not even a warning (an unknown key, say)


@pytest.mark.slow
def test_verify_catches_a_missing_command(analyze: str, tmp_path: Path) -> None:
    """What the test above relies on: a command that is not there fails."""
    copy = tmp_path / "crucible-agent.service"
    copy.write_text(AGENT.read_text().replace(PREFIX, str(tmp_path / "nowhere")))
    result = verify(analyze, copy)
    assert result.returncode != 0
    assert any("not executable" in x for x in said_about(result, copy)), result.stderr
