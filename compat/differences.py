"""Each test of a library's own suite that passes plain and not with ckptguard, and why (``compat/run.py``).

A reason is either a deliberate difference, which README's "Compatibility with the libraries' own tests"
lists with the same words, or starts with ``open:``: a difference not meant to stay, kept here so
``make compat`` passes until the integration is fixed (and ``make compat`` fails once it is, so the
entry goes).
"""

from __future__ import annotations

_ACC = "tests/test_state_checkpointing.py::CheckpointTest_use_{}::{}"
NAMED = (
    "deliberate: checkpoints are named checkpoint-{step} (the name ckptguard ls, discovery and retention "
    "read), not Accelerate's checkpoint_{iteration}, so a test that opens checkpoint_0 by name finds nothing"
)

ACCELERATE = {
    _ACC.format(weights, test): NAMED
    for weights in ("safetensors", "pytorch")
    for test in (
        "test_can_resume_training",
        "test_can_resume_training_checkpoints_relative_path",
        "test_checkpoint_deletion",
        "test_with_scheduler",
    )
}

LIGHTNING: dict[str, str] = {}

DIFFERENCES = {"accelerate": ACCELERATE, "lightning": LIGHTNING}
