"""ckptguard as the benchmark drives it: one manager per run directory, built outside the timed part."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ckptguard
from workloads import Workload


class GuardSaver:
    """A CheckpointManager on `run_dir` saving `w.state`; preflight happens here, untimed."""

    def __init__(self, w: Workload, run_dir: Path, *, async_save: bool = False, verify: str = "full") -> None:
        self._state = w.state
        self.mgr = ckptguard.CheckpointManager(
            run_dir, verify=verify, keep_last=1, async_save=async_save, create_parents=True
        )

    def save(self, step: int) -> Any:
        """Blocking save with the manager's verification; returns the SaveResult."""
        return self.mgr.save(step, self._state, blocking=True)

    def start(self, step: int) -> float:
        """Async save; returns the seconds until save() handed control back (the training stall)."""
        t0 = time.perf_counter()
        self.mgr.save(step, self._state, blocking=False)
        return time.perf_counter() - t0

    def wait(self) -> None:
        self.mgr.wait()

    def close(self) -> None:
        self.mgr.close()


def verify_full(path: Path) -> None:
    """verify_checkpoint(path, level="full"); raises if the checkpoint does not verify."""
    report = ckptguard.verify_checkpoint(path, level="full")
    if not report.ok:
        raise RuntimeError(f"verify_checkpoint({path}) failed: {report.problems[:3]}")
