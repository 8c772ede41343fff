"""What the trainer tells the user when it ends: the closing summary, or why there was nothing to do.

Kept apart from the recipe so the loop reads as training; each function is a pure function of the
run's progress, its config and what the checkpoint manager lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptguard.train.config import RunConfig

if TYPE_CHECKING:  # no torch at import: the CLI says why it stopped even when torch never loaded
    from ckptguard import CheckpointInfo, CheckpointManager, SaveResult


@dataclass
class Progress:
    """What the summary reports about this invocation (a resumed run counts from its resume step)."""

    start_step: int = 0
    step: int = 0
    train_loss: float = math.nan
    first_eval: tuple[int, float] | None = None
    last_eval: tuple[int, float] | None = None
    save_seconds: float = 0.0
    skipped: int = 0  # steps whose update was not applied (train.on_nonfinite = "skip")
    saves: list[SaveResult] = field(default_factory=list)


def summary(p: Progress, outcome: str, wall: float, mgr: CheckpointManager, cfg: RunConfig, eval_on: bool) -> str:
    """The closing report: steps, losses, checkpoints, time spent saving, where the adapter is."""
    kept = [c.name for c in mgr.list() if c.valid]
    final = mgr.latest()
    resumed = f" (resumed at step {p.start_step})" if p.start_step else ""
    evals = " -> ".join(f"{loss:.4f} at step {s}" for s, loss in filter(None, (p.first_eval, p.last_eval))) or "-"
    if not eval_on:
        evals = "off (data.eval_fraction is 0 and data.eval is not set)"
    share = 100 * p.save_seconds / wall if wall > 0 else 0.0
    skipped = [f"  skipped      {p.skipped} step(s) with a non-finite loss or gradient norm"] if p.skipped else []
    return "\n".join(
        [
            f"{outcome}: step {p.step}/{cfg.train.max_steps}{resumed}, {wall:.1f} s",
            f"  train loss   {p.train_loss:.4f}",
            f"  eval loss    {evals}",
            *skipped,
            f"  checkpoints  {len(p.saves)} written and verified ({cfg.checkpoint.verify}) by this run; "
            f"{len(kept)} valid in {mgr.run_dir}",
            f"  saving       {p.save_seconds:.2f} s = {share:.1f}% of the training loop's wall time "
            f"(per save: stall {_per_save(p.saves, 'stall_seconds')}, "
            f"save to verified {_per_save(p.saves, 'seconds')})",
            f"  adapter      {final.path if final else '-'}",
        ]
    )


def _per_save(saves: list[SaveResult], field: str) -> str:
    """Mean and max of one SaveResult timing; for async saves stall and save-to-verified differ."""
    values = [getattr(s, field) for s in saves]
    return f"mean {sum(values) / len(values):.3f} s, max {max(values):.3f} s" if values else "-"


def already_finished(step: int, max_steps: int, latest: CheckpointInfo | None) -> str:
    """A rerun of a run that has reached train.max_steps: one clean line, no summary of nothing."""
    where = f" ({latest.path})" if latest is not None else ""
    return (
        f"nothing to do: the run already finished at step {step}{where}; train.max_steps is {max_steps}. "
        "Raise train.max_steps to train further"
    )


def stopped_in_start_up(by: str, step: int, latest: CheckpointInfo | None) -> str:
    """A stop signal before the first step: nothing was trained, so nothing new was saved."""
    return f"stopped by {by} during start-up, before step {step + 1}\n{resume_hint(latest)}"


def resume_hint(latest: CheckpointInfo | None) -> str:
    """The line after a stop: how to go on (exit code 75 means: run the same command again)."""
    if latest is None:
        return "nothing was saved yet; run the same command again to start"
    return f"run the same command again to resume from {latest.path} (step {latest.step})"


ABORTED = "aborted by a second SIGINT (Ctrl-C)"


def aborted_in_start_up() -> str:
    """A second Ctrl-C before this process began a step: nothing it did can be lost."""
    return f"{ABORTED} during start-up, before any step; nothing was lost: run the same command again to go on"


def aborted(step: int, max_steps: int, newest: CheckpointInfo | None) -> str:
    """A second Ctrl-C once training began: lost or not is read from the disk, not guessed from the moment.

    `step` is the step this process had reached (a step begun counts: its work is lost); `newest` is the
    newest valid checkpoint on disk once the abort's cleanup is done, the one a resume would take.
    """
    if newest is None:
        return f"error: {ABORTED} without saving; the steps trained are lost: {resume_hint(None)}"
    if step > newest.step:
        return f"error: {ABORTED} without saving; the steps after step {newest.step} are lost: {resume_hint(newest)}"
    if newest.step >= max_steps:
        final = f"{newest.path} (step {newest.step})"
        return f"{ABORTED}; nothing was lost: the run is complete, its final checkpoint is {final}"
    return f"{ABORTED}; nothing was lost: {resume_hint(newest)}"
