"""Each test of a library's own suite that passes plain and not with ckptguard, and why (``compat/run.py``).

A reason is either a deliberate difference, which README's "Compatibility with the libraries' own tests"
lists with the same words, or starts with ``open:``: a difference not meant to stay, kept here so
``make compat`` passes until the integration is fixed (and ``make compat`` fails once it is, so the
entry goes).
"""

from __future__ import annotations

# Accelerate: none. Its tests pass guarded as they pass plain (checkpoints keep Accelerate's names,
# checkpoint_{iteration}, under project_dir/checkpoints).
ACCELERATE: dict[str, str] = {}

# Lightning: each reason below is one of README's list (the same words). The tests are those of Lightning
# 2.6.5's tree that pass plain and not guarded (``LIGHTNING_TESTS=... python compat/run.py lightning``),
# each checked by its error.
STORAGE_OPTIONS = (
    "deliberate: storage_options are refused (TypeError): the plugin saves to local or mounted directories"
)
PLAIN_FILE = (
    "deliberate: a .ckpt saved without ckptguard (a plain torch.save file) is refused as unverifiable "
    "(CorruptCheckpointError saying so), never loaded unchecked"
)


NO_ARCHIVE = (
    "deliberate: a save that leaves no torch.save archive is refused (WriteError: the file written is not a "
    "checkpoint archive), never committed as a checkpoint; these tests replace torch.save with a mock that "
    "writes nothing and count its calls"
)


def _listed(reason: str, module: str, tests: tuple[str, ...]) -> dict[str, str]:
    return {f"{module}::{test}": reason for test in tests}


LIGHTNING = {
    **_listed(
        NO_ARCHIVE,
        "checkpointing/test_checkpoint_callback_frequency.py",
        (
            *(f"test_default_checkpoint_freq[{p}]" for p in ("1-0.25-4", "1-1.0-1", "2-0.3-6", "2-1.0-2")),
            *(
                f"test_top_k[{last}-{p}]"
                for last in ("False", "True", "link")
                for p in ("1-1-1.0-1", "2-1-0.25-4", "2-2-0.3-6", "2-2-1.0-2")
            ),
        ),
    ),
    **_listed(
        STORAGE_OPTIONS, "checkpointing/test_trainer_checkpoint.py", ("test_trainer_save_checkpoint_storage_options",)
    ),
    **_listed(
        PLAIN_FILE, "trainer/connectors/test_checkpoint_connector.py", ("test_stateful_trainer_ckpt_path_support",)
    ),
}

DIFFERENCES = {"accelerate": ACCELERATE, "lightning": LIGHTNING}
