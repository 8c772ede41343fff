"""The manifest schema: what a committed checkpoint must contain, and validation of untrusted manifests.

MANIFEST.json is written last, so its presence marks a finished write; its content lists every file
with size and xxh3-128, so a truncated, flipped, missing or extra file is detectable. A manifest is
read as hostile input: size-capped, strict JSON, every path checked to stay inside the checkpoint
directory, every field type-checked, and its own checksum verified. Nothing here unpickles anything.
"""

from __future__ import annotations

import functools
import json
import math
import posixpath
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ckptguard.format.layout import MANIFEST_NAME, step_from_name

FORMAT = "ckptguard-checkpoint"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 8 << 20
# A 4,096-rank FSDP job with per-rank state lists about 12,000 files; a manifest past this is hostile
# (parsing and statting 120,000 entries made one restore take 28 s).
MAX_MANIFEST_FILES = 32_768
MAX_NAME_BYTES = 255  # one path component, as every POSIX filesystem and S3 key tool bounds it
_HEX128 = re.compile(r"^[0-9a-f]{32}$")


class ManifestError(ValueError):
    """The manifest is missing, unreadable, or fails validation; `reason` says which rule.

    `detail` is the reason without the name of what was read, for callers that name it their own way
    (a data file's ``file:line:``).
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        self.reason = reason
        self.detail = detail if detail is not None else reason
        super().__init__(reason)


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint as it was written; `rank` is set for a sharded file, by the rank that wrote it."""

    size: int
    xxh3_128: str
    tensors: int = 0
    rank: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"size": self.size, "xxh3_128": self.xxh3_128, "tensors": self.tensors}
        return doc if self.rank is None else {**doc, "rank": self.rank}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. `files` maps relative POSIX paths to their expected size and hash."""

    step: int | None
    sequence: int
    created: float
    world_size: int
    files: dict[str, FileEntry]
    metrics: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        *,
        step: int | None,
        sequence: int,
        files: Mapping[str, FileEntry],
        metrics: Mapping[str, float] | None = None,
        world_size: int = 1,
    ) -> Manifest:
        """The manifest of a save committed now: the only place one is made (parsing aside).

        Stamped with the time and this process's library versions. Metrics are kept as given, a
        non-finite one too (a diverged loss is evidence; it is written as "nan" and retention never
        calls it best): one rule for the manager, the integrations, adapters and export alike.
        """
        return cls(
            step=step, sequence=sequence, created=time.time(), world_size=world_size, files=dict(files),
            metrics={str(k): float(v) for k, v in (metrics or {}).items()}, versions=library_versions(),
        )  # fmt: skip

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @property
    def tensor_count(self) -> int:
        return sum(entry.tensors for entry in self.files.values())

    def to_json_bytes(self) -> bytes:
        """Serialise with a checksum over the canonical body, so a flipped bit in the manifest shows."""
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "sequence": self.sequence,
            "created": self.created,
            "world_size": self.world_size,
            "total_bytes": self.total_bytes,
            "tensor_count": self.tensor_count,
            "metrics": encode_metrics(self.metrics),
            "versions": self.versions,
            "files": {path: e.to_json() for path, e in sorted(self.files.items())},
        }
        body["checksum"] = _checksum(body)
        return (json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(canonical.encode())


def check_relative_path(path: str) -> None:
    """Reject any path that could escape the checkpoint directory or alias another entry."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"file path {path!r} is not a non-empty string")
    if "\\" in path or "\x00" in path:
        raise ManifestError(f"file path {path!r} contains a backslash or NUL")
    if path.startswith("/"):
        raise ManifestError(f"file path {path!r} is absolute")
    parts = path.split("/")
    if ".." in parts:
        raise ManifestError(f"file path {path!r} climbs out of the checkpoint with '..'")
    if posixpath.normpath(path) != path or "." in parts:
        raise ManifestError(f"file path {path!r} is not normalised")
    if path == MANIFEST_NAME:
        raise ManifestError("the manifest lists itself")
    for part in parts:
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            raise ManifestError(f"file path {path[:100]!r} is not valid UTF-8") from None
        if size > MAX_NAME_BYTES:
            raise ManifestError(f"file path {path[:100]!r} has a {size}-byte component (limit {MAX_NAME_BYTES})")


def check_no_aliasing(paths: Iterable[str]) -> None:
    """No path is both a file and a directory of another (``state`` and ``state/x.json``): one cannot hold both."""
    listed = set(paths)
    for path in listed:
        head = path
        while "/" in head:
            head = head.rpartition("/")[0]
            if head in listed:
                raise ManifestError(f"{head[:100]!r} is listed both as a file and as the directory of {path[:100]!r}")


MAX_JSON_DEPTH = 64  # an optimizer's state tree is about 6 deep; anything far deeper is hostile
MAX_INT = 2**63 - 1  # sizes, steps, sequences and counts are int64 everywhere else (safetensors, torch)
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _reject_constant(name: str) -> float:
    raise ManifestError(f"invalid JSON constant {name}")


def parse_json(data: bytes | str, what: str) -> Any:
    """Strict JSON from disk, bounded: UTF-8, no NaN/Infinity, at most MAX_JSON_DEPTH deep.

    The one reader of untrusted JSON (manifests, markers, events.jsonl lines, JSONL data records):
    every way hostile bytes can fail (bad encoding, recursion, digit-count limits, deep nesting)
    becomes a ManifestError naming `what`, never another exception type.
    """
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        doc = json.loads(text, parse_constant=_reject_constant)
    except ManifestError:
        raise
    except json.JSONDecodeError as exc:
        at = f" of line {exc.lineno}" if exc.lineno > 1 else ""
        raise _invalid_json(what, f"{exc.msg} at column {exc.colno}{at}") from None
    except RecursionError:
        raise _too_deep(what) from None
    except (UnicodeDecodeError, ValueError) as exc:
        if "integer string conversion" in str(exc):  # Python's int digit limit, against CPU exhaustion
            raise _invalid_json(what, f"a number longer than {sys.get_int_max_str_digits()} digits") from None
        raise _invalid_json(what, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    check_depth(doc, what, text.count("[") + text.count("{"))
    return doc


def _invalid_json(what: str, detail: str) -> ManifestError:
    return ManifestError(f"{what} is not valid JSON ({detail})", f"invalid JSON ({detail})")


def _too_deep(what: str) -> ManifestError:
    return ManifestError(
        f"{what} nests deeper than {MAX_JSON_DEPTH} levels", f"nests deeper than {MAX_JSON_DEPTH} levels"
    )


def check_depth(doc: Any, what: str, brackets: int | None = None) -> None:
    """Refuse a decoded document nested deeper than MAX_JSON_DEPTH (JSON, or TOML read by tomllib).

    `brackets` (how many ``[`` and ``{`` the text has) skips the walk where it cannot nest that deep.
    """
    if brackets is not None and brackets <= MAX_JSON_DEPTH:
        return  # cannot nest deeper than it has brackets: most documents stop here, cheaply
    stack = [(doc, 1)]
    while stack:  # iterative, so checking the depth cannot itself recurse too deep
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(what)
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def encode_metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """Metrics for JSON: a non-finite value (a diverged loss) is kept, as "nan", "inf" or "-inf"."""
    return {k: v if math.isfinite(v) else str(v) for k, v in metrics.items()}


def _metric(key: str, value: Any) -> float:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1e308 <= value <= 1e308:
        raise ManifestError(f"metric {key!r} is {str(value)[:40]!r}, not a number")
    return float(value)


def _require(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ManifestError(f"field {key!r} is missing or not of type {getattr(kind, '__name__', kind)}")
    return value


def _int(value: Any, what: str, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_INT:
        raise ManifestError(f"{what} is not an integer from {low} to 2**63-1")
    return value


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest bytes; raises ManifestError naming the first broken rule."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is over the {MAX_MANIFEST_BYTES >> 20} MiB limit ({MAX_MANIFEST_BYTES} bytes)")
    body = parse_json(data, "manifest")
    if not isinstance(body, dict):
        raise ManifestError("manifest is not a JSON object")
    if body.get("format") != FORMAT:
        raise ManifestError(f"format is {str(body.get('format'))[:40]!r}, expected {FORMAT!r}")
    version = _require(body, "format_version", int)
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"format_version {str(version)[:20]} is not supported (this ckptguard reads {FORMAT_VERSION}); "
            "upgrade ckptguard to read it"
        )
    if body.get("checksum") != _checksum(body):
        raise ManifestError("manifest checksum does not match its content (edited or damaged)")
    step = body.get("step")
    if step is not None:
        _int(step, "field 'step'")
    files_raw = _require(body, "files", dict)
    if not files_raw:
        raise ManifestError("manifest lists no files")
    if len(files_raw) > MAX_MANIFEST_FILES:
        raise ManifestError(f"manifest lists {len(files_raw)} files, over the {MAX_MANIFEST_FILES} file limit")
    files = {}
    for path, entry in files_raw.items():
        check_relative_path(path)
        if not isinstance(entry, dict):
            raise ManifestError(f"entry for {path!r} is not an object")
        digest = entry.get("xxh3_128")
        if not isinstance(digest, str) or not _HEX128.match(digest):
            raise ManifestError(f"xxh3_128 of {path!r} is not 32 lowercase hex digits")
        files[path] = FileEntry(
            size=_int(entry.get("size"), f"size of {path!r}"),
            xxh3_128=digest,
            tensors=_int(entry.get("tensors", 0), f"tensor count of {path!r}"),
            rank=None if entry.get("rank") is None else _int(entry.get("rank"), f"rank of {path!r}"),
        )
    check_no_aliasing(files)
    created = _require(body, "created", (int, float))
    if not 0 <= created <= 1e12:  # seconds since 1970: up to the year 33658
        raise ManifestError("field 'created' is not a plausible time")
    return Manifest(
        step=step,
        sequence=_int(body.get("sequence"), "field 'sequence'"),
        created=float(created),
        world_size=_int(body.get("world_size"), "field 'world_size'", low=1),
        files=files,
        metrics={str(k): _metric(str(k), v) for k, v in _require(body, "metrics", dict).items()},
        versions={str(k): str(v)[:200] for k, v in _require(body, "versions", dict).items()},
    )


def read_manifest(checkpoint_dir: Path) -> Manifest:
    """Read and validate `checkpoint_dir/MANIFEST.json`, checking the step against the directory name."""
    path = checkpoint_dir / MANIFEST_NAME
    try:
        if path.is_symlink() or not path.is_file():
            raise ManifestError("missing: the save never finished")
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"MANIFEST.json cannot be read ({exc.strerror})") from None
    manifest = parse_manifest(data)
    named = step_from_name(checkpoint_dir.name)
    if named is not None and manifest.step != named:
        raise ManifestError(f"manifest says step {manifest.step} but the directory is named for step {named}")
    return manifest


def library_versions() -> dict[str, str]:
    """Versions recorded in each manifest, so a checkpoint says what wrote it (a copy: callers may change it)."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    """Read once per process: each read parses package metadata files (milliseconds a save, more on a busy
    machine), and an upgrade installed while a run goes on does not change the code it already imported."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("ckptguard", "torch", "safetensors", "peft", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
