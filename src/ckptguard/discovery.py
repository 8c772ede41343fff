"""Which checkpoints exist in a run directory, and which of them can be trusted.

Discovery reads manifests and stats files (the ``quick`` level); it never trusts a name alone, and
never follows LATEST blindly. The newest checkpoint is the valid one with the highest save
*sequence* (recorded in each manifest), not the highest step: after an explicit resume from an
older step, the run's later saves are newer than any step left over from the abandoned timeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptguard.manifest import step_from_name
from ckptguard.verify import verify_checkpoint


@dataclass(frozen=True)
class CheckpointInfo:
    """One ``checkpoint-{step}`` directory as discovery sees it."""

    name: str
    path: Path
    step: int
    valid: bool
    reason: str | None = None
    bytes: int = 0
    sequence: int = -1
    created: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    keep_reasons: tuple[str, ...] = ()


def discover(run_dir: Path) -> list[CheckpointInfo]:
    """Every ``checkpoint-{step}`` directory under `run_dir`, quick-verified, in step order."""
    found = []
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        step = step_from_name(entry.name)
        if step is None:
            continue
        report = verify_checkpoint(entry.path, "quick")
        manifest = report.manifest
        found.append(
            CheckpointInfo(
                name=entry.name,
                path=Path(entry.path),
                step=step,
                valid=report.ok,
                reason=report.reason,
                bytes=manifest.total_bytes if manifest else 0,
                sequence=manifest.sequence if manifest else -1,
                created=manifest.created if manifest else 0.0,
                metrics=dict(manifest.metrics) if manifest else {},
            )
        )
    return sorted(found, key=lambda c: c.step)


def newest_first(checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """Valid checkpoints, most recently saved first."""
    return sorted((c for c in checkpoints if c.valid), key=lambda c: (c.sequence, c.step), reverse=True)
