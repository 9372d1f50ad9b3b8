from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from crucible.cli_util import stop_process
from tests.support import BIN, Cluster, free_port, wait_listening

NBD_TOOLS = ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "nbdsh", "fio")


def require_tools() -> None:
    missing = [t for t in NBD_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing NBD client tools {missing}: run scripts/setup")


class Nbd:
    def __init__(self, base: Path, read_only: bool = False, plain_v13: int | None = None) -> None:
        """`plain_v13`: the downstairs that runs as a plain Crucible V13 one
        (no extensions: it drops the connection on a Trim)."""
        require_tools()
        self.cluster = Cluster(base, "--extent-size", "4096", "--extent-count", "32")
        if plain_v13 is not None:
            self.cluster.stop(plain_v13)
            self.cluster.start(plain_v13, "--no-extensions")
        extra = []
        if read_only:
            self.cluster.stop()
            self.cluster.start(None, "--mode", "ro")
            extra.append("--read-only")
        self.port = free_port()
        self.log = base / "nbd.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "crucible-nbd"), *self.cluster.target_args(), "-p", str(self.port), *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(self.port, self.proc, timeout=60)
        self.uri = f"nbd://127.0.0.1:{self.port}/"

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        code = stop_process(self.proc, timeout=60)
        self._log.close()
        self.cluster.stop()
        return code


@pytest.fixture
def nbd(tmp_path: Path) -> Iterator[Nbd]:
    n = Nbd(tmp_path)
    yield n
    assert n.stop() == 0, n.output()
