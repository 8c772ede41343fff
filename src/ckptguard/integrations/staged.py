"""A staged save of files another library writes: the one sequence every integration follows.

    0. :func:`open_run`, before step 1 (at the latest, from the first :func:`begin`): rank 0 takes the run
       directory lock and runs the preflight (a real write probe, leftovers of killed saves removed
       under the lock); every other rank probes too. A second job on the same directory gets LockedError.
    1. :func:`begin`: rank 0 creates one staging directory in the run directory; every rank gets its path
    2. every rank lets its library write into it (the library's own save, pointed there), while rank 0
       fsyncs and hashes each file as soon as it is closed (:mod:`ckptguard.integrations.closewatch`)
    3. :func:`finish`: the ranks agree (a failure on any rank becomes the same typed error on every rank,
       and the staging directory is removed); rank 0 fsyncs and hashes what the watch did not, and
       :func:`ckptguard.publish.publish` writes the manifest, renames into place, verifies and moves LATEST
    4. only then does rotation delete older checkpoints, through :func:`ckptguard.publish.remove`

Resume goes through :func:`newest_verified`: the newest checkpoint (by save sequence) whose every
byte matches its manifest, never a directory that merely has the highest number.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ckptguard import discovery, preflight, publish, retention, writer
from ckptguard.dist import Coordinator
from ckptguard.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    WriteError,
    from_os_error,
    remedy_for_errno,
)
from ckptguard.events import EventLog
from ckptguard.integrations.closewatch import CloseWatch
from ckptguard.layout import checkpoint_name
from ckptguard.manifest import Manifest, library_versions
from ckptguard.pruning import Pruner
from ckptguard.verify import verify_checkpoint

log = logging.getLogger("ckptguard")

LEVEL = "full"  # loading and resume: re-read every byte and compare with the hash taken when it was adopted
# Right after the commit: every file was hashed by reading it back after the library wrote it (the
# library's bytes never pass through ckptguard's memory), so a second read of the same page cache
# would prove nothing the first did not; what the commit must still prove is that the published
# directory holds exactly the manifest's files at their sizes.
COMMIT_LEVEL = "quick"
_watches: dict[Path, CloseWatch] = {}  # rank 0's watch on each staging directory, from begin to commit
_OS_CODE = re.compile(r"\(os error (\d+)\)")  # safetensors reports OS errors as text: `... (os error 28)`
# torch.save to a path writes through its C++ zip writer, which loses the OSError: a full disk reads
# `[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598` (or "PytorchStreamWriter failed ...")
_TORCH_WRITER = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos")
FULL_BELOW = 1 << 20  # free bytes under which a filesystem whose write just failed is called full


@dataclass
class _HeldRun:
    """Rank 0's lock on one run directory, shared by every user of it in this process (a Trainer that
    trains twice, an Accelerator that loads then saves); released when the last one closes it."""

    lock: preflight.RunLock
    users: int = 1


_held_runs: dict[Path, _HeldRun] = {}


def open_run(coord: Coordinator, run_dir: Path) -> bool:
    """Lock `run_dir` and run the preflight before the first step, as CheckpointManager does; call it on every rank.

    Rank 0: create the directory (and its parents, as the libraries do), probe it with a real write,
    take the run lock (LockedError while another process holds it), then remove what killed saves left;
    every other rank probes too. Returns whether this call did that (False: this process already holds
    the directory, and only counts one more user). Pair each call with :func:`close_run`.
    """
    key = run_dir.absolute()

    def prepare() -> bool:
        held = _held_runs.get(key)
        if held is not None:
            held.users += 1
            return False
        lock = preflight.RunLock(key)
        events = EventLog(key)
        preflight.prepare(
            key, lock, create_parents=True, expected_bytes=None, policy=retention.RetentionPolicy(), events=events
        )
        _held_runs[key] = _HeldRun(lock)
        return True

    first = coord.on_primary(prepare)
    if first:
        try:  # each rank writes into rank 0's staging: a rank that cannot must fail now, not at step N
            preflight.probe_every_rank(key, coord)
        except CheckpointError:
            if coord.is_primary:
                _held_runs.pop(key).lock.release()
            raise
    return first


def close_run(coord: Coordinator, run_dir: Path) -> None:
    """One user of `run_dir` is done; the last one releases the run lock (rank 0; a no-op elsewhere)."""
    held = _held_runs.get(run_dir.absolute()) if coord.is_primary else None
    if held is not None:
        held.users -= 1
        if held.users == 0:
            del _held_runs[run_dir.absolute()]
            publish.wait_for_removals()
            held.lock.release()


def ensure_open(coord: Coordinator, run_dir: Path) -> None:
    """:func:`open_run` unless this process holds `run_dir` already; then held until the process exits
    (for a library that has no end-of-run hook to close it from)."""
    if not coord.on_primary(lambda: run_dir.absolute() in _held_runs):
        open_run(coord, run_dir)


def begin(coord: Coordinator, run_dir: Path, step: int) -> Path:
    """Rank 0 creates one staging directory for `step`; every rank returns the same path.

    A run directory not opened yet is opened first (:func:`ensure_open`)."""
    ensure_open(coord, run_dir)

    def create() -> str:
        try:
            staging = publish.create_staging(run_dir, checkpoint_name(step))
        except OSError as exc:
            what = "could not create the staging directory"
            raise from_os_error(WriteError, what, exc, path=run_dir, step=step) from exc
        _watches[staging] = CloseWatch(staging)
        return str(staging)

    return Path(coord.on_primary(create, step=step))


def write_error(exc: BaseException, path: Path, step: int) -> CheckpointError:
    """The typed error for a failure while a library wrote into staging (its errno kept where it has one)."""
    if isinstance(exc, CheckpointError):
        return exc
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):  # torch.save wraps the file's OSError
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        exc = cause
    if isinstance(exc, OSError):
        return from_os_error(WriteError, "could not write checkpoint file", exc, path=exc.filename or path, step=step)
    found = _OS_CODE.search(str(exc))
    code = int(found.group(1)) if found else None
    why = ""
    if code is None and _TORCH_WRITER.search(str(exc)):
        code, why = full_filesystem(path)
    return WriteError(
        f"could not write checkpoint file: {type(exc).__name__}: {str(exc)[:300]}{why}",
        path=path,
        step=step,
        errno=code,
        remedy=remedy_for_errno(code, WriteError.default_remedy),
    )


def full_filesystem(path: Path) -> tuple[int | None, str]:
    """(ENOSPC, why) when the filesystem holding `path` is out of space or inodes, else (None, "").

    For an error that lost its errno: checked right after the write failed, before staging is removed,
    so the failed save's own bytes still occupy the disk."""
    try:
        facts = preflight.filesystem_facts(next((p for p in (path, *path.parents) if p.exists()), path))
    except OSError:
        return None, ""
    if facts.free_bytes < FULL_BELOW:
        return errno.ENOSPC, f" (the filesystem holding it has {facts.free_bytes} bytes free: out of space)"
    if facts.total_inodes > 0 and facts.free_inodes == 0:
        return errno.ENOSPC, " (the filesystem holding it has no free inodes)"
    return None, ""


def finish(
    coord: Coordinator,
    staging: Path,
    target: Path,
    step: int,
    error: CheckpointError | None,
    *,
    written: Path | None = None,
    metrics: Mapping[str, float] | None = None,
    prepare: Callable[[], None] | None = None,
) -> Path:
    """Agree on every rank's outcome, then commit on rank 0; every rank returns `target` or raises the same error.

    `written`: the directory the library filled, when it is a subdirectory of `staging` (a library that
    appends its own ``checkpoint-N`` to the directory it is given); `prepare` runs on rank 0 just
    before the commit.
    """
    events = EventLog(target.parent, rank=coord.rank, enabled=coord.is_primary)
    try:
        coord.agree(error, None, step=step)
    except CheckpointError as exc:
        if coord.is_primary:
            _stop_watch(staging)
            publish.discard_staging(staging)
            events.emit("save_failed", step=step, path=target, error=exc.summary())
        raise

    def commit_here() -> str:
        return str(
            commit(
                staging, target, step, written=written, world_size=coord.world_size, metrics=metrics, prepare=prepare
            )
        )

    return Path(coord.on_primary(commit_here, step=step))


def commit(
    staging: Path,
    target: Path,
    step: int,
    *,
    written: Path | None = None,
    world_size: int = 1,
    metrics: Mapping[str, float] | None = None,
    prepare: Callable[[], None] | None = None,
) -> Path:
    """Rank 0's part of :func:`finish`, also for a library that writes on one process only: make the files in
    `written` (default: `staging`) durable, hash them and publish them as `target`. The staging directory
    is gone afterwards, whatever happened; a failure is logged and raised as a CheckpointError."""
    events = EventLog(target.parent)
    watch = _watches.pop(staging, None)
    try:
        return _commit(staging, written or staging, target, step, world_size, metrics or {}, prepare, events, watch)
    except CheckpointError as exc:
        events.emit("save_failed", step=step, path=target, error=exc.summary())
        raise
    finally:
        if watch is not None:
            watch.abandon()
        publish.discard_staging(staging)  # gone already when the written directory is staging itself


def _stop_watch(staging: Path) -> None:
    watch = _watches.pop(staging, None)
    if watch is not None:
        watch.abandon()


def _commit(
    staging: Path,
    written: Path,
    target: Path,
    step: int,
    world_size: int,
    metrics: Mapping[str, float],
    prepare: Callable[[], None] | None,
    events: EventLog,
    watch: CloseWatch | None,
) -> Path:
    started = time.monotonic()
    try:
        if prepare is not None:
            prepare()
        files = writer.adopt_files(written, watch.finish() if watch is not None else None)
        manifest = Manifest(
            step=step,
            sequence=next_sequence(target.parent),
            created=time.time(),
            world_size=world_size,
            files=files,
            metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
            versions=library_versions(),
        )
        publish.publish(written, target, manifest, level=COMMIT_LEVEL, latest=True, events=events)
    except OSError as exc:
        what = f"could not make {exc.filename} durable" if exc.filename else "could not make the written files durable"
        raise from_os_error(WriteError, what, exc, path=staging, step=step) from exc
    except ValueError as exc:  # a link or special file among the written ones
        raise WriteError(str(exc), path=staging, step=step) from exc
    events.emit("save", step=step, path=target, bytes=manifest.total_bytes, seconds=time.monotonic() - started)
    return target


def next_sequence(run_dir: Path) -> int:
    """One more than the highest save sequence in `run_dir`, so a new save is the newest."""
    return max((c.sequence for c in discovery.discover(run_dir)), default=0) + 1


def rotate(
    run_dir: Path, keep_last: int | None, protected: frozenset[str] = frozenset(), *, protected_count: bool = False
) -> None:
    """Delete the oldest valid checkpoints beyond `keep_last` (never the newest or a `protected` name).

    `protected_count`: a protected checkpoint older than the newest `keep_last` takes one of their places,
    keeping at least the newest (HF's rotation: a limit of 2 keeps the best and the newest, not three).
    Runs after a commit, on the primary rank: a failed delete is logged, never a failed save.
    """
    if keep_last is None or keep_last < 1:
        return
    try:
        found = discovery.discover(run_dir)
        if protected_count:
            valid = discovery.newest_first(found)
            older = (protected & {c.name for c in valid}) - {c.name for c in valid[:keep_last]}
            keep_last = max(keep_last - len(older), 1)
        pruner = Pruner(run_dir, retention.RetentionPolicy(keep_last=keep_last), EventLog(run_dir), primary=True)
        pruner.protected = set(protected)
        pruner.prune(found)
    except OSError as exc:
        log.warning("could not rotate old checkpoints in %s: %s", run_dir, exc)


def newest_verified(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in `run_dir` that passes full verification, or None; skipped ones are logged."""
    for c in discovery.newest_first(discovery.discover(Path(run_dir))):
        report = verify_checkpoint(c.path, LEVEL)
        if report.ok:
            return c.path
        log.warning("not resuming from %s: %s", c.path, report.reason)
    return None


def require_verified(path: str | Path) -> Path:
    """`path` if every byte of it matches its manifest; CorruptCheckpointError naming the problem otherwise.

    A path that does not exist is CheckpointNotFoundError: a typo in a resume path is not damage. A plain
    file (a checkpoint the library saved without ckptguard) has no manifest to check it against."""
    if not os.path.lexists(path):
        raise CheckpointNotFoundError(
            "no checkpoint at the path given to resume from",
            path=path,
            remedy="Check the path for a typo; `ckptguard ls RUN_DIR` lists the checkpoints there.",
        )
    if not os.path.isdir(path):
        raise CorruptCheckpointError(
            "refusing to load an unverified checkpoint: a plain file, not a checkpoint directory ckptguard "
            "committed (its files and their manifest), so nothing can show its bytes are whole",
            path=path,
            remedy="Give a checkpoint ckptguard saved; a file saved without it is loaded by the library's own "
            "loader (without ckptguard's plugin), if you trust it.",
        )
    report = verify_checkpoint(Path(path), LEVEL)
    if not report.ok:
        raise CorruptCheckpointError(f"refusing to load an unverified checkpoint ({report.reason})", path=path)
    return Path(path)
