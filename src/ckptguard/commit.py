"""The commit protocol: the only module that creates, renames or removes checkpoint directories.

    staging (``.staging-checkpoint-{step}-{nonce}``) --fsync--> rename to ``checkpoint-{step}``
    --fsync run dir--> LATEST replaced atomically.

A directory is a checkpoint only after the rename, and the rename happens only after every file and
the manifest are fsynced, so a crash at any instant leaves either the old set of checkpoints or the
new one, plus at most one staging directory that is never loaded and is removed at the next start.
An existing ``checkpoint-{step}`` is never overwritten in place: it is renamed aside first.
Deletion renames to ``.trash-*`` first, so a crash mid-delete cannot leave a half-deleted
directory under a checkpoint name.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

from ckptguard.durable import atomic_write_bytes, fsync_dir
from ckptguard.manifest import MANIFEST_NAME, Manifest, checkpoint_name

log = logging.getLogger("ckptguard")

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LATEST_NAME = "LATEST"
SUPERSEDED_MARK = ".superseded-"


def create_staging(run_dir: Path, name: str) -> Path:
    """A fresh staging directory inside `run_dir` (same filesystem, so the final rename is atomic)."""
    staging = run_dir / f"{STAGING_PREFIX}{name}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def write_manifest(staging: Path, manifest: Manifest) -> None:
    """Write MANIFEST.json last and fsync it and every directory in staging."""
    fd = os.open(staging / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, manifest.to_json_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    for directory in sorted({(staging / p).parent for p in manifest.files}, reverse=True):
        fsync_dir(directory)
    fsync_dir(staging)


def finalize(staging: Path, target: Path) -> Path | None:
    """Rename `staging` to `target` atomically; an existing `target` is first renamed aside.

    Returns the superseded path, if any, so the caller can log it.
    """
    superseded = None
    if target.exists() or target.is_symlink():
        superseded = target.with_name(f"{target.name}{SUPERSEDED_MARK}{time.strftime('%Y%m%dT%H%M%S')}")
        while superseded.exists():
            superseded = superseded.with_name(superseded.name + "x")
        os.rename(target, superseded)
        log.warning("renamed existing %s aside to %s before committing a new one", target, superseded.name)
    os.rename(staging, target)
    fsync_dir(target.parent)
    return superseded


def commit_checkpoint(staging: Path, run_dir: Path, manifest: Manifest) -> tuple[Path, Path | None]:
    """Manifest, then rename into place as ``checkpoint-{step}``. Returns (path, superseded)."""
    write_manifest(staging, manifest)
    target = run_dir / checkpoint_name(manifest.step if manifest.step is not None else 0)
    return target, finalize(staging, target)


def write_latest(run_dir: Path, name: str) -> None:
    """Point LATEST at `name` (temp file, fsync, rename, fsync dir)."""
    atomic_write_bytes(run_dir / LATEST_NAME, f"{name}\n".encode())


def read_latest(run_dir: Path) -> str | None:
    """The name LATEST points at, or None if it is missing or not a plain checkpoint name."""
    try:
        text = (run_dir / LATEST_NAME).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    return text if text and "/" not in text and not text.startswith(".") else None


def remove(path: Path) -> None:
    """Delete a checkpoint directory: rename to ``.trash-*`` (atomic), then free the space in the background.

    Freeing gigabytes takes most of a second on some filesystems; the rename alone is what makes the
    checkpoint gone, so the save that triggered retention does not wait for the rest. A trash
    directory left by an exit is removed at the next start (:func:`clean_leftovers`).
    """
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True).start()


def quarantine(path: Path, why: str) -> Path:
    """Move a committed checkpoint whose save failed after the rename out of the ``checkpoint-*`` namespace.

    `why` ("corrupt": failed verification; "unfinished": LATEST could not follow) becomes part of the
    name. Kept, not deleted, so it can be examined; discovery never picks it up again.
    """
    moved = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}")
    os.rename(path, moved)
    fsync_dir(path.parent)
    return moved


def discard_staging(staging: Path) -> None:
    """Remove a staging directory after a failed save; never raises (the save's error matters more)."""
    shutil.rmtree(staging, ignore_errors=True)


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove staging and trash directories left by a crash; returns their names for the log."""
    removed = []
    for entry in sorted(os.scandir(run_dir), key=lambda e: e.name):
        if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
        elif entry.name.startswith(f".{LATEST_NAME}.tmp-"):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed
