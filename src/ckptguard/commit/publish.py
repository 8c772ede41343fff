"""The commit protocol on a filesystem: the only module that creates, renames or removes checkpoint and staging
directories. :class:`DirCommitter` is its :class:`ckptguard.commit.base.Committer`.

:func:`create_staging`, then (once the caller's files are written and fsynced) :func:`publish`: the
manifest last, the rename into place, verification, LATEST; steps 4-7 of "The local directory
commit" in docs/protocol.md, which numbers them once for every part of the code. A directory is a
checkpoint only after its rename, which happens only after every byte and the manifest are durable.
A killed save leaves at most a staging directory, never loaded, removed at the next start
(:func:`clean_leftovers`); deletion renames to ``.trash-*`` first (:func:`remove`). Every save reaches
:func:`publish` through :class:`ckptguard.commit.sequence.StagedSave` and a :class:`DirCommitter`,
and so does a download from a bucket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptguard.catalog.verify import verify_checkpoint
from ckptguard.commit.base import DeepCheck, Published
from ckptguard.errors import VerificationError, WriteError, from_os_error
from ckptguard.files import writer
from ckptguard.files.durable import atomic_write_bytes, fsync_dir, write_all
from ckptguard.files.events import EventLog
from ckptguard.files.writer import FilePlan
from ckptguard.format.layout import (
    LATEST_NAME,
    LATEST_TMP_PREFIX,
    MANIFEST_NAME,
    PARTIAL_PREFIX,
    STAGING_PREFIX,
    SUPERSEDED_MARK,
    TRASH_PREFIX,
)
from ckptguard.format.manifest import FileEntry, Manifest

log = logging.getLogger("ckptguard")


def create_staging(parent: Path, name: str) -> Path:
    """A fresh staging directory inside `parent` (same filesystem, so the final rename is atomic)."""
    staging = parent / f"{STAGING_PREFIX}{name}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def discard_staging(staging: Path) -> None:
    """Remove a staging directory after a failed save; never raises (the save's error matters more)."""
    shutil.rmtree(staging, ignore_errors=True)


@dataclass
class DirStaging:
    """One save's staging directory. `content`: what is published when a library wrote into a subdirectory."""

    name: str
    where: Path
    content: Path | None = None

    def write(self, plans: Sequence[FilePlan]) -> dict[str, FileEntry]:
        return writer.write_files(self.where, list(plans))


class LocalCommitter:
    """What the committers of a local directory share: where checkpoints go, the log, removal.

    `make_parent`: create `parent` (and its parents) at :meth:`ready`, as a library saving to a new path
    does; a run directory is made by the run's preflight instead.
    """

    def __init__(self, parent: Path, events: EventLog | None = None, *, make_parent: bool = False) -> None:
        self.parent = parent
        self.events = events
        self.make_parent = make_parent

    def ready(self) -> Path:
        """The parent directory, created first where asked; a staging place is made in it next."""
        if self.make_parent:
            self.parent.mkdir(parents=True, exist_ok=True)
        return self.parent

    def remove(self, name: str) -> None:
        remove(self.parent / name)

    def where(self, name: str) -> str:
        return str(self.parent / name)


class DirCommitter(LocalCommitter):
    """Checkpoints as directories of `parent`: a staging directory beside them, renamed into place."""

    def begin(self, name: str) -> DirStaging:
        return DirStaging(name, create_staging(self.ready(), name))

    def publish(
        self,
        staging: DirStaging,
        manifest: Manifest,
        *,
        level: str,
        deep: DeepCheck | None = None,
        reread: frozenset[str] = frozenset(),
        decoded: Mapping[str, Any] | None = None,
        latest: bool = True,
    ) -> Published:
        content = staging.content or staging.where
        try:
            return publish(
                content, self.parent / staging.name, manifest, level=level, latest=latest, events=self.events,
                expected=deep.expected if deep else None, model=deep.model if deep else None, reread=reread,
                decoded=decoded,
            )  # fmt: skip
        finally:
            if content != staging.where:  # the library's own directory was published: its parent goes
                discard_staging(staging.where)

    def discard(self, staging: DirStaging) -> None:
        discard_staging(staging.where)


def publish(
    staging: Path,
    target: Path,
    manifest: Manifest,
    *,
    level: str,
    expected: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    model: Any = None,
    latest: bool = False,
    events: EventLog | None = None,
    reread: frozenset[str] = frozenset(),
    decoded: Mapping[str, Any] | None = None,
) -> Published:
    """Steps 4-7 of docs/protocol.md for a staging directory whose files are written and fsynced.

    Raises WriteError (OS errors, with the staging directory removed when nothing was renamed yet)
    or VerificationError. `expected` and `model` feed the deep level (see :mod:`ckptguard.catalog.verify`);
    `reread` names files their writers already re-read and hashed in staging, which verification only stats;
    `decoded`, files of those a writer decoded as well (``sharded``), which verification does not decode again.
    """
    step = manifest.step
    try:
        _write_manifest(staging, manifest)
        superseded = _move_aside_existing(target)
        os.rename(staging, target)
        fsync_dir(target.parent)
    except OSError as exc:
        if staging.exists():
            discard_staging(staging)
        raise from_os_error(WriteError, "could not commit the checkpoint", exc, path=target, step=step) from exc
    if superseded is not None and events is not None:
        events.emit("superseded", step=step, path=target, moved_to=superseded)
    report = verify_checkpoint(target, level, expected=expected, model=model, reread=reread, decoded=decoded)
    if events is not None:
        events.emit(
            "verify", step=step, path=target, level=level, ok=report.ok, bytes=report.bytes_read,
            seconds=report.seconds, problems=[str(p) for p in report.problems],
        )  # fmt: skip
    if not report.ok:
        moved = quarantine(target, "corrupt")
        raise VerificationError(
            f"failed {level} verification right after writing ({report.reason}); moved aside to {moved.name}",
            path=target,
            step=step,
        )
    if latest:
        try:
            atomic_write_bytes(target.parent / LATEST_NAME, f"{target.name}\n".encode())
        except OSError as exc:
            moved = quarantine(target, "unfinished")
            raise from_os_error(
                WriteError,
                f"could not update LATEST; the new checkpoint was moved aside to {moved.name}",
                exc,
                path=target.parent,
                step=step,
            ) from exc
    return Published(target, manifest, superseded, report)


def _write_manifest(staging: Path, manifest: Manifest) -> None:
    """Write MANIFEST.json last and fsync it and every directory in staging."""
    fd = os.open(staging / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, manifest.to_json_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    for directory in sorted({(staging / p).parent for p in manifest.files}, reverse=True):
        fsync_dir(directory)
    fsync_dir(staging)


def _move_aside_existing(target: Path) -> Path | None:
    """Rename an existing `target` to ``{name}.superseded-<time>``; nothing is overwritten in place."""
    if not (target.exists() or target.is_symlink()):
        return None
    superseded = target.with_name(f"{target.name}{SUPERSEDED_MARK}{time.strftime('%Y%m%dT%H%M%S')}")
    while superseded.exists():
        superseded = superseded.with_name(superseded.name + "x")
    os.rename(target, superseded)
    log.warning("renamed existing %s aside to %s before committing a new one", target, superseded.name)
    return superseded


def quarantine(path: Path, why: str, *, source: Path | None = None) -> Path:
    """Move a save that failed out of checkpoint `path`'s name (`source`: what to move, when not `path` itself).

    `why` ("corrupt": failed verification; "unfinished": LATEST could not follow) becomes part of the
    name. Kept, not deleted, so it can be examined; discovery never picks it up again.
    """
    moved = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}")
    os.rename(source or path, moved)
    fsync_dir(path.parent)
    return moved


def read_latest(run_dir: Path) -> str | None:
    """The name LATEST points at, or None if it is missing or not a plain checkpoint name."""
    try:
        text = (run_dir / LATEST_NAME).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return text if text and "/" not in text and not text.startswith(".") else None


def remove(path: Path, *, wait: bool = False) -> None:
    """Delete a checkpoint directory (or file): rename to ``.trash-*`` (atomic), then free the space in the background.

    Freeing gigabytes takes most of a second on some filesystems; the rename alone is what makes the
    checkpoint gone, so the save that triggered retention does not wait for the rest. A trash
    directory left by an exit is removed at the next start (:func:`clean_leftovers`); the end of a run
    waits for the removals still running (:func:`wait_for_removals`). `wait`: free the space before
    returning, in the caller's thread (for a caller with no end of run to wait at).
    """
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    if wait:
        _delete(trash)
        return
    thread = threading.Thread(target=_free, args=(trash,), name=f"ckptguard-remove {path.name}", daemon=True)
    with _removals_lock:
        _removals.add(thread)
    thread.start()


_removals: set[threading.Thread] = set()  # the background removals :func:`remove` started that still run
_removals_lock = threading.Lock()


def _free(trash: Path) -> None:
    if sys.platform == "linux":  # a nice value is per thread on Linux: the kernel's work of freeing the
        # space (tens of ms per GB) then gives way to the training's threads and to the other ranks
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    try:
        _delete(trash)
    finally:
        with _removals_lock:
            _removals.discard(threading.current_thread())


def _delete(trash: Path) -> None:
    """Free a trash directory, or a trash file (a checkpoint that is one file); never raises."""
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(trash)


def wait_for_removals() -> None:
    """Return once every removal started so far has freed its space.

    For the end of a run: the caller that hands the directory back (releases its lock, tears down)
    leaves no thread behind still deleting in it, and no trash for the next start to find."""
    with _removals_lock:
        running = list(_removals)
    for thread in running:
        thread.join()


_FILE_LEFTOVERS = (LATEST_TMP_PREFIX, PARTIAL_PREFIX, TRASH_PREFIX)


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove staging and trash directories and temporary files left by a crash; returns their names.

    Only what has the shape we leave is removed (a directory for staging and trash; a file for the LATEST
    temp file, a checkpoint file's partial file, and a trashed checkpoint file); anything else that merely
    carries such a name is left alone, and nothing that cannot be removed stops the start of a run.
    """
    removed = []
    for entry in sorted(os.scandir(run_dir), key=lambda e: e.name):
        try:
            if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif entry.name.startswith(_FILE_LEFTOVERS) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
            else:
                continue
        except OSError as exc:
            log.warning("could not remove the leftover %s: %s", entry.path, exc)
            continue
        removed.append(entry.name)
    return removed
