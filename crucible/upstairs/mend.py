"""Which extents reconciliation must repair, and from where.

An extent needs repair when its (gen, flush, dirty) differ between replicas or
any copy is dirty. The source is the copy with the highest (gen, flush, dirty),
ties going to the lowest client; every other copy that differs from it, or all
of them when the source is dirty, is a destination. A copy known to hold a
torn block (its downstairs refused to flush the extent) is never a source.
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


class Unrepairable(Exception):
    """Every copy of an extent is unusable as a source."""

    def __init__(self, extent: int) -> None:
        super().__init__(f"extent {extent}")
        self.extent = extent


def mend(
    versions: list[ExtentVersions], unusable: frozenset[tuple[int, int]] = frozenset()
) -> list[Repair]:
    """The repairs to make; `unusable`: (extent, client) copies that must not
    be a source. Raises Unrepairable when an extent has no usable copy."""
    out = []
    count = len(versions[0].gens)
    for eid in range(count):
        meta = [(v.gens[eid], v.flushes[eid], v.dirty[eid]) for v in versions]
        if len(set(meta)) == 1 and not meta[0][2]:
            continue
        usable = [c for c in range(len(meta)) if (eid, c) not in unusable]
        if not usable:
            raise Unrepairable(eid)
        best = max(meta[c] for c in usable)
        source = next(c for c in usable if meta[c] == best)  # the lowest client with it
        dests = tuple(c for c in range(len(meta)) if c != source and (best[2] or meta[c] != best))
        out.append(Repair(eid, source, dests))
    return out


def generation_floor(versions: list[ExtentVersions]) -> int:
    """The highest generation stored anywhere: a new activation must exceed it."""
    return max((g for v in versions for g in v.gens), default=0)


def next_flush_number(versions: list[ExtentVersions]) -> int:
    return max((f for v in versions for f in v.flushes), default=0) + 1
