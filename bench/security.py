"""What encryption at rest and mutual TLS cost the guest: fio through
crucible-nbd on plaintext regions without TLS (the baseline), on encrypted
regions, with TLS on every connection, and with both, in the same run.

    .venv/bin/python -m bench.security [--repeat 3] [--runtime 8] [--size-mib 256]

Each round starts the volume once per setting on fresh regions and runs
random 4 KiB writes and reads (queue depth 32) and sequential 1 MiB writes
(queue depth 8). It prints each setting's throughput as a fraction of the
baseline's and its CPU per IO (crucible-nbd and the three downstairs) as a
multiple of the baseline's: medians and spread over the rounds.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.nbd import crucible_server
from bench.settings import compare, parse_rounds, report
from tests.support import BIN

SETTINGS = ["plain", "encrypted", "tls", "both"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    args = parse_rounds(ap, "bench.security")
    base = Path(tempfile.mkdtemp(prefix="crucible-bench-security-"))
    try:
        subprocess.run(
            [str(BIN / "crucible-certs"), str(base / "certs"), "--hosts", "127.0.0.1"],
            check=True,
            capture_output=True,
        )
        d = base / "certs" / "127.0.0.1"
        tls = ["--cert-pem", f"{d}/cert.pem", "--key-pem", f"{d}/key.pem"]
        tls += ["--root-cert-pem", f"{d}/root.pem"]
        key_file = base / "volume.key"
        key_file.write_text(base64.b64encode(os.urandom(32)).decode())

        @contextmanager
        def server(setting: str) -> Iterator[tuple[str, list[int]]]:
            nbd = ["--verify-rate", "0"]
            ds: list[list[str]] = [[], [], []]
            create: tuple[str, ...] = ()
            if setting in ("encrypted", "both"):
                nbd += ["--key-file", str(key_file)]
                create = ("--encrypted",)
            if setting in ("tls", "both"):
                nbd += tls
                ds = [list(tls)] * 3
            with crucible_server(base, args.size_mib << 20, nbd, ds, create) as s:
                yield s

        ratios, cpu_ratios = compare(SETTINGS, server, args.repeat, args.runtime, args.size_mib)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report(ratios, cpu_ratios, "plain", {})


if __name__ == "__main__":
    main()
