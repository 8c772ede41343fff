"""Verification levels for a checkpoint directory, or a checkpoint that is one file (a Lightning ``.ckpt``).

* ``quick``: the manifest validates; every listed file exists as a regular file of the listed size;
  nothing unlisted is present. Costs a few stats; used for discovery and ``ckptguard ls``.
* ``full`` (default): quick + every byte re-read and its xxh3-128 compared with the manifest, and the
  step in the trainer state agrees with the manifest's (and so with the directory name).
* ``deep``: full + every tensor file parsed by safetensors and its tensors loaded; given the
  in-memory snapshot, each tensor is compared bit for bit; given a PEFT model, the adapter must hold
  exactly the model's trainable LoRA tensors (an empty adapter, a DDP ``module.`` or a
  ``torch.compile`` ``_orig_mod.`` prefix fails).

Every problem names the file (in a checkpoint file, the record) and the reason, so ``ckptguard verify``
output is actionable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from ckptguard.errors import CorruptCheckpointError, VerificationError, from_os_error
from ckptguard.files.hashing import hash_file
from ckptguard.format import ckpt_file, dcp_metadata
from ckptguard.format.layout import ADAPTER_WEIGHTS, MANIFEST_NAME, STATE_FILE, VERIFY_LEVELS
from ckptguard.format.lora import adapter_key_problems
from ckptguard.format.manifest import FileEntry, Manifest, ManifestError, parse_json, parse_manifest, read_manifest
from ckptguard.format.tensorfile import parse_tensors

LEVELS = VERIFY_LEVELS
UNVERIFIABLE_FILE = "missing: saved without ckptguard, nothing to verify it against"  # a plain checkpoint file


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: which file, and why."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class VerifyReport:
    """Outcome of one verification; `ok` only when no problem was found (`path`: a URL for a remote one)."""

    path: Path | str
    level: str
    manifest: Manifest | None = None
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0  # bytes actually read from disk (0 for quick, which only stats)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def reason(self) -> str | None:
        """The first problem, for one-line listings."""
        return str(self.problems[0]) if self.problems else None


def check_level(level: str) -> str:
    """`level` if it is a verification level; ValueError listing the levels otherwise."""
    if level not in LEVELS:
        raise ValueError(f"verification level {level!r} is not one of {', '.join(LEVELS)}")
    return level


def size_mismatch(size: int, entry: FileEntry) -> str:
    return f"size {size} bytes, manifest says {entry.size} (truncated or appended to)"


def hash_mismatch(digest: str, entry: FileEntry) -> str:
    return f"content hash mismatch: {digest} != manifest {entry.xxh3_128}"


def verify_checkpoint(
    path: str | os.PathLike[str],
    level: str = "full",
    *,
    expected: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    model: Any = None,
    reread: frozenset[str] = frozenset(),
    decoded: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check a checkpoint directory at `level`; never raises for a damaged checkpoint, reports it.

    `reread`: files whose bytes their writers have just re-read and hashed (:func:`check_written`,
    each rank its own, in parallel); they get the quick check here unless `level` parses them.
    `decoded`: DCP metadata a writer decoded from the bytes it read back (same hash): its shard
    references are checked against the manifest here, instead of decoding it again.
    """
    check_level(level)
    start = time.perf_counter()
    report = VerifyReport(path=Path(path), level=level)
    try:
        if report.path.is_file() and not report.path.is_symlink():  # a checkpoint that is one file (a .ckpt)
            _check_file(report, level)
            report.seconds = time.perf_counter() - start
            return report
        _check_structure(report)
        if report.ok and level in ("full", "deep"):
            _check_contents(report, level == "deep", expected or {}, reread, decoded or {})
        if report.ok and level == "deep" and model is not None:
            _check_adapter(report, model)
    except OSError as exc:  # a directory that cannot be listed, a file that vanished while we looked
        report.problems.append(Problem(exc.filename or ".", f"cannot be read ({exc.strerror})"))
    report.seconds = time.perf_counter() - start
    return report


def _check_structure(report: VerifyReport) -> None:
    root = report.path
    if not root.is_dir() or root.is_symlink():
        report.problems.append(Problem(".", "not a directory"))
        return
    try:
        report.manifest = manifest = read_manifest(root)
    except ManifestError as exc:
        report.problems.append(Problem(MANIFEST_NAME, exc.reason))
        return
    check_listing(report, manifest, _walk(root, report), "file")


def _check_file(report: VerifyReport, level: str) -> None:
    """A checkpoint file (format/ckpt_file.py): the archive's index, its manifest record, every record listed
    with its size (quick), and each record's bytes against its hash (full and deep: nothing is unpickled)."""
    with open(report.path, "rb") as fh:
        try:
            archive = ckpt_file.read_archive(fh)
            if archive.manifest is None:
                name = ckpt_file.manifest_record_name(archive.prefix)
                report.problems.append(Problem(name, UNVERIFIABLE_FILE))
                return
            try:
                report.manifest = manifest = parse_manifest(ckpt_file.read_manifest_bytes(fh, archive))
            except ckpt_file.ArchiveError:
                raise
            except ManifestError as exc:
                report.problems.append(Problem(archive.manifest.name, exc.reason))
                return
            check_listing(report, manifest, archive.sizes(), "record")
            for record in archive.records if report.ok and level != "quick" else ():
                digest = ckpt_file.hash_span(fh, record.start, record.end)
                report.bytes_read += record.size
                report.problems += _digest_problems(record.name, manifest.files[record.name], record.size, digest)
        except ckpt_file.ArchiveError as exc:
            report.problems.append(Problem(exc.record, exc.reason))


def check_listing(report: VerifyReport, manifest: Manifest, present: dict[str, int], kind: str) -> None:
    """Every file the manifest lists is `present` (relpath -> size) with its size, and nothing else is."""
    for relpath in sorted(set(present) - set(manifest.files)):
        report.problems.append(Problem(relpath, f"unexpected {kind} (not in the manifest)"))
    for relpath, entry in sorted(manifest.files.items()):
        if relpath not in present:
            report.problems.append(Problem(relpath, "missing (listed in the manifest)"))
        elif present[relpath] != entry.size:
            report.problems.append(Problem(relpath, size_mismatch(present[relpath], entry)))


def _walk(root: Path, report: VerifyReport) -> dict[str, int]:
    """Every regular file under root (relative POSIX path -> size); links and specials are problems."""
    sizes: dict[str, int] = {}
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                rel = Path(entry.path).relative_to(root).as_posix()
                if entry.is_symlink():
                    report.problems.append(Problem(rel, "is a symbolic link (never followed)"))
                elif entry.is_dir():
                    stack.append(Path(entry.path))
                elif not entry.is_file():
                    report.problems.append(Problem(rel, "is not a regular file"))
                elif rel != MANIFEST_NAME:
                    sizes[rel] = entry.stat().st_size
    return sizes


def read_verified(path: Path, entry: FileEntry) -> bytes:
    """Read a file whole and check its size and hash; raises ManifestError naming the mismatch."""
    with open(path, "rb") as fh:
        data = fh.read(entry.size + 1)
    if len(data) != entry.size:
        raise ManifestError(size_mismatch(len(data), entry))
    digest = xxhash.xxh3_128_hexdigest(data)
    if digest != entry.xxh3_128:
        raise ManifestError(hash_mismatch(digest, entry))
    return data


def check_written(
    root: Path,
    files: Mapping[str, FileEntry],
    *,
    level: str,
    step: int,
    observed: Mapping[str, tuple[int, str]] | None = None,
    refused: Mapping[str, str] | None = None,
) -> VerificationError | None:
    """Re-read the files a rank just wrote under `root` and compare each with the entry it recorded while writing.

    Every rank runs this on its own files before the ranks agree on the save (nothing at the quick
    level), so a checkpoint's bytes are re-read by as many readers as wrote them, not by the
    committing rank alone. `observed`: (size, xxh3-128) of files the writer already read back after
    closing them (while they were being fsynced), compared without reading them again; `refused`: why
    restore would refuse files the writer decoded (DCP's metadata). Returns the error to agree on,
    naming the first file that differs.
    """
    if level == "quick":
        return None
    seen = observed or {}

    def check(relpath: str, entry: FileEntry) -> tuple[int, list[Problem]]:
        if relpath in seen:
            return seen[relpath][0], _digest_problems(relpath, entry, *seen[relpath])
        return _hash_problems(root, relpath, entry)

    try:
        problems = [p for _, found in _largest_first(files, check) for p in found]
        problems += [Problem(relpath, why) for relpath, why in sorted((refused or {}).items())]
    except OSError as exc:
        return from_os_error(VerificationError, "could not re-read a file just written", exc, step=step)
    if not problems:
        return None
    return VerificationError(
        f"failed {level} verification right after writing ({problems[0]}); nothing was committed",
        path=root / problems[0].file,
        step=step,
    )


def _hash_problems(root: Path, relpath: str, entry: FileEntry) -> tuple[int, list[Problem]]:
    """(bytes read, problems) for a file checked by size and hash alone; OSError propagates."""
    size, digest = hash_file(root / relpath)
    return size, _digest_problems(relpath, entry, size, digest)


def _digest_problems(relpath: str, entry: FileEntry, size: int, digest: str) -> list[Problem]:
    if size != entry.size:
        return [Problem(relpath, size_mismatch(size, entry))]
    if digest != entry.xxh3_128:
        return [Problem(relpath, hash_mismatch(digest, entry))]
    return []


def _parsed(relpath: str, deep: bool) -> bool:
    """Whether a full check parses this file (small JSON always; at the deep level everything it can)."""
    return relpath in (STATE_FILE, dcp_metadata.METADATA_PATH) or (deep and relpath.endswith((".json", ".safetensors")))


def _check_one(
    report: VerifyReport, relpath: str, entry: FileEntry, deep: bool, expected: Any, decoded: Any
) -> tuple[int, list]:
    """(bytes read, problems) for one file; small JSON and every file at the deep level are parsed too."""
    path = report.path / relpath
    try:
        if not _parsed(relpath, deep):
            return _hash_problems(report.path, relpath, entry)
        data = read_verified(path, entry)
    except ManifestError as exc:
        return 0, [Problem(relpath, exc.reason)]
    except OSError as exc:
        return 0, [Problem(relpath, f"cannot be read ({exc.strerror})")]
    return len(data), _parse_problems(report, relpath, data, entry, expected, decoded)


def _parse_problems(
    report: VerifyReport, relpath: str, data: bytes, entry: FileEntry, expected: Any, decoded: Any
) -> list[Problem]:
    if relpath == dcp_metadata.METADATA_PATH and report.manifest is not None:
        try:
            metadata = decoded if decoded is not None else dcp_metadata.decode(data)
            dcp_metadata.check_storage(metadata, report.manifest)
        except ManifestError as exc:
            return [Problem(relpath, exc.detail)]
        return []
    if relpath.endswith(".json"):
        try:
            doc = parse_json(data, relpath)
        except ManifestError as exc:
            return [Problem(relpath, exc.reason)]
        return _step_problems(report, relpath, doc)
    if not relpath.endswith(".safetensors"):
        return []
    try:
        tensors = parse_tensors(data, relpath)
    except CorruptCheckpointError as exc:
        return [Problem(relpath, exc.message.removeprefix(f"{relpath} "))]
    if len(tensors) != entry.tensors:
        return [Problem(relpath, f"holds {len(tensors)} tensors, manifest says {entry.tensors}")]
    if expected is None:
        return []
    return compare_tensors(relpath, tensors, expected)


def _step_problems(report: VerifyReport, relpath: str, doc: Any) -> list[Problem]:
    """The step is stored three times (directory name, manifest, trainer state): all three must agree."""
    if relpath != STATE_FILE or report.manifest is None:
        return []
    step = doc.get("step") if isinstance(doc, dict) else None
    if step != report.manifest.step or isinstance(step, bool):
        return [Problem(relpath, f"records step {step!r}, but the manifest says step {report.manifest.step}")]
    return []


def compare_tensors(
    relpath: str, loaded: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> list[Problem]:
    """Bitwise comparison of what is on disk with what was in memory."""
    if set(loaded) != set(expected):
        missing = sorted(set(expected) - set(loaded))[:3]
        extra = sorted(set(loaded) - set(expected))[:3]
        return [Problem(relpath, f"tensor names differ from memory (missing {missing}, unexpected {extra})")]
    for key, want in expected.items():
        got = loaded[key]
        want = want.detach().cpu()
        if got.dtype != want.dtype or got.shape != want.shape:
            return [
                Problem(
                    relpath,
                    f"tensor {key!r} is {got.dtype}{list(got.shape)}, memory has {want.dtype}{list(want.shape)}",
                )
            ]
        if not torch.equal(got.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)):
            return [Problem(relpath, f"tensor {key!r} differs from memory")]
    return []


def _check_contents(
    report: VerifyReport,
    deep: bool,
    expected: Mapping[str, Any],
    reread: frozenset[str],
    decoded: Mapping[str, Any],
) -> None:
    manifest = report.manifest
    assert manifest is not None
    unread = {path: entry for path, entry in manifest.files.items() if path not in reread or _parsed(path, deep)}

    def check(relpath: str, entry: FileEntry) -> tuple[int, list[Problem]]:
        return _check_one(report, relpath, entry, deep, expected.get(relpath), decoded.get(relpath))

    for nbytes, problems in _largest_first(unread, check):
        report.bytes_read += nbytes
        report.problems.extend(problems)


def _largest_first(
    files: Mapping[str, FileEntry], check: Callable[[str, FileEntry], tuple[int, list[Problem]]]
) -> list[tuple[int, list[Problem]]]:
    """`check` on every file, four at a time, the largest first (so the last to finish is a small one)."""
    items = sorted(files.items(), key=lambda kv: -kv[1].size)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda kv: check(*kv), items))


def _check_adapter(report: VerifyReport, model: Any) -> None:
    path = report.path / ADAPTER_WEIGHTS
    if not path.exists():
        report.problems.append(Problem(ADAPTER_WEIGHTS, "missing: the model is a PEFT model"))
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    report.problems.extend(Problem(ADAPTER_WEIGHTS, p) for p in adapter_key_problems(shapes, model))
