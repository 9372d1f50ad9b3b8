"""What a downstairs can do beyond Crucible's message version 13.

V13 has no room to say so on the wire, and a Rust downstairs drops the
connection on a message it does not know. So a downstairs of ours reports
its extensions from its repair server, `GET /capabilities`, as a JSON
object; a Rust downstairs answers 404 there, which means none. The upstairs
asks after YesItsMe (which names the repair server) and before it promotes,
and uses an extension with that downstairs only if it was reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CAPABILITIES_PATH = "/capabilities"
# The region's blocks that hold data: {"runs": [[first block, count], ...]},
# sorted; every other block reads as zeros (crucible/region/allocation.py).
ALLOCATION_PATH = "/allocation"


@dataclass(frozen=True, slots=True)
class Capabilities:
    trim: bool = False  # the Trim message (variant 42): blocks become never-written
    allocation: bool = False  # GET /allocation: which blocks hold data (ALLOCATION_PATH)

    def to_json(self) -> dict[str, Any]:
        return {"trim": self.trim, "allocation": self.allocation}

    @classmethod
    def from_json(cls, obj: Any) -> Capabilities:
        """Anything but an object with the expected booleans means none."""
        if not isinstance(obj, dict):
            return cls()
        return cls(trim=obj.get("trim") is True, allocation=obj.get("allocation") is True)


NONE = Capabilities()
OURS = Capabilities(trim=True, allocation=True)
