"""The agent's files: one directory per region under DATADIR/regions, made
whole or not at all, and removed the same way; each downstairs' log under
DATADIR/logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

from crucible.agent.model import CreateRegion
from crucible.libc import die_with_parent
from crucible.region.definition import REGION_JSON, fsync_dir
from crucible.region.snapshot import SnapshotInfo, list_snapshots
from crucible.region.snapshot import delete as delete_snapshot

PEM_FILES = ("cert.pem", "key.pem", "root.pem")
TLS_FLAGS = ("--cert-pem", "--key-pem", "--root-cert-pem")
MAX_OUTPUT = 64 << 10  # of a create or clone command, kept for the error


class DiskError(Exception):
    """Region files that could not be made or removed (the reason, one line)."""


class Disk:
    def __init__(self, datadir: Path, downstairs: list[str]) -> None:
        self.datadir = datadir
        self.regions = datadir / "regions"
        self.logs = datadir / "logs"
        self.downstairs = downstairs  # the command that runs crucible-downstairs
        self.regions.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)

    def region_dir(self, rid: str) -> Path:
        return self.regions / rid

    def log_path(self, key: str) -> Path:
        return self.logs / f"{key}.log"

    def exists(self, rid: str) -> bool:
        return (self.region_dir(rid) / REGION_JSON).exists()

    async def create(self, req: CreateRegion) -> None:
        """Make the region under a temporary name and rename it into place;
        whatever an interrupted attempt left is removed first."""
        final = self.region_dir(req.id)
        tmp = self.regions / f".{req.id}.creating"
        await asyncio.to_thread(_remove, tmp)
        await asyncio.to_thread(_remove, final)
        tmp.mkdir()
        tls: list[str] = []  # the region's PEMs: it serves with them, and clones with them
        if req.cert_pem is not None:
            pems = (req.cert_pem, req.key_pem, req.root_pem)
            for flag, name, text in zip(TLS_FLAGS, PEM_FILES, pems, strict=True):
                assert text is not None  # the three come together (model.parse_create)
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                tls += [flag, str(tmp / name)]
        if req.source is None:
            argv = ["create", "--uuid", req.id, "--data", str(tmp), "--block-size",
                    str(req.block_size), "--extent-size", str(req.extent_size),
                    "--extent-count", str(req.extent_count)]  # fmt: skip
            if req.encrypted:
                argv.append("--encrypted")
        else:
            argv = ["clone", "--uuid", req.id, "--data", str(tmp), "--source", req.source, *tls]
        await self._run(argv)
        tmp.rename(final)
        fsync_dir(self.regions)

    async def _run(self, args: list[str]) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.downstairs, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            out = await proc.stdout.read(MAX_OUTPUT)
            while await proc.stdout.read(MAX_OUTPUT):  # drained, not kept
                pass
            code = await proc.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
            raise
        if code != 0:
            lines = [x for x in out.decode(errors="replace").splitlines() if x.strip()]
            why = lines[-1].strip() if lines else f"exit status {code}"
            raise DiskError(f"crucible-downstairs {args[0]}: {why}")

    async def destroy(self, rid: str) -> None:
        """Rename the region away (one step), then remove it."""
        doomed = self.regions / f".{rid}.deleting"
        for path in (self.region_dir(rid), self.regions / f".{rid}.creating"):
            if path.exists():
                await asyncio.to_thread(_remove, doomed)
                path.rename(doomed)
                fsync_dir(self.regions)
        await asyncio.to_thread(_remove, doomed)

    def snapshots(self, rid: str) -> list[SnapshotInfo]:
        return list_snapshots(self.region_dir(rid)) if self.exists(rid) else []

    def delete_snapshot(self, rid: str, name: str) -> None:
        delete_snapshot(self.region_dir(rid), name)

    def used(self, rid: str) -> int:
        """Bytes the region's files take on disk."""
        total = 0
        for root, _, files in os.walk(self.region_dir(rid)):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
        return total

    def free(self) -> int:
        st = os.statvfs(self.datadir)
        return st.f_bavail * st.f_frsize

    def pems(self, rid: str) -> list[Path] | None:
        base = self.region_dir(rid)
        paths = [base / n for n in PEM_FILES]
        return paths if all(p.exists() for p in paths) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
