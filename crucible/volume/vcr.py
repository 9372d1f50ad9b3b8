"""Volume Construction Requests: Crucible's JSON description of a volume.

    {"type": "volume", "id": UUID, "block_size": N,
     "sub_volumes": [VCR, ...], "read_only_parent": VCR | null}
    {"type": "region", "block_size": N, "blocks_per_extent": N, "extent_count": N,
     "gen": N, "opts": {"id": UUID, "target": ["ip:port" x3], "lossy": bool,
     "flush_timeout": float | null, "key": base64 | null, "cert_pem": PEM | null,
     "key_pem": PEM | null, "root_cert_pem": PEM | null,
     "control": "ip:port" | null, "read_only": bool}}
    {"type": "file", "id": UUID, "block_size": N, "path": "..."}
    {"type": "url", "id": UUID, "block_size": N, "url": "http(s)://..."}

Sub-volumes are concatenated in order; a read-only parent lies under them
from block 0. Parsing checks every field and says where a bad one is
(`sub_volumes[1].opts.target`); `check` then checks the whole: one block
size throughout, no target twice, a parent no larger than the volume.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crucible.common.address import format_host_port, host_port
from crucible.common.definition import RegionError, validate_block_size


class VcrError(ValueError):
    """A VCR that cannot be used; the message names the field."""


@dataclass(frozen=True)
class RegionOpts:
    id: uuid.UUID
    target: tuple[tuple[str, int], ...]
    lossy: bool = False
    flush_timeout: float | None = None
    key: str | None = field(default=None, repr=False)
    cert_pem: str | None = None
    key_pem: str | None = field(default=None, repr=False)
    root_cert_pem: str | None = None
    control: tuple[str, int] | None = None
    read_only: bool = False


@dataclass(frozen=True)
class RegionVcr:
    block_size: int
    blocks_per_extent: int
    extent_count: int
    gen: int
    opts: RegionOpts

    @property
    def total_blocks(self) -> int:
        return self.blocks_per_extent * self.extent_count


@dataclass(frozen=True)
class FileVcr:
    id: uuid.UUID
    block_size: int
    path: Path


@dataclass(frozen=True)
class UrlVcr:
    id: uuid.UUID
    block_size: int
    url: str


@dataclass(frozen=True)
class VolumeVcr:
    id: uuid.UUID
    block_size: int
    sub_volumes: tuple[Vcr, ...]
    read_only_parent: Vcr | None = None


Vcr = VolumeVcr | RegionVcr | FileVcr | UrlVcr


# ---- parsing ----------------------------------------------------------------------------


class _Obj:
    """A JSON object being read, which knows where it is for the errors."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise VcrError(f"{where or 'the VCR'}: expected an object")
        self.obj, self.where = obj, where

    def at(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        if name not in self.obj or (optional and self.obj[name] is None):
            if optional:
                return None
            raise VcrError(f"{self.at(name)}: missing")
        value = self.obj[name]
        if isinstance(value, bool) and kind is not bool:
            raise VcrError(f"{self.at(name)}: expected {_kind(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise VcrError(f"{self.at(name)}: expected {_kind(kind)}, got {value!r}")
        return value

    def uint(self, name: str) -> int:
        v: int = self.get(name, int)
        if v < 0:
            raise VcrError(f"{self.at(name)}: {v} is negative")
        return v

    def uuid(self, name: str) -> uuid.UUID:
        text = self.get(name, str)
        try:
            return uuid.UUID(text)
        except ValueError:
            raise VcrError(f"{self.at(name)}: {text!r} is not a UUID") from None

    def block_size(self) -> int:
        bs = self.uint("block_size")
        try:
            validate_block_size(bs)
        except RegionError as e:
            raise VcrError(f"{self.at('block_size')}: {e}") from None
        return bs

    def address(self, name: str, text: Any) -> tuple[str, int]:
        if not isinstance(text, str):
            raise VcrError(f'{self.at(name)}: expected "ip:port", got {text!r}')
        try:
            return host_port(text)
        except ValueError as e:
            raise VcrError(f"{self.at(name)}: {e}") from None


def _kind(kind: type | tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", str: "a string", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, "a number" if k is float else k.__name__) for k in kinds)


TYPES = ("volume", "region", "file", "url")


def parse(obj: Any, where: str = "") -> Vcr:
    """A VCR from its JSON value; VcrError naming the field that is wrong."""
    o = _Obj(obj, where)
    kind = o.get("type", str)
    if kind == "volume":
        subs = o.get("sub_volumes", list)
        parent = o.obj.get("read_only_parent")
        return VolumeVcr(
            o.uuid("id"),
            o.block_size(),
            tuple(parse(s, f"{o.at('sub_volumes')}[{i}]") for i, s in enumerate(subs)),
            None if parent is None else parse(parent, o.at("read_only_parent")),
        )
    if kind == "region":
        opts = _Obj(o.get("opts", dict), o.at("opts"))
        targets = opts.get("target", list)
        if len(targets) != 3:
            raise VcrError(f"{opts.at('target')}: give exactly three targets, got {len(targets)}")
        control = opts.get("control", str, optional=True)
        flush_timeout = opts.get("flush_timeout", (int, float), optional=True)
        return RegionVcr(
            o.block_size(),
            _positive(o, "blocks_per_extent"),
            _positive(o, "extent_count"),
            o.uint("gen"),
            RegionOpts(
                opts.uuid("id"),
                tuple(opts.address(f"target[{i}]", t) for i, t in enumerate(targets)),
                bool(opts.get("lossy", bool, optional=True)),
                None if flush_timeout is None else float(flush_timeout),
                opts.get("key", str, optional=True),
                opts.get("cert_pem", str, optional=True),
                opts.get("key_pem", str, optional=True),
                opts.get("root_cert_pem", str, optional=True),
                None if control is None else opts.address("control", control),
                bool(opts.get("read_only", bool, optional=True)),
            ),
        )
    if kind == "file":
        return FileVcr(o.uuid("id"), o.block_size(), Path(o.get("path", str)))
    if kind == "url":
        url = o.get("url", str)
        if not url.startswith(("http://", "https://")):
            raise VcrError(f"{o.at('url')}: {url!r} is not an http(s) URL")
        return UrlVcr(o.uuid("id"), o.block_size(), url)
    raise VcrError(f"{o.at('type')}: unknown type {kind!r} (one of {', '.join(TYPES)})")


def _positive(o: _Obj, name: str) -> int:
    v = o.uint(name)
    if v == 0:
        raise VcrError(f"{o.at(name)}: must be at least 1")
    return v


# ---- the whole ----------------------------------------------------------------------------


def regions(vcr: Vcr, parents: bool = True) -> list[RegionVcr]:
    """Every region in it, in order: parents' included, or (`parents` False)
    only those guest writes go to."""
    if isinstance(vcr, RegionVcr):
        return [vcr]
    if isinstance(vcr, VolumeVcr):
        out = [r for s in vcr.sub_volumes for r in regions(s, parents)]
        if parents and vcr.read_only_parent is not None:
            out += regions(vcr.read_only_parent)
        return out
    return []


def check(vcr: Vcr, where: str = "") -> None:
    """What a VCR says as a whole (field checks are parse's): VcrError if not."""
    seen: dict[tuple[str, int], int] = {}
    for r in regions(vcr):
        for t in r.opts.target:
            if t in seen:
                raise VcrError(f"target {t[0]}:{t[1]} appears twice")
            seen[t] = 1
    _check(vcr, where)


def _check(vcr: Vcr, where: str) -> None:
    if not isinstance(vcr, VolumeVcr):
        return
    here = where or "the volume"
    for i, s in enumerate(vcr.sub_volumes):
        if s.block_size != vcr.block_size:
            raise VcrError(
                f"{here}: sub_volumes[{i}] has block size {s.block_size}, the volume "
                f"{vcr.block_size}"
            )
        _check(s, f"{where}.sub_volumes[{i}]" if where else f"sub_volumes[{i}]")
    parent = vcr.read_only_parent
    if parent is None:
        if not vcr.sub_volumes:
            raise VcrError(f"{here}: no sub_volumes and no read_only_parent")
        return
    if parent.block_size != vcr.block_size:
        raise VcrError(
            f"{here}: read_only_parent has block size {parent.block_size}, the volume "
            f"{vcr.block_size}"
        )
    size, psize = known_blocks(vcr), known_blocks(parent)
    if vcr.sub_volumes and size is not None and psize is not None and psize > size:
        raise VcrError(
            f"{here}: read_only_parent has {psize} blocks, more than the volume's {size}"
        )
    _check(parent, f"{where}.read_only_parent" if where else "read_only_parent")


def known_blocks(vcr: Vcr) -> int | None:
    """Its size in blocks, where the VCR says it (a URL's is known only by asking)."""
    if isinstance(vcr, RegionVcr):
        return vcr.total_blocks
    if isinstance(vcr, FileVcr):
        try:
            return -(-vcr.path.stat().st_size // vcr.block_size)
        except OSError:
            return None
    if isinstance(vcr, VolumeVcr):
        if not vcr.sub_volumes:
            return None if vcr.read_only_parent is None else known_blocks(vcr.read_only_parent)
        sizes = [known_blocks(s) for s in vcr.sub_volumes]
        return None if None in sizes else sum(s for s in sizes if s is not None)
    return None


def load(path: Path) -> Vcr:
    """Read, parse and check a VCR file; VcrError (or OSError) if not usable."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VcrError(f"{path} is not JSON: {e}") from None
    vcr = parse(obj)
    check(vcr)
    return vcr


# ---- writing --------------------------------------------------------------------------------


def to_json(vcr: Vcr) -> dict[str, Any]:
    """The JSON value (Crucible's field names and order)."""
    if isinstance(vcr, VolumeVcr):
        return {
            "type": "volume",
            "id": str(vcr.id),
            "block_size": vcr.block_size,
            "sub_volumes": [to_json(s) for s in vcr.sub_volumes],
            "read_only_parent": None
            if vcr.read_only_parent is None
            else to_json(vcr.read_only_parent),
        }
    if isinstance(vcr, RegionVcr):
        o = vcr.opts
        return {
            "type": "region",
            "block_size": vcr.block_size,
            "blocks_per_extent": vcr.blocks_per_extent,
            "extent_count": vcr.extent_count,
            "opts": {
                "id": str(o.id),
                "target": [format_host_port(t) for t in o.target],
                "lossy": o.lossy,
                "flush_timeout": o.flush_timeout,
                "key": o.key,
                "cert_pem": o.cert_pem,
                "key_pem": o.key_pem,
                "root_cert_pem": o.root_cert_pem,
                "control": None if o.control is None else format_host_port(o.control),
                "read_only": o.read_only,
            },
            "gen": vcr.gen,
        }
    if isinstance(vcr, FileVcr):
        return {
            "type": "file",
            "id": str(vcr.id),
            "block_size": vcr.block_size,
            "path": str(vcr.path),
        }
    return {"type": "url", "id": str(vcr.id), "block_size": vcr.block_size, "url": vcr.url}


def save(path: Path, vcr: Vcr) -> None:
    """Write a VCR atomically, readable by its owner only: it may hold a key
    and TLS private keys, as Crucible's do."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(to_json(vcr), indent=2) + "\n")
    tmp.replace(path)
