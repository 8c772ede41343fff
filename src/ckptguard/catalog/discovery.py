"""Which checkpoints exist in a run directory, and which of them can be trusted.

Discovery reads manifests and stats files (the ``quick`` level); it never trusts a name alone, and
never follows LATEST blindly; which one is newest is :func:`ckptguard.catalog.checkpoint.newest_first`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ckptguard.catalog.checkpoint import Checkpoint, newest_first
from ckptguard.catalog.verify import verify_checkpoint
from ckptguard.errors import CheckpointNotFoundError
from ckptguard.format.layout import checkpoint_name, library_named, set_aside_kind, step_from_name
from ckptguard.format.manifest import ManifestError, read_manifest

log = logging.getLogger("ckptguard")


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo(Checkpoint):
    """One ``checkpoint-{step}`` directory as discovery sees it."""

    path: Path
    keep_reasons: tuple[str, ...] = ()


def discover(run_dir: Path) -> list[CheckpointInfo]:
    """Every ``checkpoint-{step}`` directory under `run_dir`, quick-verified, in step order.

    Also every checkpoint another library named, with the step its manifest records (-1 when it has none):
    Lightning's ``*.ckpt`` (a checkpoint file when VerifiedCheckpointIO saved it; a plain Lightning file is
    listed, invalid) and Accelerate's ``checkpoint_{iteration}`` directories, so ``ls``, ``report``,
    retention and the save sequence see them too; never a link to one."""
    found = []
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        step = step_from_name(entry.name)
        if step is None and not (library_named(entry.name) and not entry.is_symlink()):
            continue
        report = verify_checkpoint(entry.path, "quick")
        if step is None:
            step = report.manifest.step if report.manifest is not None and report.manifest.step is not None else -1
        found.append(
            CheckpointInfo(
                name=entry.name, path=Path(entry.path), step=step, valid=report.ok, reason=report.reason,
                **Checkpoint.facts(report.manifest),
            )
        )  # fmt: skip
    return sorted(found, key=lambda c: c.step)


@dataclass(frozen=True)
class SetAside:
    """A directory a save moved out of a checkpoint's name: never loaded, kept until pruned on purpose.

    `kind`: "superseded" (an older directory of the same name, replaced by a newer save), "corrupt"
    (failed verification right after writing) or "unfinished" (LATEST could not follow the commit).
    """

    name: str
    path: Path
    step: int
    kind: str


def set_aside(run_dir: Path) -> list[SetAside]:
    """Every set-aside directory under `run_dir`, in name order."""
    try:
        entries = sorted(os.scandir(run_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        aside = set_aside_kind(entry.name)
        if aside is not None and entry.is_dir(follow_symlinks=False):
            step = step_from_name(aside[0])
            if step is None:  # checkpoint_{iteration}: the number is Accelerate's save counter, not the step
                step = _manifest_step(Path(entry.path))
            found.append(SetAside(entry.name, Path(entry.path), step, aside[1]))
    return found


def _manifest_step(path: Path) -> int:
    """The step `path`'s manifest records, or -1 without a readable one."""
    try:
        step = read_manifest(path).step
    except ManifestError:
        return -1
    return -1 if step is None else step


def restore_candidates(run_dir: Path, step: int | None, path: str | os.PathLike[str] | None) -> list[str]:
    """What restore should try, in order: the named checkpoint alone, or every valid one, newest first."""
    if path is not None or step is not None:
        target = Path(path).absolute() if path is not None else run_dir / checkpoint_name(step or 0)
        if not target.is_dir():
            have = [c.step for c in discover(run_dir) if c.valid]
            raise CheckpointNotFoundError(
                f"no checkpoint directory at the requested {'path' if path else 'step'} "
                f"(valid steps here: {have or 'none'})",
                path=target,
                step=step,
            )
        return [str(target)]
    found = discover(run_dir)
    for c in found:
        if not c.valid:
            log.warning("ignoring invalid checkpoint %s: %s", c.path, c.reason)
    return [str(c.path) for c in newest_first(found)]
