"""What a checkpoint must share with this run to be resumed, and what a resumed run may change.

A checkpoint stores the resolved config and a fingerprint of the training blocks. The adapter and
optimizer tensors are only valid for the same model and LoRA shape (``RESUME_KEYS``) and the data
order only for the same blocks: a mismatch is refused with a diff before anything is loaded. Other
settings (the optimizer's numbers, the step count, checkpointing) take effect on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ckptguard.train.chat import PLAIN
from ckptguard.train.config import RESUME_KEYS, ConfigError, OptimConfig, config_diff


class ResumeMismatchError(ConfigError):
    """The checkpoint was written for another model, adapter shape or training data."""


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse `saved` (a checkpoint's identity values) unless it matches `current` where state depends on it."""
    breaking = config_diff(
        {k: saved["config"].get(k) for k in RESUME_KEYS}, {k: current["config"][k] for k in RESUME_KEYS}
    )
    lines = [f"  {key}: checkpoint has {old!r}, this run has {new!r}" for key, old, new in breaking]
    old_data, new_data = _train_data(saved["train_data"]), current["train_data"]
    if old_data["chat_format"] != new_data["chat_format"]:
        lines.append(
            f"  chat format: checkpoint has {old_data['chat_format']}, this run has {new_data['chat_format']} "
            "(data.chat_template changed, or the tokenizer's own chat template did)"
        )
    if old_data["blocks"] != new_data["blocks"]:
        lines.append(
            f"  training data: checkpoint has blocks {old_data['blocks']}, this run has {new_data['blocks']} "
            "(data.train, data.eval, data.seq_len, data.packing, data.eval_fraction or data.seed changed, "
            "or the file was edited)"
        )
    if lines:
        raise ResumeMismatchError(
            f"cannot resume from {path}: this run's config differs in what the checkpoint's state "
            "depends on:\n" + "\n".join(lines) + "\nRestore those values (--set key=value), resume from "
            "another checkpoint (--resume PATH), or start afresh in another checkpoint.output_dir."
        )


def _train_data(saved: Any) -> dict[str, Any]:
    """A checkpoint's training-data identity; before chat formats were recorded it was the blocks
    fingerprint alone, and every chat record was rendered in the plain format."""
    return saved if isinstance(saved, dict) else {"blocks": saved, "chat_format": PLAIN}


def changed_settings(saved_config: dict[str, Any], current_config: dict[str, Any]) -> str:
    """The line that lists what this run changes on resume ("" when nothing)."""
    changed = config_diff(saved_config, current_config)
    return (
        "resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed) if changed else ""
    )


def apply_optim_settings(optimizer: torch.optim.Optimizer, scheduler: Any, o: OptimConfig) -> None:
    """This run's optimizer settings replace the restored ones (the moments and the step stay)."""
    scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
