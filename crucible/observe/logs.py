"""Log output: the console's text lines, or one JSON object per line
(`--log-format json`) for a log collector."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)-5s %(message)s"

# Ids every JSON line carries once they are known: the upstairs sets
# upstairs_id and session_id, a downstairs its region's id (downstairs_id).
context: dict[str, Callable[[], str | None]] = {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="microseconds"
            ),
            "level": record.levelname.lower(),
            "component": record.name,
        }
        for key, get in context.items():
            value = get()
            if value is not None:
                out[key] = value
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(fmt: str = "text", level: int = logging.INFO, text: str = TEXT) -> None:
    """Log to stdout in `fmt`: json, or text lines shaped by `text`."""
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(text))
    logging.basicConfig(level=level, handlers=[handler], force=True)
