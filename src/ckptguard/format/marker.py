"""The commit marker of a bucket checkpoint (``COMMITTED``): the object whose presence makes it a checkpoint.

Object storage has no rename, so a checkpoint commits by writing this small JSON object last,
create-only. It names the manifest by its xxh3-128, so a manifest replaced after the commit is
caught; its step and sequence are for people reading a listing. docs/format.md describes it.
"""

from __future__ import annotations

import json

import xxhash

from ckptguard.format.layout import MARKER_NAME
from ckptguard.format.manifest import Manifest, ManifestError, parse_json

MARKER_FORMAT = "ckptguard-commit"
MAX_MARKER_BYTES = 4096


def marker_bytes(manifest: Manifest, manifest_bytes: bytes) -> bytes:
    """The marker committing `manifest`, whose serialized form is `manifest_bytes` (as uploaded)."""
    body = {
        "format": MARKER_FORMAT, "manifest_xxh3_128": xxhash.xxh3_128_hexdigest(manifest_bytes),
        "step": manifest.step, "sequence": manifest.sequence,
    }  # fmt: skip
    return json.dumps(body, sort_keys=True).encode()


def parse_marker(data: bytes) -> str:
    """The manifest digest a marker names; ManifestError for anything that is not a ckptguard marker."""
    if len(data) > MAX_MARKER_BYTES:
        raise ManifestError(f"{MARKER_NAME} is over {MAX_MARKER_BYTES} bytes")
    body = parse_json(data, MARKER_NAME)
    digest = body.get("manifest_xxh3_128") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("format") != MARKER_FORMAT or not isinstance(digest, str):
        raise ManifestError(f"{MARKER_NAME} is not a ckptguard commit marker")
    return digest
