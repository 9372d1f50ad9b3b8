"""Read-only views of regions: `dump` (compare up to three) and `verify`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from crucible.common.errors import CrucibleError
from crucible.region.context import SlotContext
from crucible.region.region import Region

Out = Callable[[str], None]


def dump_extents(regions: list[Region], out: Out) -> int:
    """Per-extent gen/flush/dirty across regions; returns the number of mismatches."""
    n = len(regions)
    head = "  EXT " + " ".join(f"GEN{i:<3}" for i in range(n)) + "  "
    head += " ".join(f"FL{i:<5}" for i in range(n)) + "  " + " ".join(f"D{i}" for i in range(n))
    out(head)
    versions = [r.extent_versions() for r in regions]
    count = min(len(v[0]) for v in versions)
    bad = 0
    for eid in range(count):
        gens = [v[0][eid] for v in versions]
        fls = [v[1][eid] for v in versions]
        dirty = [v[2][eid] for v in versions]
        differ = len(set(gens)) > 1 or len(set(fls)) > 1 or len(set(dirty)) > 1 or any(dirty)
        bad += differ
        line = f"{eid:5} " + " ".join(f"{g:<6}" for g in gens) + "  "
        line += (
            " ".join(f"{f:<7}" for f in fls) + "  " + " ".join(("T " if d else "F ") for d in dirty)
        )
        out(line.rstrip() + ("   <-- differs" if differ else ""))
    if any(len(v[0]) != count for v in versions):
        out("regions have different extent counts")
        bad += 1
    out(f"{count} extents, {bad} differ" if bad else f"{count} extents, all match")
    return bad


def _letters(values: list[object]) -> str:
    seen: dict[object, str] = {}
    return "".join(seen.setdefault(v, "ABC"[len(seen)]) for v in values)


def _block_view(region: Region, block: int) -> tuple[bytes | None, SlotContext | None, str]:
    """A block's data (as bytes: they are compared as dict keys), its active
    slot's context and the slot's name; or None, None and why it is unreadable."""
    eid, off = divmod(block, region.definition.extent_size)
    ext = region.extent(eid)
    try:
        _, data = ext.read(off, 1)
    except CrucibleError as e:
        return None, None, str(e)
    (sc,) = ext.active_slots(off, 1)
    return bytes(data), sc, "B" if ext.active[off] else "A"


def dump_extent_blocks(regions: list[Region], eid: int, out: Out) -> int:
    """Compare every block of one extent: letters name distinct data/contexts."""
    es = regions[0].definition.extent_size
    out(f"extent {eid}: BLOCK  DATA  CONTEXT")
    bad = 0
    for off in range(es):
        views = [_block_view(r, eid * es + off) for r in regions]
        data = _letters([v[0] for v in views])
        ctx = _letters([v[1].context if v[1] else None for v in views])
        differ = len(set(data)) > 1 or len(set(ctx)) > 1
        bad += differ
        out(f"         {off:5}  {data:5} {ctx:7}" + ("  <-- differs" if differ else ""))
    out(f"{bad} blocks differ" if bad else "all blocks match")
    return bad


def dump_block(regions: list[Region], block: int, out: Out) -> int:
    views = [_block_view(r, block) for r in regions]
    for i, (data, sc, slot) in enumerate(views):
        if data is None:
            out(f"region {i}: unreadable: {slot}")
            continue
        digest = hashlib.sha256(data).hexdigest()[:32]
        if sc is None:
            out(f"region {i}: slot {slot} empty  data sha256 {digest}")
            continue
        line = f"region {i}: slot {slot} hash {sc.context.hash:016x} "
        line += f"on-disk {sc.on_disk_hash:016x} data sha256 {digest}"
        enc = sc.context.encryption
        if enc is not None:
            line += f" nonce {enc.nonce.hex()} tag {enc.tag.hex()}"
        out(line)
    same = len({(v[0], v[1].context if v[1] else None) for v in views}) == 1
    out("all copies match" if same else "copies differ")
    return 0 if same else 1


def verify_region(region: Region, out: Out) -> int:
    """Check every block; returns the number of problems found."""
    problems = 0
    for eid, ext in enumerate(region.extents):
        if ext is None:
            continue
        for p in ext.verify():
            out(f"extent {eid} {p}")
            problems += 1
    return problems
