"""The bucket's commit marker (format/marker.py): what a ckptguard marker is, and what is refused as one.

A marker makes a bucket checkpoint exist, so a crafted or damaged one must never pass for a commit.
"""

from __future__ import annotations

import json

import pytest
import xxhash

from ckptguard.format.manifest import FileEntry, Manifest, ManifestError
from ckptguard.format.marker import MAX_MARKER_BYTES, marker_bytes, parse_marker


def _manifest() -> Manifest:
    return Manifest.new(step=7, sequence=3, files={"a.json": FileEntry(size=2, xxh3_128="0" * 32)})


def test_a_marker_names_the_manifest_it_commits_by_its_hash() -> None:
    manifest = _manifest()
    data = manifest.to_json_bytes()
    marker = marker_bytes(manifest, data)
    assert parse_marker(marker) == xxhash.xxh3_128_hexdigest(data)
    assert json.loads(marker) == {
        "format": "ckptguard-commit", "manifest_xxh3_128": xxhash.xxh3_128_hexdigest(data), "step": 7, "sequence": 3,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not a ckptguard commit marker|not valid JSON|JSON"),
        (b"[1, 2]", "not a ckptguard commit marker"),
        (json.dumps({"format": "other", "manifest_xxh3_128": "0" * 32}).encode(), "not a ckptguard commit marker"),
        (json.dumps({"format": "ckptguard-commit", "manifest_xxh3_128": 5}).encode(), "not a ckptguard commit marker"),
        (json.dumps({"format": "ckptguard-commit"}).encode(), "not a ckptguard commit marker"),
        (b" " * (MAX_MARKER_BYTES + 1), f"over {MAX_MARKER_BYTES} bytes"),
    ],
)
def test_anything_else_is_refused_as_a_marker(data: bytes, why: str) -> None:
    with pytest.raises(ManifestError, match=why):
        parse_marker(data)
