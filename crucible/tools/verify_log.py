"""The verify log: what every block of a volume must hold.

Each block carries a write counter: a block written for the n-th time holds
the pattern for n (its index and n in the first 16 bytes, then a filler
derived from both); counter 0 means not written through this log, so its
content is not checked. `committed`
is the counter at the last acknowledged flush. After a crash, a block may hold
any counter from committed to current (writes after the last flush may or may
not have landed), and nothing else.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from crucible.common.buffer import is_zeros

_HEAD = struct.Struct("<QQ")


def block_pattern(block: int, counter: int, block_size: int) -> bytes:
    if counter == 0:
        return bytes(block_size)
    fill = bytes([(block * 31 + counter * 17 + 1) & 0xFF])
    return _HEAD.pack(block, counter) + fill * (block_size - _HEAD.size)


def counter_of(data: bytes | memoryview, block: int, block_size: int) -> int | None:
    """The counter a block holds, or None if it is no pattern of this block."""
    if is_zeros(data):
        return 0
    b, counter = _HEAD.unpack_from(data)
    if b != block or counter == 0:
        return None
    return counter if bytes(data) == block_pattern(block, counter, block_size) else None


class VerifyLog:
    """Saved as JSON lines: a snapshot, then (while a run is journalling) one
    event per write before it is issued and per flush after it is acknowledged,
    so a log whose writer was killed still bounds what the volume may hold."""

    def __init__(self, block_size: int, total_blocks: int) -> None:
        self.block_size = block_size
        self.total_blocks = total_blocks
        self.current = [0] * total_blocks
        self.committed = [0] * total_blocks
        self._journal: int | None = None

    def _event(self, obj: object) -> None:
        if self._journal is not None:
            os.write(self._journal, (json.dumps(obj) + "\n").encode())

    def journal_to(self, path: Path) -> None:
        """Save a snapshot at `path` and append every later event to it."""
        self.save(path)
        self._journal = os.open(path, os.O_WRONLY | os.O_APPEND)

    def close(self) -> None:
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    def next_data(self, start: int, count: int) -> bytes:
        """Bump the counters of a range and return the bytes to write there."""
        self._event({"w": [start, count]})
        bs = self.block_size
        out = []
        for b in range(start, start + count):
            self.current[b] += 1
            out.append(block_pattern(b, self.current[b], bs))
        return b"".join(out)

    def commit(self) -> None:
        """A flush was acknowledged: everything written so far is durable."""
        self.committed = list(self.current)
        self._event({"f": 1})

    def check(self, start: int, data: bytes, allow_range: bool = False) -> list[str]:
        """Problems with blocks read at `start`. With allow_range (after a crash),
        a counter between committed and current is accepted and adopted."""
        bs = self.block_size
        problems = []
        for i in range(len(data) // bs):
            b = start + i
            want = self.current[b]
            if want == 0:
                continue  # never written through this log: its content is unknown
            found = counter_of(memoryview(data)[i * bs : (i + 1) * bs], b, bs)
            if found == want:
                continue
            if allow_range and found is not None and self.committed[b] <= found <= want:
                self.current[b] = self.committed[b] = found
                continue
            expect = (
                f"{self.committed[b]}..{want}"
                if allow_range and self.committed[b] != want
                else str(want)
            )
            problems.append(
                f"block {b}: holds {'garbage' if found is None else found}, expected {expect}"
            )
        return problems

    def save(self, path: Path) -> None:
        """Write a snapshot atomically (and end any journal)."""
        self.close()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "block_size": self.block_size,
                    "total_blocks": self.total_blocks,
                    "current": self.current,
                    "committed": self.committed,
                }
            )
            + "\n"
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> VerifyLog:
        try:
            lines = path.read_text().splitlines()
            obj = json.loads(lines[0])
            log = cls(int(obj["block_size"]), int(obj["total_blocks"]))
            log.current = [int(x) for x in obj["current"]]
            log.committed = [int(x) for x in obj["committed"]]
            if len(log.current) != log.total_blocks or len(log.committed) != log.total_blocks:
                raise ValueError("block counts do not match")
            for line in lines[1:]:
                ev = json.loads(line)
                if "w" in ev:
                    start, count = (int(x) for x in ev["w"])
                    for b in range(start, start + count):
                        log.current[b] += 1
                elif "f" in ev:
                    log.committed = list(log.current)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"cannot load verify log {path}: {e}") from None
        return log
