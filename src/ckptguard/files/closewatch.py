"""Hash each file another library writes into staging as soon as it is closed, while it writes the next.

An integration's commit used to start only when the library's save returned: fsync every file, then
hash every byte. Most libraries write several files one after another (weights, then optimizer
state), so the first ones sit finished in the page cache while the later ones are serialized. A
:class:`CloseWatch` hears each close-after-write (Linux inotify) and right away fsyncs that file and
hashes it, side by side on two worker threads; the commit then waits for the last file closed.

An early hash is used only if it is certain to describe the file as the commit finds it: no write,
rename or deletion of that file was reported after the close it was taken for (inotify reports
each one before the writing call returns, so by the time the library's save has returned, every
event is in the queue), and its size, inode and modification time are as they were when hashing
began. Anything else (a file written by another host on a shared filesystem, a dropped event
queue, no inotify) is hashed by the commit as before: the watch can only save time, never decide
what a checkpoint holds.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ckptguard.files.durable import WRITEBACK_EVERY, advance_writeback
from ckptguard.files.hashing import hash_file

try:  # Linux only; elsewhere every file is hashed at commit, as the watch only ever saves time
    from inotify_simple import INotify
    from inotify_simple import flags as F
except ImportError:  # pragma: no cover - not Linux
    INotify = None  # type: ignore[assignment,misc]

log = logging.getLogger("ckptguard")

WORKERS = 2  # a closed file's fsync (waits on the disk) and its hash (reads the page cache) run side by side


@dataclass(frozen=True)
class EarlyHash:
    """A file's size and xxh3-128, and the (size, inode, mtime) it had when hashing began."""

    identity: tuple[int, int, int]
    size: int
    digest: str


def identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_size, st.st_ino, st.st_mtime_ns


class CloseWatch:
    """Watches `root` (and directories created under it) from construction until :meth:`finish`."""

    _MASK = (F.MODIFY | F.CLOSE_WRITE | F.MOVED_FROM | F.MOVED_TO | F.CREATE | F.DELETE) if INotify else 0

    def __init__(self, root: Path) -> None:
        self._inotify = self._open()
        self._dirs: dict[int, Path] = {}
        self._generation: dict[Path, int] = {}  # bumped by every event that may change a file
        self._pending: dict[Path, tuple[int, Future[None], Future[EarlyHash]]] = {}  # generation, fsync, hash
        self._closes: dict[Path, int] = {}  # closes-after-write heard per file
        self._written_back: dict[Path, int] = {}  # bytes of a file being written whose writeback was started
        self._heard = threading.Condition()  # notified after each event is acted on
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ckptguard-early-hash")
        # finish() wakes the reader through this pipe: a poll timeout would hold every commit up to it
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        if self._inotify is not None and self._watch(root):
            self._thread = threading.Thread(target=self._run, name="ckptguard-closewatch", daemon=True)
            self._thread.start()

    @staticmethod
    def _open() -> INotify | None:
        if INotify is None:
            return None
        try:
            return INotify(nonblocking=True)
        except OSError as exc:  # out of inotify instances, say
            log.debug("no inotify (%s): hashing at commit", exc)
            return None

    def _watch(self, directory: Path) -> bool:
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(directory, self._MASK)
        except OSError as exc:
            log.debug("no inotify watch on %s (%s): hashing at commit", directory, exc)
            return False
        self._dirs[wd] = directory
        return True

    def _run(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not any(fd == self._wake_r for fd, _ in poller.poll()):
            self._drain()

    def _drain(self) -> None:
        """Act on every queued event."""
        assert self._inotify is not None
        for event in self._inotify.read(timeout=0):
            self._event(event.wd, event.mask, event.name)

    def _event(self, wd: int, mask: int, name: str) -> None:
        with self._heard:
            self._act(wd, mask, name)
            self._heard.notify_all()

    def _act(self, wd: int, mask: int, name: str) -> None:
        if mask & F.Q_OVERFLOW:  # events were lost: no early hash can be trusted
            self._generation = {path: gen + 1 for path, gen in self._generation.items()}
            self._pending.clear()
            return
        if wd not in self._dirs or not name:
            return
        path = self._dirs[wd] / name
        if mask & F.ISDIR:
            if mask & F.CREATE:
                self._watch(path)
            return
        generation = self._generation.get(path, 0) + 1
        self._generation[path] = generation
        if mask & F.MODIFY:
            self._start_writeback(path)
        if mask & F.CLOSE_WRITE:
            synced = self._pool.submit(_fsync_closed, path)
            self._pending[path] = (generation, synced, self._pool.submit(_hash_closed, path))
            self._closes[path] = self._closes.get(path, 0) + 1

    def _start_writeback(self, path: Path) -> None:
        """Start the disk on what the library wrote so far, every WRITEBACK_EVERY bytes, so that the fsync at
        its close (what the commit waits for, for the last file) finds little left to write."""
        try:
            size = os.stat(path).st_size
        except OSError:
            return
        started = self._written_back.get(path, 0)
        if size - started < WRITEBACK_EVERY:  # not due yet: the file is not even opened
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            self._written_back[path] = advance_writeback(fd, started, size)
        finally:
            os.close(fd)

    def wait_heard(self, path: Path, closes: int = 0, timeout: float = 60.0) -> bool:
        """Block until the watch watches the directory `path` (`closes` 0) or heard `closes` closes of the
        file `path` and took the early hash of the last; False if that did not happen within `timeout`.

        For tests and benches that must order their own steps after what the watch observed."""
        with self._heard:
            if closes == 0:
                return self._heard.wait_for(lambda: path in self._dirs.values(), timeout)
            if not self._heard.wait_for(lambda: self._closes.get(path, 0) >= closes, timeout):
                return False
            futures = self._pending[path][1:] if path in self._pending else ()
        wait(futures, timeout)
        return True

    def finish(self) -> dict[Path, tuple[int, str]]:
        """Stop watching; (size, xxh3-128) of each file fsynced and hashed early whose hash is certain to
        describe it now (an unchanged file is still covered by its fsync). A failed early fsync is raised.

        Call once the library's save returned (all its events are queued by then).
        """
        self._stop_reader()
        if self._inotify is not None:
            self._drain()
        self._close_fds()
        done: dict[Path, tuple[int, str]] = {}
        for path, (generation, synced, hashed) in self._pending.items():
            try:
                synced.result()
                early = hashed.result()
                unchanged = generation == self._generation.get(path) and identity(path) == early.identity
            except EarlyFsyncError:
                self._pool.shutdown(wait=True, cancel_futures=True)
                raise
            except OSError:
                continue
            if unchanged:
                done[path] = (early.size, early.digest)
        self._pool.shutdown(wait=True)
        return done

    def abandon(self) -> None:
        """Stop watching and drop everything (the save failed)."""
        self._stop_reader()
        self._close_fds()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _stop_reader(self) -> None:
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None

    def _close_fds(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        if self._wake_w >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1


class EarlyFsyncError(OSError):
    """The early fsync of a closed file failed: the commit must fail with it, not fsync again and pass
    (Linux reports a writeback error to one fsync only, so a second one may succeed over lost data)."""


def _fsync_closed(path: Path) -> None:
    """fsync `path` (while another worker hashes it): the commit does not sync it again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # gone or replaced: the commit finds that out and syncs what it adopts
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        raise EarlyFsyncError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        os.close(fd)


def _hash_closed(path: Path) -> EarlyHash:
    """Hash `path`, noting what it looked like before: the commit does not read it again."""
    before = identity(path)
    size, digest = hash_file(path)
    return EarlyHash(before, size, digest)
