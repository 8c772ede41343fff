"""Kit for the power-cut filesystem (powerfs.py), in the style of ``faultkit.tmpfs``.

``with power_cut_disk(where) as fs:`` mounts it at ``where/mnt`` over ``where/disk``; ``fs.cut()`` cuts the
power and unmounts; ``fs.mount()`` reboots into what was durable. Teardown always unmounts, by force
if it must. The filesystem runs in its own process, so a test process never holds the FUSE loop,
and every wait here has a timeout: a hung filesystem process is killed (which aborts the FUSE
connection, so nothing blocked on the mount waits forever) and the mount detached lazily.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import powerfs as _filesystem

REPLY_TIMEOUT_S = 30.0  # mount, cut and unmount each answer within this, or the kit kills the process


def fuse_unavailable() -> str | None:
    """Why a FUSE filesystem cannot be mounted here, or None if it can."""
    if os.geteuid() != 0:
        return "mounting a FUSE filesystem needs root here (run the suite as root, e.g. in CI)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE support in this kernel or container)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (install Debian's fuse3; `make test` does so as root)"
    try:
        import mfusepy  # noqa: F401  (loads libfuse3 through ctypes)
    except (ImportError, OSError) as exc:
        return f"the mfusepy binding cannot load libfuse3 ({exc})"
    return None


class PowerFS:
    """One mount point over one backing directory: mount, cut the power, reboot, unmount."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self._proc: subprocess.Popen[str] | None = None
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)

    def mount(self) -> Path:
        """Mount (or, after a cut, reboot into) the durable state; returns the mount point."""
        assert self._proc is None, "already mounted"
        cmd = [sys.executable, _filesystem.__file__, "serve", str(self.backing), str(self.mountpoint)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._reply() != "ready":
            self.unmount()
            raise RuntimeError(f"powerfs did not mount at {self.mountpoint}")
        return self.mountpoint

    def cut(self, writeback: float = 0.0, seed: int = 0) -> None:
        """Cut the power: discard volatile changes (but write back a `writeback` share), unmount.

        Call `mount` to reboot. `seed` picks what is written back.
        """
        assert self._proc is not None and self._proc.stdin is not None, "not mounted"
        self._proc.stdin.write(f"cut {writeback} {seed}\n")
        self._proc.stdin.flush()
        reply = self._reply()
        self.unmount()
        if reply != "cut":
            raise RuntimeError(f"powerfs at {self.mountpoint} did not cut the power (reply {reply!r})")

    def fail_next_fsync(self, name: str) -> None:
        """Make the next fsync of a file named `name` that holds unsynced data fail with EIO, as a disk's
        writeback error does: its data never reaches the disk, and a later fsync succeeds without it."""
        assert self._proc is not None and self._proc.stdin is not None, "not mounted"
        self._proc.stdin.write(f"fail-fsync {name}\n")
        self._proc.stdin.flush()
        if (reply := self._reply()) != "armed":
            raise RuntimeError(f"powerfs at {self.mountpoint} did not arm the fsync failure (reply {reply!r})")

    def unmount(self) -> None:
        """Unmount; a process that does not exit in time is killed and the mount detached lazily."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, timeout=REPLY_TIMEOUT_S)
            proc.wait(timeout=REPLY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # closing /dev/fuse aborts the connection: every waiter gets ENOTCONN, none hangs
            proc.wait(timeout=REPLY_TIMEOUT_S)
        finally:
            if _mounted(self.mountpoint):  # not os.path.ismount: a dead FUSE mount fails its stat
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=REPLY_TIMEOUT_S)

    def _reply(self) -> str:
        """The next line from the filesystem process, or '' if none comes within the timeout."""
        assert self._proc is not None and self._proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self._proc.stdout.readline().strip()), daemon=True)
        reader.start()
        reader.join(REPLY_TIMEOUT_S)
        return box[0] if box else ""


def _mounted(where: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(where) for line in mounts)


@contextlib.contextmanager
def power_cut_disk(where: Path) -> Iterator[PowerFS]:
    """A mounted power-cut filesystem at ``where/mnt`` over ``where/disk``; always unmounted on exit."""
    import pytest

    reason = fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    fs = PowerFS(where / "disk", where / "mnt")
    try:
        fs.mount()
    except RuntimeError as exc:
        pytest.skip(f"cannot mount a FUSE filesystem here ({exc})")
    try:
        yield fs
    finally:
        fs.unmount()
