"""Faster write and verify loops, prototyped outside ckptguard to size what changing it would gain.

Each writer writes every tensor of a state, back to back, into one file (like the raw baseline)
and returns its xxh3-128; each reader re-reads a file and returns its xxh3-128. profile_save.py
times them against ckptguard's current loops on the same bytes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import xxhash

from baselines import tensor_bytes
from workloads import Workload

CHUNK = 8 << 20  # ckptguard's chunk
WRITEBACK_EVERY = 64 << 20
SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _views(w: Workload) -> Iterator[memoryview]:
    for t in w.flat.values():
        data = tensor_bytes(t)
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _open_new(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def write_hash_inline(w: Workload, path: Path) -> str:
    """ckptguard's loop today: write a chunk, hash the same chunk, next; then fsync."""
    hasher, fd = xxhash.xxh3_128(), _open_new(path)
    try:
        for view in _views(w):
            _write_all(fd, view)
            hasher.update(view)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hasher.hexdigest()


def _hash_thread(w: Workload) -> tuple[threading.Thread, list[str]]:
    """Hash the state's bytes on a second thread; xxhash and os.write both release the GIL."""
    out: list[str] = []

    def run() -> None:
        hasher = xxhash.xxh3_128()
        for view in _views(w):
            hasher.update(view)
        out.append(hasher.hexdigest())

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def write_hash_parallel(w: Workload, path: Path, early_writeback: bool = False) -> str:
    """Hash on a second thread while this one writes; optionally start writeback every 64 MiB
    (sync_file_range WRITE, non-blocking) so the final fsync finds little left to flush."""
    thread, digest = _hash_thread(w)
    fd = _open_new(path)
    try:
        written = flushed = 0
        for view in _views(w):
            _write_all(fd, view)
            written += len(view)
            if early_writeback and written - flushed >= WRITEBACK_EVERY:
                _libc.sync_file_range(
                    fd, ctypes.c_int64(flushed), ctypes.c_int64(written - flushed), SYNC_FILE_RANGE_WRITE
                )
                flushed = written
        os.fsync(fd)
    finally:
        os.close(fd)
        thread.join()
    return digest[0]


def read_hash_inline(path: Path) -> str:
    """ckptguard's verify loop today: readinto a buffer, hash it, next."""
    hasher, view = xxhash.xxh3_128(), memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            hasher.update(view[:n])
    return hasher.hexdigest()


def read_hash_pipelined(path: Path, depth: int = 3) -> str:
    """One thread reads into a ring of buffers while this one hashes the previous ones."""
    free: queue.Queue[memoryview] = queue.Queue()
    full: queue.Queue[tuple[memoryview, int]] = queue.Queue()
    for _ in range(depth):
        free.put(memoryview(bytearray(CHUNK)))

    def reader() -> None:
        with open(path, "rb", buffering=0) as fh:
            while True:
                buf = free.get()
                n = fh.readinto(buf)
                full.put((buf, n))
                if not n:
                    return

    thread = threading.Thread(target=reader)
    thread.start()
    hasher = xxhash.xxh3_128()
    while (item := full.get())[1]:
        hasher.update(item[0][: item[1]])
        free.put(item[0])
    thread.join()
    return hasher.hexdigest()


def read_hash_mmap(path: Path, window: int = 32 << 20) -> str:
    """Hash the page cache in place through 32 MiB mmap windows: no copy into a user buffer.

    Mapped file pages count in RSS, so the window bounds what verification adds to peak memory.
    """
    hasher = xxhash.xxh3_128()
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as fh:
        for off in range(0, size, window):
            length = min(window, size - off)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            with mmap.mmap(fh.fileno(), length, flags=flags, prot=mmap.PROT_READ, offset=off) as m:
                view = memoryview(m)
                hasher.update(view)
                view.release()
    return hasher.hexdigest()


def drop_file_cache(path: Path) -> None:
    """Evict one file's clean pages, so the next read comes from the device (a true read-back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
