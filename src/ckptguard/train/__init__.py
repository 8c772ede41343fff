"""The ckptguard LoRA trainer: ``ckptguard train --config run.toml`` (or ``python -m ckptguard.train``).

``recipe.py`` is the training loop, readable top to bottom; ``config.py``, ``data.py``,
``tokenizer.py`` and ``backends.py`` are what it is made of; ``commands.py`` adds the ``train`` and
``export`` subcommands to the ``ckptguard`` CLI.
"""

# Exit codes of `ckptguard train` / `export`: 0 done; 1 a checkpoint could not be written, verified or
# read (a CheckpointError, the preflight included); 2 bad config, data or usage, or a diverged run (and for
# `export`, an s3:// URL whose run cannot be opened and listed: a bad URL, a missing bucket, as for `ls`);
# 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1/SIGINT after saving a checkpoint: run the same command
# again to resume; 130 (128 + SIGINT) aborted by a second Ctrl-C, at any moment (the cleanup included):
# the last line says whether steps were lost, from the newest checkpoint on disk.
from ckptguard.run.preemption import PREEMPTED_EXIT_CODE as EXIT_PREEMPTED

EXIT_OK, EXIT_CHECKPOINT, EXIT_BAD_INPUT, EXIT_ABORTED = 0, 1, 2, 130
__all__ = ["EXIT_ABORTED", "EXIT_BAD_INPUT", "EXIT_CHECKPOINT", "EXIT_OK", "EXIT_PREEMPTED"]
