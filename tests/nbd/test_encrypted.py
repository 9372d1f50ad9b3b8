"""An encrypted volume served over NBD to real clients: what they write reads
back across a restart, nothing of it is on disk in the clear, and the key is
nowhere to be seen: not in the process list, the log, the metrics, or a core
dump (there is none)."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.nbd.conftest import Nbd
from tests.support import free_port, qemu_io, wait_listening

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_an_encrypted_volume_over_nbd(tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    key_file = tmp_path / "volume.key"
    key_file.write_text(key + "\n")
    metrics = free_port()
    n = Nbd(
        tmp_path,
        create_args=("--encrypted",),
        nbd_args=(
            "--key-file", str(key_file), "--id", str(uuid.uuid4()),
            "--metrics", f"127.0.0.1:{metrics}", "--log-format", "json",
        ),
    )  # fmt: skip
    try:
        qemu_io(n.uri, "write -P 0x5a 0 1M", "write -P 0xa5 3M 64k", "flush")
        qemu_io(n.uri, "read -P 0x5a 0 1M", "read -P 0xa5 3M 64k", "read -P 0 1M 2M")
        image = tmp_path / "copy.raw"
        subprocess.run(["nbdcopy", n.uri, str(image)], check=True, timeout=120)
        data = image.read_bytes()
        assert data[: 1 << 20] == b"\x5a" * (1 << 20)
        assert data[3 << 20 : (3 << 20) + (64 << 10)] == b"\xa5" * (64 << 10)

        pid = n.proc.pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(ln for ln in limits.splitlines() if ln.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        assert key not in Path(f"/proc/{pid}/cmdline").read_text()
        wait_listening(metrics)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            assert key not in r.read().decode()

        n.restart()  # the next generation, the same key: the same data
        qemu_io(n.uri, "read -P 0x5a 0 1M", "read -P 0xa5 3M 64k")
        assert key not in n.output()
    finally:
        assert n.stop() == 0, n.output()
    for region in n.cluster.regions:
        for f in region.rglob("*"):
            if f.is_file():
                assert b"\x5a" * 64 not in f.read_bytes(), f
