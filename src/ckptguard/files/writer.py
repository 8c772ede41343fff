"""Stream files into a staging directory: large writes straight from tensor memory, xxh3-128 on the
same bytes, fsync before returning.

Tensor files are streamed in the safetensors format (header from :mod:`ckptguard.format.tensorfile`) rather
than through ``safetensors.torch.save_file``, because that function first builds every tensor as a
separate ``bytes`` copy and offers no hook to hash while writing; streaming from the tensor's own
memory keeps the blocking path free of a full extra copy of the state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ckptguard.files.durable import advance_writeback, fsync_file, write_all
from ckptguard.files.hashing import BackgroundHasher, hash_file
from ckptguard.format.manifest import FileEntry
from ckptguard.format.tensorfile import safetensors_header

CHUNK = 8 << 20  # large enough for full disk bandwidth, small enough to hash while still in cache
MAX_PARALLEL_FILES = 4


@dataclass
class FilePlan:
    """One file to write: either tensors (safetensors format) or raw bytes (JSON)."""

    relpath: str
    tensors: dict[str, torch.Tensor] | None = None
    data: bytes | None = None

    @property
    def nbytes(self) -> int:
        if self.data is not None:
            return len(self.data)
        return sum(t.numel() * t.element_size() for t in (self.tensors or {}).values()) + 1024


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (a copy only if it is on a device or not contiguous)."""
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def _write_stream(path: Path, chunks: Iterable[memoryview | bytes]) -> tuple[int, str]:
    """Write chunks to a new file, hashing the same bytes on a second thread, and fsync it.

    Returns (size, xxh3-128).
    """
    hasher = BackgroundHasher()
    size = started = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), CHUNK):
                    piece = view[start : start + CHUNK]
                    write_all(fd, piece)
                    hasher.add(piece)
                    size += len(piece)
                    started = advance_writeback(fd, started, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return size, hasher.hexdigest()
    finally:
        hasher.close()


def write_file(staging: Path, plan: FilePlan) -> FileEntry:
    """Write one planned file under `staging`; OSError propagates with its errno for the caller."""
    path = staging / plan.relpath
    try:
        for parent in reversed(PurePosixPath(plan.relpath).parents[:-1]):
            # one level at a time, never the staging directory itself: a rank still writing when the save
            # failed elsewhere and rank 0 discarded staging gets ENOENT instead of making it again
            (staging / parent).mkdir(exist_ok=True)
        return _write_plan(path, plan)
    except OSError as exc:
        if exc.filename is None:  # os.write/fsync errors carry no path; the user needs it
            exc.filename = str(path)
        raise


def _write_plan(path: Path, plan: FilePlan) -> FileEntry:
    chunks, tensors = file_chunks(plan)
    size, digest = _write_stream(path, chunks)
    return FileEntry(size=size, xxh3_128=digest, tensors=tensors)


def file_chunks(plan: FilePlan) -> tuple[Iterable[memoryview | bytes], int]:
    """The bytes of a planned file, in order, lazily (one device tensor on the host at a time), and its tensor count.

    The same bytes go to a local file here and to an object in direct-to-remote saving.
    """
    if plan.tensors is None:
        return [plan.data or b""], 0
    header, order = safetensors_header(plan.tensors)
    tensors = plan.tensors

    def chunks() -> Iterable[memoryview | bytes]:
        yield header
        for key in order:
            yield _tensor_bytes(tensors[key])

    return chunks(), len(order)


def write_files(staging: Path, plans: list[FilePlan]) -> dict[str, FileEntry]:
    """Write every planned file, several at once; the first failure is raised after all stop."""
    if len(plans) <= 1:
        return {p.relpath: write_file(staging, p) for p in plans}
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_FILES, len(plans))) as pool:
        futures = {p.relpath: pool.submit(write_file, staging, p) for p in plans}
        return {relpath: future.result() for relpath, future in futures.items()}


def adopt_files(staging: Path, done: Mapping[Path, tuple[int, str]] | None = None) -> dict[str, FileEntry]:
    """Manifest entries for files another library wrote into `staging` (``save_pretrained``), made durable.

    Each file is fsynced and hashed as it is now on disk, so from here on it is published, verified
    and loaded exactly like a file this module wrote; `done` gives (size, xxh3-128) of files already
    fsynced and hashed as they are now (:mod:`ckptguard.files.closewatch`), which are neither
    synced nor read again. Links
    and special files are refused: a checkpoint holds regular files only.
    """
    files: list[Path] = []
    for path in sorted(staging.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            relpath = path.relative_to(staging).as_posix()
            raise ValueError(f"{relpath} in {staging} is a link or a special file; a checkpoint holds regular files")
        if not path.is_dir():
            files.append(path)
    with ThreadPoolExecutor(max_workers=MAX_PARALLEL_FILES) as pool:  # fsync and hash several files at once
        adopted = list(pool.map(lambda path: _adopt_file(path, (done or {}).get(path)), files))
    return {path.relative_to(staging).as_posix(): entry for path, entry in zip(files, adopted, strict=True)}


def _adopt_file(path: Path, done: tuple[int, str] | None) -> FileEntry:
    if done is None:
        fsync_file(path)
        done = hash_file(path)
    size, digest = done
    return FileEntry(size=size, xxh3_128=digest, tensors=_tensor_count(path))


def _tensor_count(path: Path) -> int:
    if path.suffix != ".safetensors":
        return 0
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        return len(list(fh.keys()))
