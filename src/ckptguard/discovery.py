"""Which checkpoints exist in a run directory, and which of them can be trusted.

Discovery reads manifests and stats files (the ``quick`` level); it never trusts a name alone, and
never follows LATEST blindly. The newest checkpoint is the valid one with the highest save
*sequence* (recorded in each manifest), not the highest step: after an explicit resume from an
older step, the run's later saves are newer than any step left over from the abandoned timeline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ckptguard.errors import CheckpointNotFoundError
from ckptguard.layout import checkpoint_name, lightning_name, set_aside_kind, step_from_name
from ckptguard.manifest import Manifest
from ckptguard.verify import verify_checkpoint

log = logging.getLogger("ckptguard")


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """One checkpoint as discovery sees it, wherever it lives: valid or why not, and what its manifest says.

    Retention, ``ls`` and resume order work on these fields alone, for directories and buckets alike.
    """

    name: str
    step: int
    valid: bool
    reason: str | None = None
    bytes: int = 0
    sequence: int = -1
    created: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def facts(manifest: Manifest | None) -> dict[str, Any]:
        """Size, save sequence, time and metrics from a manifest, as keyword arguments (none without one)."""
        if manifest is None:
            return {}
        m = manifest
        return {"bytes": m.total_bytes, "sequence": m.sequence, "created": m.created, "metrics": dict(m.metrics)}


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo(Checkpoint):
    """One ``checkpoint-{step}`` directory as discovery sees it."""

    path: Path
    keep_reasons: tuple[str, ...] = ()


C = TypeVar("C", bound=Checkpoint)


def discover(run_dir: Path) -> list[CheckpointInfo]:
    """Every ``checkpoint-{step}`` directory under `run_dir`, quick-verified, in step order.

    Also every directory Lightning named (``*.ckpt``, saved by VerifiedCheckpointIO), with the step its
    manifest records (-1 when it has no readable manifest), so ``ls``, ``report`` and the save sequence
    see a ModelCheckpoint directory's checkpoints too."""
    found = []
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        step = step_from_name(entry.name)
        if step is None and not (lightning_name(entry.name) and entry.is_dir(follow_symlinks=False)):
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
        kind = set_aside_kind(entry.name)
        if kind is not None and entry.is_dir(follow_symlinks=False):
            found.append(SetAside(entry.name, Path(entry.path), *kind))
    return found


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


def newest_first(checkpoints: Sequence[C]) -> list[C]:
    """Valid checkpoints, most recently saved first (the highest save sequence: see the module docstring)."""
    return sorted((c for c in checkpoints if c.valid), key=lambda c: (c.sequence, c.step), reverse=True)
