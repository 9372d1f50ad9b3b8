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
    def __init__(
        self,
        base: Path,
        read_only: bool = False,
        plain_v13: tuple[int, ...] = (),
        log_jobs: bool = False,
        nbd_args: tuple[str, ...] = (),
        create_args: tuple[str, ...] = (),
    ) -> None:
        """`plain_v13`: the downstairs that run as plain Crucible V13 ones
        (no extensions: a Trim drops the connection, no map of allocation)."""
        require_tools()
        args = ("--extent-size", "4096", "--extent-count", "32", *create_args)
        self.cluster = Cluster(base, *args, log_jobs=log_jobs)
        for i in plain_v13:
            self.cluster.stop(i)
            self.cluster.start(i, "--no-extensions")
        extra = list(nbd_args)
        if read_only:
            self.cluster.stop()
            self.cluster.start(None, "--mode", "ro")
            extra.append("--read-only")
        self.port = free_port()
        self.log = base / "nbd.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.args = [*self.cluster.target_args(), "-p", str(self.port), *extra]
        self.proc = self._start()
        self.uri = f"nbd://127.0.0.1:{self.port}/"

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [str(BIN / "crucible-nbd"), *self.args], stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_listening(self.port, proc, timeout=60)
        return proc

    def restart(self) -> None:
        """Stop crucible-nbd and start it again (it takes the next generation)."""
        assert stop_process(self.proc, timeout=60) == 0, self.output()
        self.proc = self._start()

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
