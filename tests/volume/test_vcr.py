"""VCRs: Crucible's JSON read and written field for field, and every bad one
refused with the field named."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from crucible.volume import vcr as v

REGION: dict[str, Any] = {
    "type": "region",
    "block_size": 512,
    "blocks_per_extent": 100,
    "extent_count": 15,
    "opts": {
        "id": "6e4b5a3c-2f7e-4a2b-9d65-0f7f0e8f6a11",
        "target": ["127.0.0.1:3810", "127.0.0.1:3820", "127.0.0.1:3830"],
        "lossy": False,
        "flush_timeout": None,
        "key": None,
        "cert_pem": None,
        "key_pem": None,
        "root_cert_pem": None,
        "control": None,
        "read_only": False,
    },
    "gen": 3,
}


def volume(*subs: dict[str, Any], parent: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "volume",
        "id": str(uuid.UUID(int=1)),
        "block_size": 512,
        "sub_volumes": list(subs),
        "read_only_parent": parent,
    }


def other_region(port: int) -> dict[str, Any]:
    r = copy.deepcopy(REGION)
    r["opts"]["target"] = [f"127.0.0.1:{port + i}" for i in range(3)]
    return r


def test_crucibles_json_reads_and_writes_back_the_same() -> None:
    doc = volume(REGION, other_region(4000), parent={
        "type": "file", "id": str(uuid.UUID(int=2)), "block_size": 512, "path": "/images/base.raw"
    })  # fmt: skip
    parsed = v.parse(doc)
    v.check(parsed)
    assert v.to_json(parsed) == doc
    assert isinstance(parsed, v.VolumeVcr) and v.known_blocks(parsed) == 3000
    region = parsed.sub_volumes[0]
    assert isinstance(region, v.RegionVcr) and region.gen == 3
    assert region.opts.target[1] == ("127.0.0.1", 3820)


def bad(doc: Any) -> str:
    with pytest.raises(v.VcrError) as e:
        v.check(v.parse(doc))
    return str(e.value)


def test_every_bad_vcr_is_named() -> None:
    r = copy.deepcopy(REGION)
    r["block_size"] = 1000
    assert bad(volume(r)) == "sub_volumes[0].block_size: block size 1000 is not a power of two"
    r = copy.deepcopy(REGION)
    r["opts"]["target"] = r["opts"]["target"][:2]
    assert bad(r) == "opts.target: give exactly three targets, got 2"
    r = copy.deepcopy(REGION)
    del r["extent_count"]
    assert bad(volume(r)) == "sub_volumes[0].extent_count: missing"
    assert "appears twice" in bad(volume(REGION, REGION))
    r = copy.deepcopy(other_region(4000))
    r["block_size"] = 4096
    assert "sub_volumes[1] has block size 4096, the volume 512" in bad(volume(REGION, r))
    big = other_region(5000)
    big["extent_count"] = 16
    assert "read_only_parent has 1600 blocks, more than the volume's 1500" in bad(
        volume(REGION, parent=big)
    )
    assert "unknown type 'disk'" in bad({"type": "disk"})
    assert bad({**volume(REGION), "id": "nope"}) == "id: 'nope' is not a UUID"
    r = copy.deepcopy(REGION)
    r["opts"]["target"][2] = "127.0.0.1"
    assert bad(r).startswith("opts.target[2]: ")
    assert bad(volume()) == "the volume: no sub_volumes and no read_only_parent"
    assert bad([]) == "the VCR: expected an object"
    url = {"type": "url", "id": str(uuid.UUID(int=3)), "block_size": 512, "url": "ftp://x/y"}
    assert bad(url) == "url: 'ftp://x/y' is not an http(s) URL"


def test_load_says_what_is_wrong_with_the_file(tmp_path: Path) -> None:
    f = tmp_path / "vcr.json"
    f.write_text("{not json")
    with pytest.raises(v.VcrError, match="is not JSON"):
        v.load(f)
    f.write_text(json.dumps(volume(REGION)))
    assert isinstance(v.load(f), v.VolumeVcr)
