"""A Volume from a VCR: an upstairs per region sub-volume (its targets, key,
TLS, read-only mode and id from the region's opts), and the read-only
parent as a source (a file, a URL, a read-only region or volume)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from crucible.tls import TlsFiles
from crucible.upstairs.blockio import BlockIO
from crucible.upstairs.encryption import BadKey, BlockCipher, parse_key
from crucible.upstairs.guest import Upstairs
from crucible.upstairs.options import Options
from crucible.volume.sources import DeviceSource, FileSource, Source, UrlSource
from crucible.volume.vcr import FileVcr, RegionVcr, UrlVcr, Vcr, VcrError, VolumeVcr
from crucible.volume.volume import ScrubOptions, Volume

# How an upstairs is activated: (it, the VCR's generation as the floor) ->
# the generation used. The tools give theirs (timeouts, a higher generation
# when the downstairs hold one).
Activate = Callable[[Upstairs, int], Awaitable[int]]


def tls_context(r: RegionVcr, where: str) -> ssl.SSLContext | None:
    """The client context the region's PEMs (contents, as Crucible's opts
    carry them) make; None without them."""
    o = r.opts
    pems = (o.cert_pem, o.key_pem, o.root_cert_pem)
    if not any(pems):
        return None
    if not all(pems):
        raise VcrError(f"{where}.opts: cert_pem, key_pem and root_cert_pem go together")
    d = Path(tempfile.mkdtemp(prefix="crucible-tls-"))  # 0700: the key is there for a moment
    try:
        files = TlsFiles(d / "cert.pem", d / "key.pem", d / "root.pem")
        for path, text in zip(files, pems, strict=True):
            path.write_text(text or "")
        return files.client_context()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def region_upstairs(
    r: RegionVcr,
    where: str,
    read_only: bool = False,
    base: Options | None = None,
    tls: ssl.SSLContext | None = None,
) -> Upstairs:
    """The region's upstairs: its key, PEMs and mode from its opts, and where
    it has none, the ones given (`base`'s cipher, `tls`: the command line's)."""
    o = r.opts
    cipher = None
    if o.key is not None:
        try:
            cipher = BlockCipher(parse_key(o.key), o.id)
        except BadKey as e:
            raise VcrError(f"{where}.opts.key: {e}") from None
    base = base or Options()
    opts = dataclasses.replace(
        base,
        read_only=read_only or o.read_only,
        cipher=cipher or base.cipher,
        flush_timeout=base.flush_timeout if o.flush_timeout is None else o.flush_timeout,
    )
    return Upstairs(list(o.target), opts, o.id, tls_context(r, where) or tls)


class VolumeParts:
    """What a VCR builds: the volume and its region upstairs, each with its
    VCR (None: given as -t), and how to start and stop it all."""

    def __init__(self, volume: Volume, regions: list[tuple[Upstairs, RegionVcr | None]]) -> None:
        self.volume = volume
        self.regions = regions

    @property
    def device(self) -> BlockIO:
        """What the guest drives: one region without a parent is its
        upstairs itself (no layer between)."""
        if len(self.regions) == 1 and self.volume.parent is None:
            return self.regions[0][0]
        return self.volume

    async def activate(self, activate: Activate) -> list[int]:
        """Every sub-volume activated, the parent opened, the scrub started:
        the generations used."""
        gens = [await activate(up, r.gen if r else 1) for up, r in self.regions]
        for up, r in self.regions:
            if r is None:
                continue
            d = up.region
            got = (d.block_size, d.extent_size, d.extent_count)
            want = (r.block_size, r.blocks_per_extent, r.extent_count)
            if got != want:
                raise VcrError(
                    f"region {r.opts.id}: the downstairs have bs:{got[0]} es:{got[1]} "
                    f"ec:{got[2]}, the VCR says bs:{want[0]} es:{want[1]} ec:{want[2]}"
                )
        if self.volume.parent is not None:
            await self.volume.parent.open()
        self.volume.settle_shape()
        self.volume.start_scrub()
        return gens

    async def deactivate(self) -> None:
        await self.volume.stop_scrub()
        for up, _ in self.regions:
            if up.info().state == "active":
                await up.deactivate()

    async def close(self) -> None:
        await self.volume.stop_scrub()
        for up, _ in self.regions:
            await up.close()
        if self.volume.parent is not None:
            with contextlib.suppress(Exception):
                await self.volume.parent.close()


def build(
    vcr: Vcr,
    activate: Activate,
    read_only: bool = False,
    base: Options | None = None,
    scrub: ScrubOptions | None = None,
    tls: ssl.SSLContext | None = None,
) -> VolumeParts:
    """The volume a VCR describes (nothing connected yet). `activate` is how
    a read-only region or volume parent gets activated when it is opened;
    `base`: the options every region upstairs starts from."""
    if isinstance(vcr, RegionVcr):
        up = region_upstairs(vcr, "the region", read_only, base, tls)
        return VolumeParts(Volume([up]), [(up, vcr)])
    if not isinstance(vcr, VolumeVcr):
        return VolumeParts(Volume([], _source(vcr, "the VCR", activate, tls)), [])
    regions: list[tuple[Upstairs, RegionVcr | None]] = []
    for i, s in enumerate(vcr.sub_volumes):
        where = f"sub_volumes[{i}]"
        if not isinstance(s, RegionVcr):
            raise VcrError(f"{where}: a sub-volume must be a region here, not a {_kind(s)}")
        regions.append((region_upstairs(s, where, read_only, base, tls), s))
    parent = None
    if vcr.read_only_parent is not None:
        parent = _source(vcr.read_only_parent, "read_only_parent", activate, tls)
    volume = Volume([up for up, _ in regions], parent, scrub)
    return VolumeParts(volume, regions)


def _kind(v: Vcr) -> str:
    return type(v).__name__.removesuffix("Vcr").lower()


def _source(vcr: Vcr, where: str, activate: Activate, tls: ssl.SSLContext | None) -> Source:
    if isinstance(vcr, FileVcr):
        return FileSource(vcr.path, vcr.block_size)
    if isinstance(vcr, UrlVcr):
        return UrlSource(vcr.url, vcr.block_size)
    parts = build(vcr, activate, read_only=True, tls=tls)

    async def opener() -> None:
        await parts.activate(activate)

    async def closer() -> None:
        await parts.deactivate()
        await parts.close()

    return DeviceSource(parts.volume, opener, closer)
