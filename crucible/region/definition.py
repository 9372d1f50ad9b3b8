"""DIR/region.json: a region's definition on disk, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from crucible.common.definition import RegionDefinition, RegionError

REGION_JSON = "region.json"


def save_definition(definition: RegionDefinition, directory: Path) -> None:
    """Write DIR/region.json atomically: temp file, fsync, rename, fsync dir."""
    write_json_atomic(directory / REGION_JSON, definition.to_json())


def load_definition(directory: Path) -> RegionDefinition:
    path = directory / REGION_JSON
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RegionError(f"no region at {directory}: {path} does not exist") from None
    except OSError as e:
        raise RegionError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RegionError(f"{path} is not a region definition (not UTF-8 text)") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegionError(f"{path} is not valid JSON: {e}") from None
    try:
        return RegionDefinition.from_json(obj)
    except RegionError as e:
        raise RegionError(f"{path}: {e}") from None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
