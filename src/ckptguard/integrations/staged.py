"""What every integration shares around the one staged save (:class:`ckptguard.commit.sequence.StagedSave`).

    0. :func:`open_run`, before step 1 (at the latest, from the first :func:`begin`): rank 0 takes the run
       directory lock and runs the preflight (a real write probe, leftovers of killed saves removed
       under the lock); every other rank probes too. A second job on the same directory gets LockedError.
    1. :func:`begin`: a staged save in the run directory, rank 0 hashing each file the library closes
    2. every rank lets its library write into it (the library's own save, pointed there); a failure
       becomes a typed error (:func:`write_error`)
    3. :func:`finish`: the staged save agrees, adopts, commits and verifies; the run's log records it
    4. only then does rotation delete older checkpoints (:func:`rotate`)

Resume goes through :func:`newest_verified`: the newest checkpoint (by save sequence) whose every
byte matches its manifest, never a directory that merely has the highest number.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ckptguard.catalog import checkpoint, discovery, retention
from ckptguard.catalog.checkpoint import newest_first
from ckptguard.catalog.verify import UNVERIFIABLE_FILE, verify_checkpoint
from ckptguard.commit.file_publish import FileCommitter, record_files
from ckptguard.commit.publish import DirCommitter, LocalCommitter
from ckptguard.commit.sequence import StagedSave
from ckptguard.dist import Coordinator
from ckptguard.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingPathError,
    WriteError,
    from_os_error,
    remedy_for_errno,
)
from ckptguard.files.events import EventLog
from ckptguard.format.layout import checkpoint_name
from ckptguard.run import preflight
from ckptguard.run.pruning import Pruner
from ckptguard.run.run_dir import RunDir

log = logging.getLogger("ckptguard")

LEVEL = "full"  # loading and resume: re-read every byte and compare with the hash taken when it was adopted
# Right after the commit: every file was hashed by reading it back after the library wrote it (the
# library's bytes never pass through ckptguard's memory), so a second read of the same page cache
# would prove nothing the first did not; what the commit must still prove is that the published
# directory holds exactly the manifest's files at their sizes.
COMMIT_LEVEL = "quick"
_OS_CODE = re.compile(r"\(os error (\d+)\)")  # safetensors reports OS errors as text: `... (os error 28)`
# torch.save to a path writes through its C++ zip writer, which loses the OSError: a full disk reads
# `[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598` (or "PytorchStreamWriter failed ...")
_TORCH_WRITER = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos")
FULL_BELOW = 1 << 20  # free bytes under which a filesystem whose write just failed is called full


@dataclass
class _HeldRun:
    """Rank 0's opened run directory, shared by every user of it in this process (a Trainer that trains
    twice, an Accelerator that loads then saves); closed when the last one is done with it."""

    run: RunDir
    users: int = 1


_held_runs: dict[Path, _HeldRun] = {}


def open_run(coord: Coordinator, run_dir: Path, *, own_files: Path | None = None) -> bool:
    """Open `run_dir` before the first step, as CheckpointManager does (:meth:`RunDir.open`); call it on every rank.

    Rank 0 creates the directory (and its parents, as the libraries do), probes it with a real write,
    takes the run lock (LockedError while another process holds it) and removes what killed saves left;
    every other rank probes too. Returns whether this call did that (False: this process already holds
    the directory, and only counts one more user). Pair each call with :func:`close_run`. `own_files`: where
    the lock and events go instead of `run_dir` (:meth:`RunDir.open`).
    """
    key = run_dir.absolute()

    def held() -> bool:
        if key in _held_runs:
            _held_runs[key].users += 1
            return True
        return False

    if coord.on_primary(held):
        return False
    run = RunDir.open(key, coord, policy=retention.RetentionPolicy(), create_parents=True, own_files=own_files)
    if coord.is_primary:
        _held_runs[key] = _HeldRun(run)
    return True


def close_run(coord: Coordinator, run_dir: Path) -> None:
    """One user of `run_dir` is done; the last one closes the run (rank 0; a no-op elsewhere)."""
    held = _held_runs.get(run_dir.absolute()) if coord.is_primary else None
    if held is not None:
        held.users -= 1
        if held.users == 0:
            del _held_runs[run_dir.absolute()]
            held.run.close()


def ensure_open(coord: Coordinator, run_dir: Path) -> None:
    """:func:`open_run` unless this process holds `run_dir` already; then held until the process exits
    (for a library that has no end-of-run hook to close it from)."""
    if not coord.on_primary(lambda: run_dir.absolute() in _held_runs):
        open_run(coord, run_dir)


def begin(coord: Coordinator, run_dir: Path, step: int, name: str | None = None) -> StagedSave:
    """Step 1 on every rank: a staged save of `name` (``checkpoint-{step}`` by default) in `run_dir`, rank 0
    watching what the library closes. A run directory not opened yet is opened first (:func:`ensure_open`)."""
    ensure_open(coord, run_dir)
    events = EventLog(run_dir, rank=coord.rank, enabled=coord.is_primary)
    name = checkpoint_name(step) if name is None else name
    return StagedSave.begin(coord, DirCommitter(run_dir, events), name, step=step, watch=True)


def begin_file(target: Path, step: int, events: EventLog) -> StagedSave:
    """A staged save of the checkpoint file `target` that one process makes by itself (Lightning's CheckpointIO,
    on rank 0): the library writes the partial file at ``save.path``."""
    return StagedSave.alone(FileCommitter(target.parent, events, make_parent=True), target.name, step=step)


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
    save: StagedSave,
    error: CheckpointError | None,
    *,
    written: Path | None = None,
    metrics: Mapping[str, float] | None = None,
    before_publish: Callable[[], None] | None = None,
) -> Path:
    """Steps 3-4 on every rank: agree, then rank 0 adopts what the library wrote and commits it; every rank returns
    the checkpoint's path or raises the same error, and the run's log records the save or its failure.

    `written`: the directory the library filled, when it is a subdirectory of the staging directory (a library
    that appends its own ``checkpoint-N`` to the directory it is given); `before_publish` runs on rank 0
    just before the commit.
    """
    committer = save.committer
    assert isinstance(committer, LocalCommitter)
    run_dir, events, started = committer.parent, committer.events, time.monotonic()
    target = run_dir / save.name
    is_file = isinstance(committer, FileCommitter)  # a checkpoint file: its records, hashed; no LATEST
    files = None
    if is_file and error is None:
        try:
            files = record_files(save.path, save.step)
        except CheckpointError as exc:
            error = exc
    try:
        published = save.finish(
            files, error, sequence=lambda: next_sequence(run_dir), level=COMMIT_LEVEL,
            metrics=metrics, written=written, before_publish=before_publish, latest=not is_file,
        )  # fmt: skip
    except CheckpointError as exc:
        if save.coord.is_primary and events is not None:
            events.emit("save_failed", step=save.step, path=target, error=exc.summary())
        raise
    if save.coord.is_primary and events is not None:
        events.emit(
            "save", step=save.step, path=published.where, bytes=published.manifest.total_bytes,
            seconds=time.monotonic() - started,
        )  # fmt: skip
    return Path(published.where)


def next_sequence(run_dir: Path) -> int:
    """The next save sequence of the run open in `run_dir` (:meth:`RunDir.next_sequence`), so a new save is the
    newest; for a directory this process has not opened (a one-off ``trainer.save_checkpoint``), the one
    after every save found there."""
    held = _held_runs.get(run_dir.absolute())
    return held.run.next_sequence() if held is not None else checkpoint.next_sequence(discovery.discover(run_dir))


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
    policy = retention.RetentionPolicy(keep_last=keep_last, protected_counts=protected_count)
    events = EventLog(run_dir)
    pruner: Pruner[discovery.CheckpointInfo] = Pruner(DirCommitter(run_dir, events), policy, events)
    pruner.protected = set(protected)
    try:
        pruner.prune(discovery.discover(run_dir))
    except OSError as exc:
        log.warning("could not rotate old checkpoints in %s: %s", run_dir, exc)


def newest_verified(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in `run_dir` that passes full verification, or None; skipped ones are logged."""
    for c in newest_first(discovery.discover(Path(run_dir))):
        report = verify_checkpoint(c.path, LEVEL)
        if report.ok:
            return c.path
        log.warning("not resuming from %s: %s", c.path, report.reason)
    return None


def require_verified(path: str | Path) -> Path:
    """`path` if every byte of it matches its manifest; CorruptCheckpointError naming the problem otherwise.

    `path` is a checkpoint directory or a checkpoint file (a Lightning ``.ckpt``, its manifest inside). A path
    that does not exist is CheckpointNotFoundError: a typo in a resume path is not damage. A file the library
    saved without ckptguard has no manifest to check it against."""
    if not os.path.lexists(path):
        # worded as the libraries word it ("Checkpoint file not found: PATH"), so a caller matching that still does
        raise MissingPathError(f"Checkpoint file not found: {os.fspath(path)}", path=path, errno=errno.ENOENT)
    report = verify_checkpoint(Path(path), LEVEL)
    if report.problems and report.problems[0].reason == UNVERIFIABLE_FILE:
        raise CorruptCheckpointError(
            "refusing to load an unverified checkpoint: a file saved without ckptguard (no manifest in it), "
            "so nothing can show its bytes are whole",
            path=path,
            remedy="Give a checkpoint ckptguard saved; a file saved without it is loaded by the library's own "
            "loader (without ckptguard's plugin), if you trust it.",
        )
    if not report.ok:
        raise CorruptCheckpointError(f"refusing to load an unverified checkpoint ({report.reason})", path=path)
    return Path(path)
