"""Hash each file another library writes into staging as soon as it is closed, while it writes the next.

An integration's commit used to start only when the library's save returned: fsync every file, then
hash every byte. Most libraries write several files one after another (weights, then optimizer
state), so the first ones sit finished in the page cache while the later ones are serialized. A
:class:`CloseWatch` hears each close-after-write (Linux inotify), starts that file's writeback and
hashes it on a worker thread right away; the commit then fsyncs (little left to write) and hashes
only what was closed last.

An early hash is used only if it is certain to describe the file as the commit finds it: no write,
rename or deletion of that file was reported after the close it was taken for (inotify reports
each one before the writing call returns, so by the time the library's save has returned, every
event is in the queue), and its size, inode and modification time are as they were when hashing
began. Anything else (a file written by another host on a shared filesystem, a dropped event
queue, no inotify) is hashed by the commit as before: the watch can only save time, never decide
what a checkpoint holds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ckptguard.hashing import hash_file
from ckptguard.writer import start_writeback

log = logging.getLogger("ckptguard")

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_Q_OVERFLOW, _IN_ISDIR = 0x100, 0x200, 0x4000, 0x40000000
_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length; the name follows
HASHERS = 2


@dataclass(frozen=True)
class EarlyHash:
    """A file's size and xxh3-128, and the (size, inode, mtime) it had when hashing began."""

    identity: tuple[int, int, int]
    size: int
    digest: str


def identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_size, st.st_ino, st.st_mtime_ns


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch  # noqa: B018 (present on Linux only)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class CloseWatch:
    """Watches `root` (and directories created under it) from construction until :meth:`finish`."""

    def __init__(self, root: Path) -> None:
        self._fd = _LIBC.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC) if _LIBC is not None else -1
        self._dirs: dict[int, Path] = {}
        self._generation: dict[Path, int] = {}  # bumped by every event that may change a file
        self._pending: dict[Path, tuple[int, Future[EarlyHash]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=HASHERS, thread_name_prefix="ckptguard-early-hash")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._fd >= 0 and self._watch(root):
            self._thread = threading.Thread(target=self._run, name="ckptguard-closewatch", daemon=True)
            self._thread.start()

    def _watch(self, directory: Path) -> bool:
        wd = _LIBC.inotify_add_watch(self._fd, os.fsencode(directory), _MASK) if _LIBC is not None else -1
        if wd < 0:
            log.debug("no inotify watch on %s (errno %d): hashing at commit", directory, ctypes.get_errno())
            return False
        self._dirs[wd] = directory
        return True

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(20):
                self._drain()

    def _drain(self) -> None:
        """Read every queued event and act on it."""
        while True:
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(buf):
                wd, mask, _, length = _EVENT.unpack_from(buf, offset)
                name = buf[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                self._event(wd, mask, name)

    def _event(self, wd: int, mask: int, name: bytes) -> None:
        if mask & _IN_Q_OVERFLOW:  # events were lost: no early hash can be trusted
            self._generation = {path: gen + 1 for path, gen in self._generation.items()}
            self._pending.clear()
            return
        if wd not in self._dirs or not name:
            return
        path = self._dirs[wd] / os.fsdecode(name)
        if mask & _IN_ISDIR:
            if mask & _IN_CREATE:
                self._watch(path)
            return
        generation = self._generation.get(path, 0) + 1
        self._generation[path] = generation
        if mask & _IN_CLOSE_WRITE:
            self._pending[path] = (generation, self._pool.submit(_hash_closed, path))

    def finish(self) -> dict[Path, tuple[int, str]]:
        """Stop watching; (size, xxh3-128) of each file whose early hash is certain to describe it now.

        Call once the library's save returned (all its events are queued by then).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._drain()
        self._close_fd()
        done: dict[Path, tuple[int, str]] = {}
        for path, (generation, future) in self._pending.items():
            try:
                early = future.result()
                unchanged = generation == self._generation.get(path) and identity(path) == early.identity
            except OSError:
                continue
            if unchanged:
                done[path] = (early.size, early.digest)
        self._pool.shutdown(wait=True)
        return done

    def abandon(self) -> None:
        """Stop watching and drop everything (the save failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._close_fd()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _hash_closed(path: Path) -> EarlyHash:
    """Start writing `path` back to disk and hash it, noting what it looked like before reading."""
    before = identity(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start_writeback(fd, 0, 0)  # 0, 0: the whole file
    finally:
        os.close(fd)
    size, digest = hash_file(path)
    return EarlyHash(before, size, digest)
