"""Can a run save here? Answered before the first training step, with a real write, not `os.access`.

``os.access`` says yes to root on a directory with mode 555, and says nothing about a read-only
mount, a full disk or a quota. The probe creates a file and a directory, writes, fsyncs, renames and
reads back, which is exactly what a save does; any failure is a NotWritableError with the errno.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ckptguard.catalog.discovery import CheckpointInfo, discover
from ckptguard.catalog.retention import RetentionPolicy
from ckptguard.commit.publish import clean_leftovers
from ckptguard.dist import Coordinator
from ckptguard.errors import (
    CheckpointError,
    InsufficientSpaceError,
    LockedError,
    NotWritableError,
    PreflightError,
    from_os_error,
)
from ckptguard.files.durable import fsync_dir, write_all
from ckptguard.files.events import EventLog
from ckptguard.format.layout import (
    LOCK_NAME,
    MANIFEST_NAME,
    OWNER_NAME,
    PROBE_PREFIX,
    STAGING_PREFIX,
    TRASH_PREFIX,
    entry_path,
)
from ckptguard.units import format_bytes

log = logging.getLogger("ckptguard")
_VOLATILE_FS = {"tmpfs", "ramfs"}
_NETWORK_FS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "fuse.sshfs",
    "lustre",
    "gpfs",
    "beegfs",
    "fuse.gcsfuse",
    "fuse",
}


def prepare(
    run_dir: Path,
    lock: RunLock,
    *,
    create_parents: bool,
    expected_bytes: int | None,
    policy: RetentionPolicy,
    events: EventLog,
) -> list[CheckpointInfo]:
    """Everything that must hold before step 1, in this order; the lock is released again on failure.

    Crash leftovers (staging, trash, probes) are removed and logged; returns what discovery found.
    """
    start = time.perf_counter()
    prepare_run_dir(run_dir, create_parents=create_parents)
    probe_writable(run_dir)
    lock.acquire()
    try:
        removed = clean_leftovers(run_dir) + remove_stale_probes(run_dir)
        found = discover(run_dir)
        if expected_bytes is not None:
            check_space_for_run(run_dir, expected_bytes, policy.slots, sum(c.bytes for c in found if c.valid))
    except CheckpointError:
        lock.release()
        raise
    if removed:
        log.warning("removed %d unfinished save(s) left by a crash in %s: %s", len(removed), run_dir, removed)
        events.emit("cleanup", removed=removed)
    elapsed = time.perf_counter() - start
    events.emit("preflight", seconds=elapsed, checkpoints=len(found), policy=asdict(policy))
    return found


def prepare_run_dir(run_dir: Path, *, create_parents: bool = False) -> Path:
    """Make sure `run_dir` exists as a directory; a missing parent is an error unless asked otherwise.

    A typo in a mount path (``/mnt/dta/run``) would otherwise silently write to the root disk.
    """
    run_dir = run_dir.absolute()
    refuse_inside_checkpoint(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotWritableError(
            "the run directory path is a file, not a directory",
            path=run_dir,
            errno=errno.ENOTDIR,
            remedy="Choose another output directory, or move the file away.",
        )
    if not run_dir.parent.is_dir() and not create_parents:
        existing = next(p for p in run_dir.parents if p.exists())
        missing = existing / run_dir.relative_to(existing).parts[0]
        raise NotWritableError(
            f"the parent directory {missing} does not exist",
            path=run_dir,
            errno=errno.ENOENT,
            remedy="Create it (mkdir -p), fix a typo in the path, or pass create_parents=True.",
        )
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        for directory in reversed(missing):  # outermost first; each mkdir is durable once its parent is fsynced
            directory.mkdir(exist_ok=True)
            fsync_dir(directory.parent)
    except OSError as exc:
        raise from_os_error(NotWritableError, "cannot create the run directory", exc, path=run_dir) from exc
    return run_dir


def refuse_inside_checkpoint(run_dir: Path) -> None:
    """A run directory inside a checkpoint would add files to it (lock, probe, events) and so invalidate it."""
    for path in (run_dir, *run_dir.parents):
        if (path / MANIFEST_NAME).is_file() or path.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            raise PreflightError(
                f"{run_dir} is {'' if path == run_dir else 'inside '}the checkpoint directory {path}; "
                "using it as a run directory would add files to that checkpoint and invalidate it",
                path=run_dir,
                remedy=f"Use the run directory that holds the checkpoint ({path.parent}) or a new directory.",
            )


# The longest names a save creates: directories such as ``checkpoint-<20 digits>.unfinished-<time>-<id>``
# (under 64 characters) and files ``state/rank<r>/<entry, up to 64>.safetensors`` inside staging.
_LONGEST_DIR_NAME = 64
_LONGEST_FILE = (entry_path("p" * 64, rank=99999) + ".safetensors").split("/")


def probe_writable(run_dir: Path) -> None:
    """Do what a save does on a tiny scale: mkdir, create, write, fsync, rename, read back, remove.

    The probe uses names as long as a save's longest, so a run directory whose path leaves no room
    for them (ENAMETOOLONG) fails here, not at the first save.
    """
    name = f"{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}-"
    probe_dir = run_dir / name.ljust(_LONGEST_DIR_NAME, "p")
    payload = secrets.token_bytes(4096)
    try:
        probe_dir.mkdir()
        try:
            path = probe_dir.joinpath(*_LONGEST_FILE)
            path.parent.mkdir(parents=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            renamed = path.with_name("renamed")
            os.rename(path, renamed)
            fsync_dir(path.parent)
            if renamed.read_bytes() != payload:
                raise NotWritableError(
                    "data written to the run directory reads back different",
                    path=run_dir,
                    remedy="The filesystem corrupts data: check the device (dmesg) and use another disk.",
                )
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)
    except OSError as exc:
        raise from_os_error(NotWritableError, "cannot write files in the run directory", exc, path=run_dir) from exc


def probe_every_rank(run_dir: Path, coord: Coordinator) -> None:
    """The write probe on every rank but the first (which probed in :func:`prepare`), then the shared check.

    Every rank writes into rank 0's staging directory, so every rank must see rank 0's run
    directory: ranks on node-local disks would each commit a different part of a checkpoint.
    All ranks raise alike.
    """
    if coord.world_size == 1:
        return
    error = None
    if not coord.is_primary:
        try:
            probe_writable(run_dir)
        except CheckpointError as exc:
            error = exc
    coord.agree(error, None)
    marker = coord.on_primary(lambda: _shared_marker(run_dir))
    seen = coord.agree(None, (run_dir / marker).is_dir())
    if coord.is_primary:  # every rank has looked: all_gather returns only once all contributed
        with contextlib.suppress(OSError):
            (run_dir / marker).rmdir()
    blind = [str(rank) for rank, found in enumerate(seen) if not found]
    if blind:
        raise PreflightError(
            f"rank {', '.join(blind)} cannot see the run directory rank 0 writes to: {marker}, which rank 0 "
            "created there, is missing on that rank (a node-local disk at the same path)",
            path=run_dir,
            remedy="Put the run directory on a filesystem every node mounts at this path (NFS, Lustre, a shared "
            "volume); node-local disks cannot hold one checkpoint written by several nodes.",
        )


def _shared_marker(run_dir: Path) -> str:
    """A directory with a fresh name in the run directory (a probe's name, so a leftover is cleared at startup)."""
    name = f"{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}-shared-{secrets.token_hex(8)}"
    (run_dir / name).mkdir()
    fsync_dir(run_dir)
    return name


def remove_stale_probes(run_dir: Path) -> list[str]:
    """Remove probe directories left by processes of this host that died mid-probe (a kill at startup)."""
    stale = []
    prefix = f"{PROBE_PREFIX}{socket.gethostname()}-"
    for entry in run_dir.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            stale.append(entry.name)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_space(run_dir: Path, need_bytes: int, need_inodes: int, *, what: str) -> None:
    """Refuse early when free bytes or inodes are below what the next saves will need."""
    st = os.statvfs(run_dir)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise InsufficientSpaceError(
            f"{format_bytes(free)} free but {what} needs {format_bytes(need_bytes)}",
            path=run_dir,
            errno=errno.ENOSPC,
        )
    if st.f_files and st.f_favail < need_inodes:
        raise InsufficientSpaceError(
            f"{st.f_favail} free inodes but {what} needs {need_inodes} files",
            path=run_dir,
            errno=errno.ENOSPC,
            remedy="Free inodes (delete small files), lower keep_last, or use another filesystem.",
        )


def check_space_for_run(run_dir: Path, per_checkpoint: int, slots: int | None, existing_bytes: int) -> None:
    """Room for every checkpoint retention will hold (`slots`; None: unbounded, check 1) plus one in flight.

    Checkpoints already on disk occupy their share, so only the remainder must be free.
    """
    held = slots or 1
    need = per_checkpoint * (held + 1) - min(existing_bytes, per_checkpoint * held)
    check_space(run_dir, need, 16 * (held + 1), what=f"{held} retained checkpoint(s) plus one in flight")


def check_space_for_save(
    run_dir: Path, nbytes: int, inodes: int, *, step: int, run_window: tuple[int | None, int] | None = None
) -> None:
    """Room for the save of `step`; with `run_window` = (retention slots, bytes already held), also room
    for every checkpoint retention will hold (a run without a size hint learns its size at the first save).
    """
    if run_window is not None:
        check_space_for_run(run_dir, nbytes, *run_window)
    check_space(run_dir, nbytes, inodes, what=f"the save of step {step}")


@dataclass(frozen=True)
class FilesystemFacts:
    """What doctor reports about the filesystem under a path."""

    mount_point: str
    fstype: str
    free_bytes: int
    total_bytes: int
    free_inodes: int
    total_inodes: int  # 0 where the filesystem has no inode limit (its free count is 0 too)
    read_only: bool

    @property
    def warnings(self) -> list[str]:
        notes = []
        if self.fstype in _VOLATILE_FS:
            notes.append(f"{self.fstype} is in memory: checkpoints vanish on reboot or node loss")
        if self.fstype in _NETWORK_FS or self.fstype.startswith("fuse."):
            notes.append(f"{self.fstype} is a network/FUSE filesystem: rename and fsync may be weaker")
        return notes


def filesystem_facts(path: Path) -> FilesystemFacts:
    """Mount point and type from /proc/mounts (longest matching prefix), sizes from statvfs."""
    path = path.absolute()
    mount_point, fstype = "/", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(mount_point):
                    mount_point, fstype = point, fields[2]
    except OSError:
        pass
    st = os.statvfs(path)
    return FilesystemFacts(
        mount_point=mount_point,
        fstype=fstype,
        free_bytes=st.f_bavail * st.f_frsize,
        total_bytes=st.f_blocks * st.f_frsize,
        free_inodes=st.f_favail,
        total_inodes=st.f_files,
        read_only=bool(st.f_flag & os.ST_RDONLY),
    )


class RunLock:
    """One writer per run directory (advisory flock through filelock), with the holder's identity.

    The lock file itself is left alone by filelock; who holds it is written beside it so the second
    writer's error can say which process and host to stop.

    A run's lock lives in the run directory, or, for a Lightning dirpath, in a directory of its own
    beside it (`run_dir` is then that one); `other` is where the other kind of opener would lock the same
    checkpoints. Each takes its own lock first, then finds whether the other is held, so of two writers
    opening one directory the two ways, at least one sees the other.
    """

    def __init__(self, run_dir: Path, other: Path | None = None) -> None:
        self.run_dir = run_dir
        self.other = other
        self._lock = FileLock(str(run_dir / LOCK_NAME), timeout=0, thread_local=False)

    def acquire(self) -> None:
        try:
            self.run_dir.mkdir(exist_ok=True)  # a directory of the run's own files, beside it, is made here
            self._lock.acquire()
        except Timeout:
            holder = self.holder()
            if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()} "):
                raise LockedError(
                    f"another CheckpointManager in this process holds the run directory lock ({holder})",
                    path=self.run_dir / LOCK_NAME,
                    remedy="close() the other manager first, or share one manager per run directory.",
                ) from None
            raise LockedError(
                f"another process holds the run directory lock ({holder})", path=self.run_dir / LOCK_NAME
            ) from None
        except OSError as exc:
            raise from_os_error(NotWritableError, "cannot create the lock file", exc, path=self.run_dir) from exc
        if self.other is not None and RunLock(self.other).held_elsewhere():
            self._lock.release()
            raise LockedError(
                f"another process holds the run directory lock ({RunLock(self.other).holder()})",
                path=self.other / LOCK_NAME,
            )
        owner = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        with contextlib.suppress(OSError):  # identity is a courtesy; the lock is what matters
            (self.run_dir / OWNER_NAME).write_text(owner, encoding="utf-8")

    def holder(self) -> str:
        try:
            return (self.run_dir / OWNER_NAME).read_text(encoding="utf-8").strip() or "holder unknown"
        except OSError:
            return "holder unknown"

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def held_elsewhere(self) -> bool:
        """Whether a writer holds the lock now, found without creating or changing any file (for doctor)."""
        try:
            fd = os.open(self.run_dir / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return False  # no lock file: no writer has used this directory
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's own flock, if it took one
        return False
