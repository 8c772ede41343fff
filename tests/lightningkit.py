"""Crash-harness savers that SIGKILL a Lightning run while it rewrites ``last.ckpt``, with and without ckptguard.

Lightning's own save writes the checkpoint to a temporary file and moves it into place. The move is a
rename only within one filesystem; when the temporary directory (``TMPDIR``, a node-local /tmp) is on
another filesystem than the run directory, it is a copy into ``last.ckpt`` itself. These savers run
with the run directory on its own filesystem and die by a real SIGKILL once the new ``last.ckpt`` (or,
with ckptguard, its payload in staging) is partly written.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any

from integrationkit import TORN_STEP, lightning_run, quiet_child

BALLAST = 16 << 20  # float32 zeros: a 64 MiB checkpoint, so the kill has time to land mid-write


def kill_while_last_ckpt_is_partly_written(run_dir: Path, below: int) -> None:
    """SIGKILL this process once ``last.ckpt`` (Lightning's own) or ckptguard's partial file of it holds some
    bytes, but fewer than `below`."""

    def partly_written(path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and 0 < st.st_size < below

    def watch() -> None:
        while True:
            if any(partly_written(p) for p in [run_dir / "last.ckpt", *run_dir.glob(".partial-last.ckpt-*")]):
                os.kill(os.getpid(), signal.SIGKILL)

    sys.setswitchinterval(1e-4)  # the watcher gets its turn while the main thread writes from Python
    threading.Thread(target=watch, daemon=True).start()


def _torn_run(run_dir: str, guarded: bool) -> None:
    import lightning.pytorch as pl

    class KillInSave(pl.Callback):
        def on_save_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
            if trainer.global_step == TORN_STEP:
                kill_while_last_ckpt_is_partly_written(Path(run_dir), below=BALLAST * 4 // 2)

    quiet_child()
    lightning_run(Path(run_dir), guarded=guarded, max_steps=10, ballast=BALLAST, callbacks=(KillInSave(),))
    os.write(1, b"the kill never landed\n")


def lightning_plain_torn(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """Crash-harness child: plain Lightning, killed while it rewrites last.ckpt in its save of TORN_STEP."""
    _torn_run(run_dir, guarded=False)


def lightning_guarded_torn(run_dir: str, max_steps: int, keep_last: int, async_save: bool) -> None:
    """The same run and the same kill, with VerifiedCheckpointIO."""
    _torn_run(run_dir, guarded=True)
