"""Which extents reconciliation must repair, and from where.

An extent needs repair when its (gen, flush, dirty) differ between replicas or
any copy is dirty. The source is the copy with the highest (gen, flush, dirty),
ties going to the lowest client; every other copy that differs from it, or all
of them when the source is dirty, is a destination.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ExtentVersions:
    gens: list[int]
    flushes: list[int]
    dirty: list[bool]


@dataclass(frozen=True, slots=True)
class Repair:
    extent: int
    source: int
    dests: tuple[int, ...]


def mend(versions: list[ExtentVersions]) -> list[Repair]:
    out = []
    count = len(versions[0].gens)
    for eid in range(count):
        meta = [(v.gens[eid], v.flushes[eid], v.dirty[eid]) for v in versions]
        if len(set(meta)) == 1 and not meta[0][2]:
            continue
        best = max(meta)
        source = meta.index(best)  # index() finds the lowest client with that value
        dests = tuple(c for c in range(len(meta)) if c != source and (best[2] or meta[c] != best))
        out.append(Repair(eid, source, dests))
    return out


def generation_floor(versions: list[ExtentVersions]) -> int:
    """The highest generation stored anywhere: a new activation must exceed it."""
    return max((g for v in versions for g in v.gens), default=0)


def next_flush_number(versions: list[ExtentVersions]) -> int:
    return max((f for v in versions for f in v.flushes), default=0) + 1
