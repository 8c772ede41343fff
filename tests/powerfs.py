"""A FUSE filesystem that forgets, at a power cut, everything that was not made durable.

Model (the POSIX minimum, on purpose stricter than ext4's default ``data=ordered`` mode):

* A file's data written since its last ``fsync``/``fdatasync`` is volatile. ``fsync`` of the file
  makes its current content (and size) durable, nothing else: not its name.
* Every namespace change is volatile until ``fsync`` of the directory it happened in: create,
  mkdir, unlink, rmdir, and rename (which changes two directories: both must be fsynced for the
  old name to be gone *and* the new one there). ``fsync`` of a directory makes its current list
  of entries durable, nothing else: not the files' data, not its own entry in its parent.
* At a power cut (``cut``) every volatile change is discarded at once; after the "reboot" (the
  next mount) only the durable state is served.
* Unless the cut asks for some ``writeback``: a real kernel writes dirty data back on its own, so
  any part of the volatile state may have reached the disk, in no particular order. With
  ``cut(writeback=p)`` each inode of the live tree has, with probability p, its volatile state
  made durable first: a directory its whole entry list, a file all of its new content or only
  its first pages (a torn file). p=0 is the strictest case; p>0 finds code that depends
  on something *not* having reached the disk (a directory entry whose file data did not).

ext4 would, in its default mode, persist much of what a program never synced (a journal commit
every 5 s, rename-over-an-existing-file heuristics). Real software passes on ext4 and loses data
elsewhere (XFS, network filesystems, power loss at the wrong moment); a test filesystem that keeps
only what POSIX promises is what tells a missing ``fsync`` from luck. Not modelled: permission
bits and times (kept, but not subject to power loss), hard links and symlinks (refused), extended
attributes, and a directory made reachable twice by a rename whose source directory was never
synced (it is served as two copies).

Layout: the durable state is a plain directory tree, the *backing directory*, read at mount.
While mounted, every inode holds its live state (what programs see) and its durable state (what
the last fsync made durable) in memory. ``cut`` writes the durable tree back to the backing
directory; a clean unmount writes the live tree (what a clean shutdown syncs). Either way the
backing directory is always a readable, plain copy of what survived.

It runs in its own process (``python powerfs.py serve BACKING MOUNTPOINT``), controlled through
its stdin; tests mount, cut and unmount it through the kit in powerkit.py.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096  # a torn file keeps its new content up to a page boundary


@dataclass(eq=False)
class Node:
    """One inode: its live state and the state its last fsync made durable."""

    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)  # files: live content
    durable_data: bytes = b""  # files: content as of the last fsync
    entries: dict[str, Node] = field(default_factory=dict)  # directories: live entries
    durable_entries: dict[str, Node] = field(default_factory=dict)  # directories: as of the last fsync
    times: tuple[int, int] = field(default_factory=lambda: (time.time_ns(), time.time_ns()))  # atime, mtime
    lost: bytes | None = None  # files: content whose writeback failed (its pages count as clean since)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def dirty(self) -> bool:
        """Whether it holds changes that are not durable."""
        return self.entries != self.durable_entries if self.is_dir else self.data != self.durable_data

    def sync(self) -> None:
        """fsync: the live content (file) or entry list (directory) becomes the durable one.

        Not content whose writeback failed, as in Linux: the failed fsync reported the error, the pages
        were marked clean, and a later fsync succeeds without writing them (until they are written again).
        """
        if self.is_dir:
            self.durable_entries = dict(self.entries)
        elif self.data != self.lost:
            self.durable_data = bytes(self.data)

    def write_back(self, rng: random.Random) -> None:
        """What the kernel may have written on its own: all of it, or (a file) only its first pages."""
        if not self.is_dir and self.data == self.lost:
            return  # its writeback failed already
        if self.is_dir or rng.random() < 0.5:
            self.sync()
        else:  # torn: the first pages are new, the rest as it was
            upto = rng.randrange(0, len(self.data) + 1, PAGE)
            self.durable_data = bytes(self.data[:upto]) + self.durable_data[upto:]


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _operation(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a FUSE operation under the filesystem's lock; after a cut every operation fails with EIO."""

    @functools.wraps(method)
    def guarded(self: PowerCutFS, *args: Any) -> Any:
        with self.mutex:
            if self.frozen:
                raise _fail(errno.EIO)
            return method(self, *args)

    return guarded


class PowerCutFS:
    """The FUSE operations (mfusepy's path-based high-level API) over an in-memory inode tree."""

    use_ns = True  # times as integer nanoseconds

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self.mutex = threading.Lock()  # not `lock`: that name is the FUSE lock operation
        self.frozen = False  # set by cut: the power is off, nothing more reaches the disk
        self._inos = itertools.count(1)
        self._handles: dict[int, Node] = {}
        self._fhs = itertools.count(1)
        self.failing_fsyncs: set[str] = set()  # file names whose next fsync fails with EIO (a writeback error)
        self.root = self._load(backing)

    # -- image in and out ---------------------------------------------------------------------

    def _load(self, path: Path) -> Node:
        """Read a backing tree: everything in it is durable."""
        st = path.stat()
        node = Node(next(self._inos), st.st_mode, times=(st.st_atime_ns, st.st_mtime_ns))
        if node.is_dir:
            node.entries = {entry.name: self._load(path / entry.name) for entry in os.scandir(path)}
        else:
            node.data = bytearray(path.read_bytes())
        node.sync()
        return node

    def store(self, *, durable: bool) -> None:
        """Replace the backing tree by the durable (power cut) or live (clean unmount) state."""
        fresh = self.backing.with_name(self.backing.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        _write_tree(self.root, fresh, durable=durable, ancestors=())
        shutil.rmtree(self.backing)
        fresh.rename(self.backing)

    def cut(self, writeback: float, seed: int) -> None:
        """Power cut: stop every operation now and keep only what was durable (or written back)."""
        with self.mutex:
            self.frozen = True
            rng = random.Random(seed)
            for node in _live_tree(self.root):
                if node.dirty and rng.random() < writeback:
                    node.write_back(rng)
            self.store(durable=True)

    # -- lookups ------------------------------------------------------------------------------

    def _find(self, path: str) -> Node:
        node = self.root
        for name in filter(None, path.split("/")):
            if not node.is_dir:
                raise _fail(errno.ENOTDIR)
            if name not in node.entries:
                raise _fail(errno.ENOENT)
            node = node.entries[name]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._find(head)
        if not parent.is_dir:
            raise _fail(errno.ENOTDIR)
        return parent, name

    def _node(self, path: str | None, fh: int | None) -> Node:
        return self._handles[fh] if fh else self._find(path or "/")

    def _handle(self, node: Node) -> int:
        fh = next(self._fhs)
        self._handles[fh] = node
        return fh

    def _add(self, path: str, mode: int) -> Node:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise _fail(errno.EEXIST)
        node = Node(next(self._inos), mode)
        parent.entries[name] = node
        parent.times = (parent.times[0], time.time_ns())
        return node

    # -- operations ---------------------------------------------------------------------------

    def init(self, path: str) -> None:
        print("ready", flush=True)  # the kernel has answered: the mount is live

    def destroy(self, path: str) -> None:
        if not self.frozen:
            self.store(durable=False)  # a clean unmount syncs everything, as umount does

    @_operation
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        node = self._node(path, fh)
        subdirs = sum(1 for child in node.entries.values() if child.is_dir)
        return {
            "st_mode": node.mode,
            "st_ino": node.ino,
            "st_nlink": 2 + subdirs if node.is_dir else 1,
            "st_size": 4096 if node.is_dir else len(node.data),
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
            "st_atime": node.times[0],
            "st_mtime": node.times[1],
            "st_ctime": node.times[1],
        }

    @_operation
    def access(self, path: str, amode: int) -> int:
        self._find(path)
        return 0

    @_operation
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.backing)
        return {key: getattr(st, key) for key in dir(st) if key.startswith("f_") and key != "f_fsid"}

    @_operation
    def opendir(self, path: str) -> int:
        node = self._find(path)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        return self._handle(node)

    @_operation
    def readdir(self, path: str | None, fh: int) -> list[str]:
        return [".", "..", *self._node(path, fh).entries]

    @_operation
    def releasedir(self, path: str | None, fh: int) -> int:
        self._handles.pop(fh, None)
        return 0

    @_operation
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self._node(path, fh).sync()
        return 0

    @_operation
    def mkdir(self, path: str, mode: int) -> int:
        self._add(path, stat.S_IFDIR | (mode & 0o7777))
        return 0

    @_operation
    def create(self, path: str, mode: int, flags: int) -> int:
        return self._handle(self._add(path, stat.S_IFREG | (mode & 0o7777)))

    @_operation
    def open(self, path: str, flags: int) -> int:
        node = self._find(path)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        return self._handle(node)

    @_operation
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return bytes(self._node(path, fh).data[offset : offset + size])

    @_operation
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        node = self._node(path, fh)
        if offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset : offset + len(data)] = data
        node.times = (node.times[0], time.time_ns())
        return len(data)

    @_operation
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        node = self._node(path, fh)
        del node.data[length:]
        node.data.extend(bytes(length - len(node.data)))
        return 0

    @_operation
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        node = self._node(path, fh)
        name = os.path.basename(path or "")
        if name in self.failing_fsyncs and node.dirty:
            self.failing_fsyncs.discard(name)
            node.lost = bytes(node.data)
            raise _fail(errno.EIO)
        node.sync()
        return 0

    @_operation
    def flush(self, path: str | None, fh: int) -> int:
        return 0  # close() is not a sync

    @_operation
    def release(self, path: str | None, fh: int) -> int:
        self._handles.pop(fh, None)
        return 0

    @_operation
    def unlink(self, path: str) -> int:
        parent, name = self._parent(path)
        if self._find(path).is_dir:
            raise _fail(errno.EISDIR)
        del parent.entries[name]
        return 0

    @_operation
    def rmdir(self, path: str) -> int:
        parent, name = self._parent(path)
        node = self._find(path)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        if node.entries:
            raise _fail(errno.ENOTEMPTY)
        del parent.entries[name]
        return 0

    @_operation
    def rename(self, old: str, new: str) -> int:
        old_parent, old_name = self._parent(old)
        new_parent, new_name = self._parent(new)
        node = self._find(old)
        if node.is_dir and (new + "/").startswith(old.rstrip("/") + "/"):
            raise _fail(errno.EINVAL)  # into its own subtree
        replaced = new_parent.entries.get(new_name)
        if replaced is not None and replaced is not node:
            if replaced.is_dir != node.is_dir:
                raise _fail(errno.EISDIR if replaced.is_dir else errno.ENOTDIR)
            if replaced.is_dir and replaced.entries:
                raise _fail(errno.ENOTEMPTY)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node
        return 0

    @_operation
    def chmod(self, path: str | None, mode: int) -> int:
        node = self._find(path or "/")
        node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        return 0

    @_operation
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self._find(path or "/")  # ownership is not modelled: every file belongs to the mounting user
        return 0

    @_operation
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        node = self._find(path or "/")
        node.times = times if times is not None else (time.time_ns(), time.time_ns())
        return 0


def _live_tree(node: Node) -> Iterator[Node]:
    yield node
    for child in node.entries.values():
        yield from _live_tree(child)


def _write_tree(node: Node, path: Path, *, durable: bool, ancestors: tuple[Node, ...]) -> None:
    """Write `node` (durable or live state) as a plain tree at `path`."""
    if not node.is_dir:
        path.write_bytes(node.durable_data if durable else node.data)
    else:
        path.mkdir()
        entries = node.durable_entries if durable else node.entries
        for name, child in entries.items():
            if child not in ancestors:  # a cycle only synced halves of two renames can make
                _write_tree(child, path / name, durable=durable, ancestors=(*ancestors, node))
    os.chmod(path, stat.S_IMODE(node.mode))
    os.utime(path, ns=node.times)


def serve(backing: Path, mountpoint: Path) -> None:
    """Mount over `mountpoint` until unmounted; the line ``cut WRITEBACK SEED`` on stdin cuts the power,
    ``fail-fsync NAME`` makes the next fsync of a file named NAME with unsynced data fail (EIO)."""
    import mfusepy

    fs = PowerCutFS(backing)

    def control() -> None:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "cut":
                fs.cut(float(args[0]), int(args[1]))
                print("cut", flush=True)
            elif command == "fail-fsync":
                with fs.mutex:
                    fs.failing_fsyncs.add(args[0])
                print("armed", flush=True)
        # stdin closed: whoever mounted us is gone; do not leave the mount behind
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)

    threading.Thread(target=control, daemon=True).start()
    options = {"attr_timeout": 0, "entry_timeout": 0, "negative_timeout": 0, "hard_remove": True}
    mfusepy.FUSE(fs, str(mountpoint), foreground=True, nothreads=True, fsname="powerfs", **options)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: powerfs.py serve BACKING MOUNTPOINT")
