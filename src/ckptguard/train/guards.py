"""What the trainer refuses, and how it says so: inputs that would otherwise train silently wrong.

Each check is a small function of plain facts that raises a :class:`ConfigError` (exit code 2) with
the field or flag, what was found, and what to do. The recipe calls them at the point where their
facts are known: the adapter's targets once the model's shapes are, the run directory before any
weights load, a step's numbers before its update is applied.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ckptguard import CheckpointInfo
from ckptguard.catalog.checkpoint import Checkpoint
from ckptguard.format.manifest import MANIFEST_NAME
from ckptguard.train.config import ConfigError, OptimConfig


class TrainingDivergedError(ConfigError):
    """A step's loss or gradient norm is not finite; its update was not applied and nothing was saved."""


def check_lora_targets(model: torch.nn.Module, targets: Iterable[str]) -> None:
    """Every ``lora.target_modules`` entry must match a module, the way PEFT matches a name list.

    PEFT takes a module whose dotted name equals the entry or ends with ``.entry``, and silently
    leaves out an entry that matches nothing: the run would train a smaller adapter than configured.
    """
    names = [name for name, _ in model.named_modules() if name]
    layers = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _adaptable(m)})
    for target in targets:
        if any(name == target or name.endswith("." + target) for name in names):
            continue
        close = difflib.get_close_matches(target.rsplit(".", 1)[-1], layers, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(
            f"lora.target_modules: {target!r} matches no module of the model; {hint}"
            f"the model's linear and embedding layers are named {', '.join(layers)}"
        )


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding))


def check_resume_path(path: Path) -> None:
    """``--resume PATH`` must name a checkpoint directory, not a run directory or a typo."""
    if (path / MANIFEST_NAME).is_file():
        return
    if not path.exists():
        found = "there is nothing at that path"
    elif not path.is_dir():
        found = "it is a file"
    else:
        found = f"it is not a checkpoint directory (no {MANIFEST_NAME})"
        if any(path.glob("checkpoint-*")):
            found += (
                f"; it holds checkpoints, so it looks like a run directory: pass one of them, or "
                f"--resume auto with checkpoint.output_dir={path}"
            )
    raise ConfigError(f"--resume {path}: {found}. `ckptguard ls RUN_DIR` lists the checkpoints of a run")


def check_fresh_start(output_dir: Path | str, found: Sequence[Checkpoint], new_timeline: bool) -> str | None:
    """``--resume none`` over checkpoints already there: refused unless ``--new-timeline`` says to mix.

    `found` holds the run directory's checkpoints and, for a run on a bucket, the bucket's. The new
    run's checkpoints would land among the old ones (a same-named one moved aside, the others
    kept and counted), so starting over there must be a choice. Returns the warning to print when it is.
    """
    valid = [c for c in found if c.valid]
    if not valid:
        return None
    listing = ", ".join(f"{c.name} (step {c.step})" for c in valid)
    what = f"checkpoint.output_dir {output_dir} already holds {len(valid)} valid checkpoint(s) of a run: {listing}"
    if new_timeline:
        return (
            f"warning: {what}; --new-timeline: starting a new run at step 0 among them (resume picks this "
            "run's newest checkpoint; a checkpoint of the same step is moved aside as .superseded-*)"
        )
    raise ConfigError(
        f"--resume none: {what}. Resume it (--resume auto), choose another checkpoint.output_dir, or pass "
        "--new-timeline to start a new run at step 0 in the same directory"
    )


def repeated_blocks(blocks: int, per_step: int) -> str | None:
    """The warning for data too small for one step: the order wraps within the step and repeats blocks."""
    if blocks >= per_step:
        return None
    return (
        f"warning: the training data makes {blocks} blocks of data.seq_len tokens, fewer than one step takes "
        f"({per_step} = train.batch_size x train.grad_accum x ranks): every step repeats blocks. Add data, "
        "or lower train.batch_size or data.seq_len"
    )


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def diverged(
    step: int, what: str, latest: CheckpointInfo | None, optim: OptimConfig, *, in_eval: bool = False
) -> TrainingDivergedError:
    """The error of a non-finite step (or eval): where it happened, what is safe to resume from, what to try."""
    done = f"nothing from step {step} was saved" if in_eval else "its update was not applied and nothing was saved"
    resume = (
        f"the newest valid checkpoint is {latest.path} (step {latest.step}): it is untouched"
        if latest is not None
        else "no checkpoint was saved before it"
    )
    tries = [f"lower optim.lr (now {optim.lr:g})"]
    tries.append(f"raise optim.warmup_steps (now {optim.warmup_steps})")
    if optim.max_grad_norm == 0:
        tries.append("clip gradients with optim.max_grad_norm (now 0: off)")
    tries.append('or set train.on_nonfinite = "skip" to skip such steps')
    return TrainingDivergedError(f"training diverged at step {step}: {what}; {done}; {resume}. Try: {', '.join(tries)}")
